#!/usr/bin/env bash
# Exp1 — does DINO repulsion (scale 10, i.e. λ = 100 injected, while σ > 1) find the right orientation / a better best particle than exp0?
# Settings: configs/experiment/exp1_repulsion.yaml.  Usage: bash commands_gpu/exp1_repulsion.sh --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main exp1_repulsion exp1 "scale10" "$@"
