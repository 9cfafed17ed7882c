#!/usr/bin/env bash
# Validate the fast path on your checkpoints: exp0 on images 0-9 with the exact and with the fast preset, then a paired verdict (Δ best PSNR with 95% CI, McNemar on the correct orientation, equivalence test).
# Usage: bash commands_gpu/validate_speed.sh --10 [--margin-db 0.2]   (--1: image 0 only, a smoke test: no verdict)
# Environment as for the experiment scripts (DRY_RUN, GPU, MODEL=toy, SAVE_DIR, EXTRA_ARGS, PYTHON; see _common.sh).
# The two runs are the usual exp0 folders: .../imagenet_10img/exp0_10img (exact) and .../exp0_10img_fast.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

size="" margin="0.2"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --1|--10) size="$1" ;;
    --margin-db) margin="${2:-}"; shift ;;
    --margin-db=*) margin="${1#*=}" ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# //' >&2; exit 0 ;;
    *) echo "error: unknown flag $1 (expected --10 or --1, --margin-db X)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$size" ]]; then sed -n '2,5p' "$0" | sed 's/^# //' >&2; exit 2; fi
if ! [[ "$margin" =~ ^[0-9]*\.?[0-9]+$ ]] || [[ "$margin" =~ ^0*\.?0*$ ]]; then
  echo "error: --margin-db $margin: expected a positive number of dB" >&2; exit 2
fi
if [[ -n "${SPEED:-}" || -n "${BATCH:-}" ]]; then
  echo "error: SPEED/BATCH are set by this script (exact vs fast, one image per batch); unset them" >&2; exit 2
fi

# the folders _common.sh's _run_one names for exp0 on imagenet
read -r _start _end n folder <<<"$(_range "$size")"
run="$(_results_root)/exp0_baseline/$(SPEED=exact _run_name imagenet "$n" "$folder" exp0 "")"

# resume=true: an exact (or fast) run already in its folder is reused, unfinished images are completed
EXTRA_ARGS="${EXTRA_ARGS:-} resume=true"
SPEED=exact exp_main exp0_baseline exp0 "" "$size"
SPEED=fast exp_main exp0_baseline exp0 "" "$size"
cmd=("$(_python)" eval/validate_speed.py "$run" "${run}_fast" --margin-db "$margin")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${cmd[*]}"
else
  (cd "$_REPO_ROOT" && "${cmd[@]}")
fi
