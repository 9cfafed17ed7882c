#!/usr/bin/env bash
# Probes of the ways a run can go wrong (bad images, two writers, a changed data folder, names,
# disk full, /proc, Ctrl-C, out of memory, small settings): prints a markdown table
# | probe | exit code | last stderr line |.  Run from the repository root; needs a few minutes
# on 2 CPU cores.  The disk-full probe mounts a 700 KB tmpfs and runs only as root.
set -u
PY="${PYTHON:-.venv/bin/python}"
W="$(mktemp -d)"
FEW="sampler.annealing.num_steps=3 sampler.mcmc.num_steps=2 num_samples=2 eval.lpips=false"
export OMP_NUM_THREADS=1
row() {  # probe-text exit-code stderr-file
  local last
  last="$(tr '\r' '\n' <"$3" | grep -v 'img·step' | sed '/^\s*$/d' | tail -1 | sed "s|$W|<tmp>|g; s/|/\\\\|/g")"
  printf '| %s | %s | `%s` |\n' "$1" "$2" "$last"
}
probe() {  # probe-text command...
  local text="$1"; shift
  "$@" >"$W/out" 2>"$W/err"
  row "$text" "$?" "$W/err"
}
probe_warning() {  # probe-text command...: the first warning instead of the last line
  local text="$1" code; shift
  "$@" >"$W/out" 2>"$W/err"
  code=$?
  tr '\r' '\n' <"$W/err" | grep -m1 '^warning:' >"$W/warn" || echo "(no warning)" >"$W/warn"
  row "$text" "$code" "$W/warn"
}
echo "| probe | exit code | last stderr line |"
echo "|---|---|---|"
# 1. images
"$PY" - "$W" <<'EOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
w = Path(sys.argv[1])
for d in ("g16", "rgba", "small", "cmyk"):
    (w / d).mkdir()
Image.fromarray(np.full((64, 64), 128 * 257, np.uint16)).save(w / "g16" / "0.png")     # 16-bit gray
a = np.zeros((64, 64, 4), np.uint8); a[..., 0] = 200; a[..., 3] = 128
Image.fromarray(a, "RGBA").save(w / "rgba" / "0.png")
Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(w / "small" / "0.png")
Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(w / "cmyk" / "0.jpg")
EOF
probe_warning "16-bit gray PNG (mean 128)" "$PY" posterior_sample.py $FEW data.end_id=1 data.root="$W/g16" save_dir="$W/r" name=g16
echo "|  ↳ its gt/00000.png mean | | \`$("$PY" -c "import numpy as np, PIL.Image as I, sys; print(np.asarray(I.open(sys.argv[1])).mean())" "$W/r/g16/gt/00000.png")\` |"
probe_warning "RGBA, alpha 128" "$PY" posterior_sample.py $FEW data.end_id=1 data.root="$W/rgba" save_dir="$W/r" name=rgba
probe_warning "8×8 image" "$PY" posterior_sample.py $FEW data.end_id=1 data.root="$W/small" save_dir="$W/r" name=small
probe "CMYK JPEG" "$PY" posterior_sample.py $FEW data.end_id=1 data.root="$W/cmyk" save_dir="$W/r" name=cmyk
# 2. two writers
SLOW="sampler.annealing.num_steps=20 sampler.mcmc.num_steps=4 num_samples=2 eval.lpips=false data.end_id=3"
"$PY" posterior_sample.py $SLOW seed=7 save_dir="$W/r" name=two >/dev/null 2>"$W/e7" & p7=$!
"$PY" posterior_sample.py $SLOW seed=42 save_dir="$W/r" name=two >/dev/null 2>"$W/e42" & p42=$!
wait $p7; c7=$?; wait $p42; c42=$?
row "two processes, one name, seed=7 and seed=42 started together: seed=7" $c7 "$W/e7"
row "… seed=42" $c42 "$W/e42"
echo "|  ↳ config.yaml | | \`$(grep '^seed' "$W/r/two/config.yaml")\` |"
"$PY" posterior_sample.py $FEW data.end_id=4 num_shards=2 shard=0 save_dir="$W/r" name=sh >/dev/null 2>"$W/s0" & s0=$!
"$PY" posterior_sample.py $FEW data.end_id=4 num_shards=2 shard=1 save_dir="$W/r" name=sh >/dev/null 2>"$W/s1" & s1=$!
wait $s0; c0=$?; wait $s1; c1=$?
echo "| two shards together | $c0, $c1 | \`records: $(ls "$W/r/sh/records" | tr '\n' ' ')\` |"
# 3. changed data folder
mkdir "$W/data" && cp dataset/demo-ffhq/0000[0-3].png "$W/data/"
"$PY" posterior_sample.py $FEW data.end_id=2 data.root="$W/data" save_dir="$W/r" name=src >/dev/null 2>&1
cp dataset/demo-ffhq/00009.png "$W/data/0.png"
probe "file inserted that sorts first, resume data.end_id=3" "$PY" posterior_sample.py $FEW data.end_id=3 data.root="$W/data" save_dir="$W/r" name=src resume=true
# 4. names
probe "name= (empty)" "$PY" posterior_sample.py $FEW save_dir="$W/r" name=
probe "name=../../x" "$PY" posterior_sample.py $FEW save_dir="$W/r" name=../../x
# 6. failures
if mkdir -p "$W/full" && mount -t tmpfs -o size=700k tmpfs "$W/full" 2>/dev/null; then
  probe "disk full mid-run (700 KB tmpfs, 10 images)" "$PY" posterior_sample.py $FEW data.end_id=10 save_traj=true traj_every=1 save_dir="$W/full" name=f
  echo "|  ↳ records kept | | \`$(ls "$W/full/f/records" 2>/dev/null | tr '\n' ' ')\` |"
  umount "$W/full"
