#!/usr/bin/env bash
# Exp2 — exp1 plus pruning 4 → 2 at step 29 by measurement loss: how much time/VRAM does it save, and does it keep the best particle?
# Settings: configs/experiment/exp2_pruning.yaml.  Usage: bash commands_gpu/exp2_pruning.sh --1|--10|--90 [...]   (DRY_RUN=1, GPU=<id>, MODEL=toy: see _common.sh)
set -euo pipefail

EXP=exp2_pruning
EXP_SHORT=exp2
RUN_TAG=scale10_prune29_keep2
EXP_DESCRIPTION="Exp2 — exp1 plus pruning 4 → 2 at step 29 by measurement loss: how much time/VRAM does it save, and does it keep the best particle?"

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main "$@"
