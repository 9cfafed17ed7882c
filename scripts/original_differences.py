"""Where the project keeps its own behaviour against the original study's code: the effect of each
difference measured on the tiny fixture LDM (tests/fixtures/ldm_tiny_ffhq.*) → PROJECT.md table
"Where this project differs from the original code".

The original's rules are re-implemented here from reading its code (yuzzznh/diffusion_phase_retrieval,
DAPS/sampler.py `_latent_optimization`, lines 259-405 at b967b2b; its loop draws noise with one global
`torch.randn_like`, lines 590 and cores/mcmc.py); nothing of it is copied.  Its optimisation rule:
AdamW on the mean loss over the still-active rows (coupled), the step taken after the loss that meets a
stop test, stopped rows' gradients zeroed but AdamW still moving them (momentum, weight decay), the
accept test on the loss recorded at the stop (before that step), the plateau test against the initial
loss from iteration 200 on.

    python scripts/original_differences.py [--out docs/benchmarks/original_differences.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cores.config import OptimizationConfig  # noqa: E402
from cores.mcmc import MCMCConfig  # noqa: E402
from cores.models import build_model  # noqa: E402
from cores.operators import get_operator  # noqa: E402
from cores.optimization import optimize_latents  # noqa: E402
from sampler import DAPSConfig, initial_batch, latent_daps  # noqa: E402

FIX = REPO / "tests" / "fixtures"


def mse(model, op, z, y):
    return (op(model.decode(z)) - y).pow(2).flatten(1).mean(1)


def original_rule(model, op, z0, y, lr, eps, max_iters, plateau_from=200):
    """The original's coupled optimisation (see module doc); returns what it returns plus the latents
    at the moment each row met its stop test."""
    B = z0.shape[0]
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=lr)
    init = None
    final = torch.zeros(B)
    iters = torch.full((B,), max_iters)
    done = torch.zeros(B, dtype=torch.bool)
    at_stop = z0.detach().clone()
    for itr in range(max_iters):
        if done.all():
            break
        opt.zero_grad()
        per = mse(model, op, z, y)
        if itr == 0:
            init = per.detach().clone()
        act = (~done).float()
        ((per * act).sum() / act.sum()).backward()
        z.grad[done] = 0
        snapshot = z.detach().clone()       # the latents whose loss `per` is
        opt.step()
        cur = per.detach()
        new = (cur < eps ** 2) & ~done
        if itr >= plateau_from:
            new |= (init < cur) & ~done
        final[new], iters[new], at_stop[new] = cur[new], itr, snapshot[new]
        done |= new
    with torch.no_grad():
        last = mse(model, op, z, y)
    final[~done] = last[~done]
    at_stop[~done] = z.detach()[~done]
    accept = final < init
    out = torch.where(accept.view(-1, 1, 1, 1), z.detach(), z0)
    return {"z": out, "z_opt": z.detach(), "init": init, "final": final, "iters": iters, "accept": accept,
            "at_stop": at_stop, "done": done}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "original_differences.json")
    ap.add_argument("--max-iters", type=int, default=260)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model({"name": "ldm", "ldm_config": yaml.safe_load(open(FIX / "ldm_tiny_ffhq.yaml")),
                         "diffusion_path": str(FIX / "ldm_tiny_ffhq.pt")}, "cpu")
    op = get_operator("phase_retrieval", oversample=2.0, resolution=model.image_resolution, sigma=0.05)
    g = torch.Generator().manual_seed(1)
    z_true = torch.randn(1, *model.get_in_shape(), generator=g)
    with torch.no_grad():
        y1 = op(model.decode(z_true))
    # four starts at growing distances from the truth: rows meet their stop tests at different times
    z0 = z_true + torch.tensor([0.02, 0.1, 0.5, 1.5]).view(4, 1, 1, 1) * torch.randn(4, *z_true.shape[1:], generator=g)
    y = y1.expand(4, *y1.shape[1:]).contiguous()
    with torch.no_grad():
        init_mse = mse(model, op, z0, y)
    eps = float(init_mse[0].sqrt()) * 0.6     # eps² between the rows' losses: the near rows stop early
    lr = 5e-3
    res: dict = {"fixture": "ldm_tiny_ffhq", "rows": 4, "lr": lr, "eps": eps, "max_iters": args.max_iters}

    orig = original_rule(model, op, z0, y, lr, eps, args.max_iters)
    alone = original_rule(model, op, z0[:1], y[:1], lr, eps, args.max_iters)
    cfg = OptimizationConfig(lr=lr, eps=eps, max_iters=args.max_iters, weight_decay=0.01)
    proj = optimize_latents(model, op, z0, y, cfg)
    proj_alone = optimize_latents(model, op, z0[:1], y[:1], cfg)
    # 1. coupled mean loss: row 0 alone vs in the batch
    res["coupled"] = {"original_row0_max_abs_diff": float((orig["z_opt"][0] - alone["z_opt"][0]).abs().max()),
                      "original_row0_iters_batch_vs_alone": [int(orig["iters"][0]), int(alone["iters"][0])],
                      "project_row0_max_abs_diff": float((proj.z[0] - proj_alone.z[0]).abs().max())}
    # 2-4. the step after the stop, stopped rows drifting, the accept test on the stale loss
    with torch.no_grad():
        true_final = mse(model, op, orig["z_opt"], y)
    stopped = orig["done"].nonzero().flatten().tolist()
    res["after_stop"] = {
        "stopped_rows": stopped,
        "iters": orig["iters"].tolist(),
        "drift_rel": [float((orig["z_opt"][r] - orig["at_stop"][r]).norm() / (orig["at_stop"][r] - z0[r]).norm())
                      for r in stopped],
        "recorded_final": orig["final"].tolist(), "true_final_of_returned": true_final.tolist(),
        "stale_rel_err": [float(true_final[r] / orig["final"][r] - 1) for r in stopped],
        "accept_recorded": orig["accept"].tolist(), "accept_true": (true_final < orig["init"]).tolist(),
        "project_final": proj.final_losses, "project_iters": proj.final_iters, "project_reasons": proj.reasons}
    # 5. plateau rule: the original compares with the initial loss, the project with the loss 200 iterations back
    plateau = original_rule(model, op, z0, y, lr, 0.0, args.max_iters)
    proj_plateau = optimize_latents(model, op, z0, y, OptimizationConfig(lr=lr, eps=0.0, max_iters=args.max_iters))
    res["plateau"] = {"original_iters": plateau["iters"].tolist(), "project_iters": proj_plateau.final_iters,
                      "project_reasons": proj_plateau.reasons}
    # 6. one global RNG: particle 0 of an image with 4 particles vs 2 (exp3) — the draws after the first differ
    daps = DAPSConfig.with_steps(4, mcmc=MCMCConfig(num_steps=2, lr=4e-6))
    with torch.no_grad():
        ys = op(model.decode(z_true))

    def run(n, global_rng):
        b = initial_batch(model, ys, [0], n, 42, 10.0, torch.device("cpu"))
        if global_rng:
            b.streams = GlobalStream(torch.Generator().manual_seed(42), n)
            b.zt = b.streams.randn_like(b.zt) * 10.0
        latent_daps(model, op, b, daps)
        return b.x[0]

    res["global_rng"] = {"original_particle0_max_abs_diff_4_vs_2": float((run(4, True) - run(2, True)).abs().max()),
                         "project_particle0_max_abs_diff_4_vs_2": float((run(4, False) - run(2, False)).abs().max())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


class GlobalStream:
    """One generator for the whole batch, as the original's torch.randn_like (rows draw in batch order)."""

    def __init__(self, gen: torch.Generator, n: int):
        self.gen, self.n = gen, n

    def __len__(self):
        return self.n

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.gen, dtype=x.dtype)

    def randn(self, shape, dtype=torch.float32):
        return torch.randn((self.n, *shape), generator=self.gen, dtype=dtype)


if __name__ == "__main__":
    main()
