#!/usr/bin/env bash
# Exp5 — the best setting after exp1–exp4 (provisional: exp2's, repulsion + pruning 4 → 2) on all 100 test images of ImageNet and/or FFHQ.
# Settings: configs/experiment/exp5_final.yaml.  Usage: bash commands_gpu/exp5_final.sh --1|--10|--90 [...]   (DRY_RUN=1, GPU=<id>, MODEL=toy: see _common.sh)
set -euo pipefail

EXP=exp5_final
EXP_SHORT=exp5
RUN_TAG=scale10_prune29_keep2
EXP_DESCRIPTION="Exp5 — the best setting after exp1–exp4 (provisional: exp2's, repulsion + pruning 4 → 2) on all 100 test images of ImageNet and/or FFHQ."
EXP_DATASET_FLAGS=1          # --imagenet / --ffhq select the dataset (model = its LDM); default size --10 then --90
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main "$@"
