#!/usr/bin/env bash
# Exp4 — exp1 plus hard data consistency (ReSample latent optimisation after the last step): does it raise PSNR?
# Settings: configs/experiment/exp4_optimization.yaml.  Usage: bash commands_gpu/exp4_optimization.sh --1|--10|--90 [...]   (DRY_RUN=1, GPU=<id>, MODEL=toy: see _common.sh)
set -euo pipefail

EXP=exp4_optimization
EXP_SHORT=exp4
RUN_TAG=scale10_hdc
EXP_DESCRIPTION="Exp4 — exp1 plus hard data consistency (ReSample latent optimisation after the last step): does it raise PSNR?"

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main "$@"
