# Shared driver of the experiment scripts (sourced, not run).
#
# A script calls `exp_main EXP EXP_SHORT RUN_TAG "$@"`: EXP names the Hydra experiment config
# (configs/experiment/$EXP.yaml, which holds every setting with its reason); its second line is
# the description the usage text shows.  The
# command adds only the model/dataset, the image range and the run folder; the run folder's
# config.yaml records every resolved setting.
#
# Flags:   --1 (image 0)   --10 (images 0-9)   --90 (images 10-99; with --10 = 100 images)
#          --resume  continue interrupted runs (resume=true: finished images are kept, the rest done)
#          exp5 only: --imagenet / --ffhq (dataset; without a size flag as the original exp5_final.sh:
#                     ImageNet images 10-99, FFHQ images 0-99), --100 (images 0-99 in one folder),
#                     --baselines (also DAPS with exp0's settings and ReSample on the same images,
#                     into sibling folders of the same <dataset>_<N>img folder)
# Environment:
#   DRY_RUN=1     print each python command instead of running it
#   GPU=<id>      run on that CUDA device (CUDA_VISIBLE_DEVICES=<id>)
#   MODEL=toy     same settings on the built-in exact prior (PROJECT.md §1): a CPU check in minutes;
#                 uses the 10 demo images (only --1 / --10), rot180 twins in the prior
#                 (two exact posterior modes, the orientation question); the toy prior uses
#                 pixel features for repulsion (no DINO weights needed); results go to results/toy/
#   SAVE_DIR=dir  results root (default results, or results/toy with MODEL=toy)
#   SPEED=fast    opt in to the fast path (bf16 + compile; default: exact, the reference protocol);
#                 the run name gets `_fast` after the original name, so it never shares a folder with
#                 the exact run.
#                 Validate it on your checkpoints first: bash commands_gpu/validate_speed.sh --10
#                 (MODEL=toy: the toy prior has no network, so the switches change nothing)
#   BATCH=N       N images per batch (default 1, the reference protocol: per-image VRAM and times);
#                 results do not depend on it (per-particle random streams), VRAM and step times do;
#                 N > 1 appends `_batch<N>` to the run name
#   EXTRA_ARGS="k=v ..."  extra Hydra overrides appended last (they win), e.g. fewer steps; split
#                 like shell words (quotes group: EXTRA_ARGS="data.root='/my images'"), and DRY_RUN
#                 prints the command with the same words, quoted so that it can be pasted
#   PYTHON=...    interpreter (default: the repository's .venv/bin/python when present, else python3)

_usage() {
  local extra=""
  [[ "${EXP_DATASET_FLAGS:-0}" == 1 ]] && extra="--imagenet|--ffhq "
  cat >&2 <<USAGE
usage: [DRY_RUN=1] [GPU=id] [MODEL=toy] [SAVE_DIR=dir] [SPEED=fast] [BATCH=N] [EXTRA_ARGS="k=v ..."] bash $0 ${extra}--1|--10|--90 [...]
  $EXP_DESCRIPTION
  --1   image 0 (sanity check)
  --10  images 0-9
  --90  images 10-99 (together with --10: the 100-image test set)
  --resume  continue the runs these flags name where they stopped (finished images are kept)
USAGE
  [[ "${EXP_DATASET_FLAGS:-0}" == 1 ]] && cat >&2 <<USAGE
  --100 images 0-99 in one run folder
  --baselines  also run DAPS (exp0 settings) and ReSample (sampler=resample) on the same images
  --imagenet / --ffhq  dataset (at least one); without a size flag as the original exp5_final.sh:
               ImageNet images 10-99 (as --90), FFHQ images 0-99 (as --100)
USAGE
  return 0
}

# image range [start, end), image count and the count of its folder (the original's layout: the 90
# images 10-99 complete the 100-image set, so they go to <dataset>_100img) of a size flag
_range() {
  case "$1" in
    --1) echo "0 1 1 1" ;;
    --10) echo "0 10 10 10" ;;
    --90) echo "10 100 90 100" ;;
    --100) echo "0 100 100 100" ;;
  esac
}

# exp5 without a size flag, as the original exp5_final.sh: ImageNet images 10-99, FFHQ images 0-99
_dataset_default_size() {
  if [[ "$1" == imagenet ]]; then echo --90; else echo --100; fi
}

# model/data overrides of a dataset label (imagenet | ffhq)
_model_args() {
  local ds="$1"
  if [[ "${MODEL:-}" == toy ]]; then
    echo "model=toy data=demo-$ds model.include_twins=true"
  elif [[ -z "${MODEL:-}" ]]; then
    echo "model=${ds}256ldm data=test-$ds"
  else
    echo "error: MODEL=${MODEL}: only MODEL=toy (or unset for the real checkpoints) is supported" >&2
    return 2
  fi
}

# the interpreter: $PYTHON, else the repository's .venv (README's quick start), else python3
_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$_REPO_ROOT/.venv/bin/python" ]]; then
    echo "$_REPO_ROOT/.venv/bin/python"
  else
    echo python3
  fi
}

# EXTRA_ARGS as shell words (quotes and backslashes as in a shell, nothing expanded or run) into
# the array _EXTRA; one error line for unbalanced quotes
_extra_args() {
  _EXTRA=()
  [[ -z "${EXTRA_ARGS:-}" ]] && return 0
  if ! xargs printf '%s\0' <<<"$EXTRA_ARGS" >/dev/null 2>&1; then
    echo "error: EXTRA_ARGS=$EXTRA_ARGS: unbalanced quotes" >&2
    return 2
  fi
  local word
  while IFS= read -r -d '' word; do
    [[ -n "$word" ]] && _EXTRA+=("$word")
  done < <(xargs printf '%s\0' <<<"$EXTRA_ARGS")
  return 0
}

