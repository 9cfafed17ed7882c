#!/usr/bin/env bash
# Exp0 — baseline: 4 independent LatentDAPS chains per image (no repulsion, pruning or optimisation).
# Settings: configs/experiment/exp0_baseline.yaml.  Usage: bash commands_gpu/exp0_baseline.sh --1|--10|--90 [...]   (DRY_RUN=1, GPU=<id>, MODEL=toy: see _common.sh)
set -euo pipefail

EXP=exp0_baseline
EXP_SHORT=exp0
RUN_TAG=scale0
EXP_DESCRIPTION="Exp0 — baseline: 4 independent LatentDAPS chains per image (no repulsion, pruning or optimisation)."

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main "$@"
