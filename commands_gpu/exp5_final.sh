#!/usr/bin/env bash
# Exp5 — the best setting after exp1–exp4 (provisional: exp2's, repulsion + pruning 4 → 2) on all 100 test images of ImageNet and/or FFHQ.
# Settings: configs/experiment/exp5_final.yaml.  Usage: bash commands_gpu/exp5_final.sh --imagenet|--ffhq --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
EXP_DATASET_FLAGS=1 exp_main exp5_final exp5 scale10_prune29 "$@"   # --imagenet / --ffhq choose the dataset
