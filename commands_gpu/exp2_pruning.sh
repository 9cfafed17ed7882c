#!/usr/bin/env bash
# Exp2 — exp1 plus pruning 4 → 2 at step 29 by measurement loss: how much time/VRAM does it save, and does it keep the best particle?
# Settings: configs/experiment/exp2_pruning.yaml.  Usage: bash commands_gpu/exp2_pruning.sh --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main exp2_pruning exp2 "scale10_prune29" "$@"
