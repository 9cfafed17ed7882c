#!/usr/bin/env bash
# Exp5 — the original exp5_final.sh: repulsion + pruning 4 → 2 at step 25 + hard data consistency, on ImageNet images 10–99 and/or FFHQ images 0–99.
# Settings: configs/experiment/exp5_final.yaml.  Usage: bash commands_gpu/exp5_final.sh --imagenet|--ffhq --1|--10|--90 [...]  (see _common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
EXP_DATASET_FLAGS=1 exp_main exp5_final exp5 scale10_prune25_hdc1 "$@"   # --imagenet / --ffhq choose the dataset