fi
probe "save_dir=/proc/results" "$PY" posterior_sample.py save_dir=/proc/results
"$PY" -c "
import signal, subprocess, sys, time
p = subprocess.Popen(sys.argv[1:], stderr=open('$W/cc', 'w'), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
time.sleep(0.5); p.send_signal(signal.SIGINT); sys.exit(p.wait())" "$PY" posterior_sample.py save_dir="$W/r" name=cc
row "Ctrl-C 0.5 s after start" $? "$W/cc"
probe "num_samples=200000 under ulimit -v 6 GB" bash -c "ulimit -v 6000000; exec $PY posterior_sample.py num_samples=200000 batch_size=1 data.end_id=1 eval.lpips=false save_dir=$W/r name=oom"
# 8. smaller
probe_warning "resume=true on a new folder (runs)" "$PY" posterior_sample.py $FEW data.end_id=1 save_dir="$W/r" name=typo resume=true
probe "task.sigma=-0.1" "$PY" posterior_sample.py task.sigma=-0.1 save_dir="$W/r"
probe "repulsion_scale=10 num_samples=1" "$PY" posterior_sample.py repulsion_scale=10 num_samples=1 save_dir="$W/r"
probe "refused config: leaves <name>/.hydra_logs?" "$PY" posterior_sample.py num_samples=2 pruning_step=1 pruning_keep=2 save_dir="$W/r" name=refused
echo "|  ↳ $W/r/refused exists | | \`$([[ -e "$W/r/refused" ]] && echo yes || echo no)\` |" | sed "s|$W|<tmp>|g"
mkdir -p "$W/stub" && printf '#!/bin/sh\nfor a in "$@"; do printf "[%%s] " "$a"; done; echo\n' >"$W/stub/py" && chmod +x "$W/stub/py"
PYTHON="$W/stub/py" MODEL=toy EXTRA_ARGS="data.root='/a b'" bash commands_gpu/exp0_baseline.sh --1 >"$W/out" 2>/dev/null
echo "| EXTRA_ARGS=\"data.root='/a b'\": last word the interpreter gets | $? | \`$(grep -o '\[data.root=[^]]*\]' "$W/out")\` |"
echo "|  ↳ DRY_RUN prints | | \`$(DRY_RUN=1 PYTHON="$W/stub/py" MODEL=toy EXTRA_ARGS="data.root='/a b'" bash commands_gpu/exp0_baseline.sh --1 | grep -o 'data.root=.*')\` |"
probe_warning "toy prior on an image that is not its component" "$PY" posterior_sample.py $FEW data.end_id=1 data.root="$W/g16" save_dir="$W/r" name=foreign
rm -rf "$W"
