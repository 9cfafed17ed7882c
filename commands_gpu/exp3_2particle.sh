#!/usr/bin/env bash
# Exp3 — exp1 with only 2 particles from the start: is pruning (exp2) better than simply starting with 2?
# Settings: configs/experiment/exp3_2particle.yaml.  Usage: bash commands_gpu/exp3_2particle.sh --1|--10|--90 [...]   (DRY_RUN=1, GPU=<id>, MODEL=toy: see _common.sh)
set -euo pipefail

EXP=exp3_2particle
EXP_SHORT=exp3
RUN_TAG=scale10_2particles
EXP_DESCRIPTION="Exp3 — exp1 with only 2 particles from the start: is pruning (exp2) better than simply starting with 2?"

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main "$@"
