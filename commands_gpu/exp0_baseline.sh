#!/usr/bin/env bash
# Exp0 — baseline: 4 independent LatentDAPS chains per image (no repulsion, pruning or optimisation).
# Settings: configs/experiment/exp0_baseline.yaml.  Usage: bash commands_gpu/exp0_baseline.sh --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main exp0_baseline exp0 "" "$@"