# a command as one line that a shell reads back as the same words
_quoted() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then out+="$w "; else out+="$(printf '%q' "$w") "; fi
  done
  echo "${out% }"
}

# where the runs go: save_dir=<root>/<experiment config>, name=<dataset>_<folder count>img/<run>, <run> as
# the original scripts name it: <short>_sanity_check_<tag> (1 image), <short>_<n>img_<tag> (no `_` before an
# empty tag), exp5: exp5_<dataset>_<n>img_<tag>; then the suffixes of non-default settings (_fast, _batch4)
_results_root() {
  if [[ "${MODEL:-}" == toy ]]; then echo "${SAVE_DIR:-results/toy}"; else echo "${SAVE_DIR:-results}"; fi
}

_run_name() {  # dataset-label image-count folder-count experiment-short run-tag
  local kind="${2}img" suffix=""
  if [[ "${EXP_DATASET_FLAGS:-0}" == 1 ]]; then kind="${1}_${2}img"; elif [[ "$2" == 1 ]]; then kind=sanity_check; fi
  [[ -n "${SPEED:-}" && "${SPEED}" != exact ]] && suffix+="_${SPEED}"
  [[ -n "${BATCH:-}" && "${BATCH}" != 1 ]] && suffix+="_batch${BATCH}"
  echo "${1}_${3}img/${4}_${kind}${5:+_$5}${suffix}"
}

_run_one() {  # dataset-label size-flag [experiment-config run-tag extra-overrides]
  local ds="$1" flag="$2" exp="${3:-$EXP}" tag="${4-$RUN_TAG}" more="${5:-}" start end n folder margs
  read -r start end n folder <<<"$(_range "$flag")"
  margs="$(_model_args "$ds")" || return 2
  _extra_args || return 2
  local cmd=("$(_python)" posterior_sample.py "+experiment=$exp" $margs "data.start_id=$start"
             "data.end_id=$end" "save_dir=$(_results_root)/$EXP"
             "name=$(_run_name "$ds" "$n" "$folder" "$EXP_SHORT" "$tag")"
             $more ${SPEED:+speed=$SPEED} ${BATCH:+batch_size=$BATCH} "${_EXTRA[@]}")
  local envp=()
  [[ -n "${GPU:-}" ]] && envp=("CUDA_VISIBLE_DEVICES=$GPU")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    _quoted "${envp[@]}" "${cmd[@]}"
  else
    echo "+ $(_quoted "${envp[@]}" "${cmd[@]}")" >&2
    (cd "$_REPO_ROOT" && env "${envp[@]}" "${cmd[@]}")
  fi
}

exp_main() {  # EXP EXP_SHORT RUN_TAG flags...
  EXP="$1" EXP_SHORT="$2" RUN_TAG="$3"
  shift 3
  _REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  EXP_DESCRIPTION="$(sed -n 2p "$0" | sed 's/^# //')"
  local sizes=() datasets=() a baselines=0 resume=0
  if [[ $# -eq 0 ]]; then _usage; return 2; fi
  for a in "$@"; do
    case "$a" in
      --1|--10|--90) sizes+=("$a") ;;
      --resume) resume=1 ;;
      --baselines)
        if [[ "${EXP_DATASET_FLAGS:-0}" != 1 ]]; then
          echo "error: unknown flag $a" >&2; _usage; return 2
        fi
        baselines=1 ;;
      --100|--imagenet|--ffhq)
        if [[ "${EXP_DATASET_FLAGS:-0}" != 1 ]]; then
          echo "error: unknown flag $a" >&2; _usage; return 2
        fi
        if [[ "$a" == --100 ]]; then sizes+=("$a"); else datasets+=("${a#--}"); fi ;;
      -h|--help) _usage; return 0 ;;
      *) echo "error: unknown flag $a" >&2; _usage; return 2 ;;
    esac
  done
  # --resume: resume=true first among the extra overrides (an EXTRA_ARGS resume=false still wins)
  [[ "$resume" == 1 ]] && EXTRA_ARGS="resume=true${EXTRA_ARGS:+ $EXTRA_ARGS}"
  if [[ "${EXP_DATASET_FLAGS:-0}" == 1 ]]; then
    if [[ ${#datasets[@]} -eq 0 ]]; then
      echo "error: give a dataset: --imagenet and/or --ffhq" >&2; _usage; return 2
    fi
    if [[ ${#sizes[@]} -eq 0 ]]; then
      if [[ "${MODEL:-}" == toy ]]; then sizes=(--10); else sizes=(--dataset-default); fi
    fi
  else
    datasets=(imagenet)
    if [[ ${#sizes[@]} -eq 0 ]]; then _usage; return 2; fi
  fi
  if [[ "${MODEL:-}" == toy ]]; then
    for a in "${sizes[@]}"; do
      if [[ "$a" == --90 || "$a" == --100 ]]; then
        echo "error: $a needs images up to 99; MODEL=toy runs on the 10 demo images (use --1 or --10)" >&2
        return 2
      fi
    done
  fi
  local ds
  for ds in "${datasets[@]}"; do
    for a in "${sizes[@]}"; do
      [[ "$a" == --dataset-default ]] && a="$(_dataset_default_size "$ds")"
      _run_one "$ds" "$a" || return $?
      if [[ "$baselines" == 1 ]]; then   # same images, sibling folders: <dataset>_<N>img/<exp>_<kind>_baseline_*
        _run_one "$ds" "$a" exp0_baseline baseline_daps || return $?
        _run_one "$ds" "$a" exp0_baseline baseline_resample "sampler=resample repulsion_log_baseline=false" \
          || return $?
      fi
    done
  done
}
