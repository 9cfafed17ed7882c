#!/usr/bin/env bash
# Fetch the weights and test sets the real-model runs need (run on a machine with network access).
#
#   bash download.sh                 # every step
#   bash download.sh STEP [STEP...]  # only these steps
#   bash download.sh --list          # "STEP<TAB>TARGET" for every step
#
# Idempotent: a step whose target already exists is skipped. Run from anywhere; paths are
# relative to the repository root (this file's folder).
#
# Sources (the same files DAPS' download.sh / README fetch):
#   ldm_ffhq256      https://ommer-lab.com/files/latent-diffusion/ffhq.zip (CompVis ffhq-ldm-vq-4, model.ckpt)
#   ldm_imagenet256  https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt (CompVis cin256-v2)
#   dino             https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth
#   lpips            into the torch hub cache, as the files are published (what piq and torchvision load):
#                    piq's LPIPS-VGG layer weights (eval.lpips_net=vgg, DAPS' LPIPS)
#                      https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt
#                    torchvision VGG16 https://download.pytorch.org/models/vgg16-397923af.pth and AlexNet
#                    (eval.lpips_net=alex; its LPIPS linear layers ship with the `lpips` pip package)
#   test-ffhq        DAPS 100-image FFHQ test set (Google Drive id 1IzbnLWPpuIw6Z2E4IKrRByh6ihDE5QLO)
#   test-imagenet    DAPS 100-image ImageNet test set (Google Drive id 1pqVO-LYrRRL4bVxUidvy-Eb22edpuFCs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"

# The step table (name -> target). cores/models/ldm_convert.py DOWNLOAD_STEPS mirrors it; a test
# checks that both agree.
STEPS=(ldm_ffhq256 ldm_imagenet256 dino lpips test-ffhq test-imagenet)
declare -A TARGET=(
  [ldm_ffhq256]="checkpoints/ldm_ffhq256.pt"
  [ldm_imagenet256]="checkpoints/ldm_imagenet256.pt"
  [dino]="checkpoints/dino_deitsmall16_pretrain.pth"
  [lpips]="~/.cache/torch/hub/checkpoints (piq lpips_weights.pt, torchvision vgg16/alexnet weights)"
  [test-ffhq]="datasets/test-ffhq"
  [test-imagenet]="datasets/test-imagenet"
)

log() { echo "[download.sh] $*"; }

fetch() {  # fetch URL DEST (atomic: download to DEST.part, then rename)
  local url="$1" dest="$2"
  mkdir -p "$(dirname "$dest")"
  log "downloading $url -> $dest"
  if command -v wget >/dev/null 2>&1; then
    wget -q --show-progress -c -O "$dest.part" "$url"
  else
    curl -fL --retry 3 -C - -o "$dest.part" "$url"
  fi
  mv "$dest.part" "$dest"
}

skip_if_exists() {  # skip_if_exists PATH -> 0 (and message) if PATH exists and is non-empty
  local p="$1"
  if [[ -f "$p" && -s "$p" ]] || [[ -d "$p" && -n "$(ls -A "$p" 2>/dev/null)" ]]; then
    log "skip: $p already exists"
    return 0
  fi
  return 1
}

step_ldm_ffhq256() {
  local dest="${TARGET[ldm_ffhq256]}"
  skip_if_exists "$dest" && return 0
  mkdir -p checkpoints
  local tmp; tmp="$(mktemp -d checkpoints/.ffhq.XXXXXX)"
  fetch "https://ommer-lab.com/files/latent-diffusion/ffhq.zip" "$tmp/ffhq.zip"
  unzip -q -o "$tmp/ffhq.zip" -d "$tmp"
  local ckpt; ckpt="$(find "$tmp" -name 'model.ckpt' | head -n 1)"
  [[ -n "$ckpt" ]] || { log "ERROR: ffhq.zip holds no model.ckpt"; exit 1; }
  mv "$ckpt" "$dest"
  rm -rf "$tmp"
  log "done: $dest"
}

step_ldm_imagenet256() {
  local dest="${TARGET[ldm_imagenet256]}"
  skip_if_exists "$dest" && return 0
  fetch "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt" "$dest"
  log "done: $dest"
}

