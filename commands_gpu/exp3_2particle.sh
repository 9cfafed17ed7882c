#!/usr/bin/env bash
# Exp3 — exp1 with only 2 particles from the start: is pruning (exp2) better than simply starting with 2?
# Settings: configs/experiment/exp3_2particle.yaml.  Usage: bash commands_gpu/exp3_2particle.sh --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main exp3_2particle exp3 "scale10" "$@"
