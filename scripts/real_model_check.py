"""GPU check of the full-size real architectures with random weights (no checkpoints needed).

For `ffhq256ldm` and `imagenet256ldm`: time and peak memory of `tweedie` and of a decode
forward+backward (what one Langevin step costs) at batch 4 and 40, fp32 exact path.

    python scripts/real_model_check.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cores.models.ldm import build_random_ldm  # noqa: E402


def timed(fn, device, reps: int = 5):
    """(mean seconds, peak MB) of fn() after one warm-up call."""
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps, torch.cuda.max_memory_allocated(device) / 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="4,40")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for name in ("ffhq256ldm", "imagenet256ldm"):
        cfg = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
        t0 = time.perf_counter()
        model = build_random_ldm(cfg, device)
        build_s = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        for b in [int(x) for x in args.batches.split(",")]:
            z = torch.randn(b, *model.get_in_shape(), device=device)

            def tweedie():
                with torch.no_grad():
                    return model.tweedie(z, 2.0)

            def decode_fwd_bwd():
                zz = z.detach().requires_grad_(True)
                x = model.decode(zz)
                (g,) = torch.autograd.grad(x.square().sum(), zz)
                return g

            base = torch.cuda.memory_allocated(device) / 2 ** 20
            t_tw, m_tw = timed(tweedie, device)
            t_dec, m_dec = timed(decode_fwd_bwd, device)
            row = {"model": name, "batch": b, "params": params, "build_sec": build_s, "weights_mb": base,
                   "tweedie_ms": t_tw * 1e3, "tweedie_peak_mb": m_tw,
                   "decode_fwd_bwd_ms": t_dec * 1e3, "decode_fwd_bwd_peak_mb": m_dec}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\nCard: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("| model | batch | tweedie ms | tweedie peak MB | decode fwd+bwd ms | decode peak MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['tweedie_ms']:.1f} | {r['tweedie_peak_mb']:.0f} | "
              f"{r['decode_fwd_bwd_ms']:.1f} | {r['decode_fwd_bwd_peak_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": torch.cuda.get_device_name(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