step_dino() {
  local dest="${TARGET[dino]}"
  skip_if_exists "$dest" && return 0
  fetch "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth" "$dest"
  log "done: $dest"
}

step_lpips() {
  # torchvision stores the weights under $TORCH_HOME/hub/checkpoints (default ~/.cache/torch);
  # loading them once with download enabled fills the cache (skips files already there).
  "$PYTHON" - <<'EOF'
import os
import torch
import torchvision.models as tvm

hub = os.path.join(torch.hub.get_dir(), "checkpoints")
# piq's LPIPS-VGG layer weights (cores/evaluation.py, eval.lpips_net=vgg): the published file, byte for byte,
# under the name piq looks for (torch.hub.load_state_dict_from_url keeps the URL's file name)
try:
    import piq
    url = piq.LPIPS._weights_url
except (ImportError, AttributeError):
    url = "https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt"
path = os.path.join(hub, os.path.basename(url))
if os.path.isfile(path):
    print(f"[download.sh] skip: {path} already exists")
else:
    print(f"[download.sh] downloading {url} -> {path}")
    torch.hub.load_state_dict_from_url(url, progress=False)
    print(f"[download.sh] done: {path}")
for name, ctor, weights in (("alexnet", tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1),
                            ("vgg16", tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1)):
    fname = os.path.basename(weights.url)
    path = os.path.join(hub, fname)
    if os.path.isfile(path):
        print(f"[download.sh] skip: {path} already exists")
        continue
    print(f"[download.sh] downloading {weights.url} -> {path}")
    ctor(weights=weights)
    print(f"[download.sh] done: {path}")
try:
    import lpips  # noqa: F401  (the linear-layer weights are part of the package)
    print(f"[download.sh] lpips package present: {os.path.dirname(lpips.__file__)}")
except ImportError:
    print("[download.sh] NOTE: `pip install lpips` (the LPIPS linear weights ship with the package)")
EOF
}

gdrive_dataset() {  # gdrive_dataset STEP FILE_ID
  local step="$1" id="$2" dest="${TARGET[$1]}"
  skip_if_exists "$dest" && return 0
  if ! "$PYTHON" -c "import gdown" >/dev/null 2>&1; then
    log "ERROR: step $step needs gdown (Google Drive download): pip install gdown"; exit 1
  fi
  mkdir -p datasets
  local tmp; tmp="$(mktemp -d "datasets/.${step}.XXXXXX")"
  log "downloading Google Drive file $id -> $tmp/$step.zip"
  "$PYTHON" -m gdown "https://drive.google.com/uc?id=$id" -O "$tmp/$step.zip"
  unzip -q -o "$tmp/$step.zip" -d "$tmp/unzipped"
  # the archive holds a folder of images (normally named like the step); take the folder that
  # directly contains the images
  local img; img="$(find "$tmp/unzipped" -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) \
      -not -path '*/__MACOSX/*' | head -n 1)"
  [[ -n "$img" ]] || { log "ERROR: $step archive holds no images"; exit 1; }
  mv "$(dirname "$img")" "$dest"
  rm -rf "$tmp"
  log "done: $dest ($(ls "$dest" | wc -l) files)"
}

step_test-ffhq() { gdrive_dataset test-ffhq 1IzbnLWPpuIw6Z2E4IKrRByh6ihDE5QLO; }
step_test-imagenet() { gdrive_dataset test-imagenet 1pqVO-LYrRRL4bVxUidvy-Eb22edpuFCs; }

if [[ "${1:-}" == "--list" ]]; then
  for s in "${STEPS[@]}"; do printf '%s\t%s\n' "$s" "${TARGET[$s]}"; done
  exit 0
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,9p' "$0"; echo "steps: ${STEPS[*]}"; exit 0
fi

todo=("$@")
[[ ${#todo[@]} -eq 0 ]] && todo=("${STEPS[@]}")
for s in "${todo[@]}"; do
  if [[ -z "${TARGET[$s]+x}" ]]; then
    echo "unknown step '$s'; steps: ${STEPS[*]}" >&2; exit 2
  fi
done
for s in "${todo[@]}"; do
  log "== step $s -> ${TARGET[$s]}"
  "step_$s"
done
log "all requested steps done: ${todo[*]}"
