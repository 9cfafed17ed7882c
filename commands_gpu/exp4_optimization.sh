#!/usr/bin/env bash
# Exp4 — exp1 plus hard data consistency (ReSample latent optimisation after the last step): does it raise PSNR?
# Settings: configs/experiment/exp4_optimization.yaml.  Usage: bash commands_gpu/exp4_optimization.sh --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main exp4_optimization exp4 "" "$@"
