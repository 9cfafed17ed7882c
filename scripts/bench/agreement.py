"""Agreement of a switch set with the exact path, both against strict fp32; sample hashes."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from cores.mcmc import data_gradient
from cores.speed import SpeedConfig, apply_speed
from scripts.bench.common import S, make_batch, mcmc_config, reset_compiler

def psnr(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """Per-row PSNR in dB between images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return [float("inf") if m == 0 else 10 * math.log10(4.0 / m) for m in mse.tolist()]


STRICT_FP32 = SpeedConfig(tf32=False)  # no TF32 anywhere: the reference both other paths are measured against


def probe(model, operator, z: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What the sampler takes from the decoder at one latent: a decode without gradient (final
    image, pruning: eager under compile_grad_only), the decode inside a gradient step, the raw and
    the clamped data gradient (copies: a CUDA-graph replay reuses its output buffers)."""
    with torch.no_grad():
        x = model.decode(z).clone()
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        xg = model.decode(zz)
        (g,) = torch.autograd.grad(operator.loss(xg, y).sum(), zz)
        xg, g = xg.detach().clone(), g.clone()  # before the next replay
    gcl, _ = data_gradient(model, operator, z, y)
    return {"x": x, "x_grad_path": xg, "g": g, "g_clamped": gcl.clone()}


def compare(test: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Max errors relative to the reference's max magnitude, gradient cosine, clamped-gradient sign flips."""
    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    cos = torch.nn.functional.cosine_similarity(test["g"].flatten(1), ref["g"].flatten(1)).min()
    c1, c0 = test["g_clamped"], ref["g_clamped"]
    return {"decode_max_rel_err": rel(test["x"], ref["x"]),
            "decode_grad_path_max_rel_err": rel(test["x_grad_path"], ref["x_grad_path"]),
            "grad_max_rel_err": rel(test["g"], ref["g"]), "grad_min_cosine": float(cos),
            "clamped_grad_max_abs_err": float((c1 - c0).abs().max()),
            "clamped_grad_sign_flip_frac": float(((c1 > 0) != (c0 > 0)).float().mean())}


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _sha256(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def agreement(model, operator, image, device, test: SpeedConfig, particles: int, anneal_steps: int,
              mcmc_steps: int, algo: str = "langevin", draws: int = 1) -> Dict[str, Any]:
    """`test` and the exact path (DAPS' default numerics: TF32 convolutions) each against strict fp32
    (TF32 off), from the same latents and random streams: decoder output and gradient errors, and
    the final samples of a short complete run (`anneal_steps` annealing steps).  The floor for the
    final samples is how far strict fp32 lands from the exact path; `test` meets it when its own
    samples land at least as close to the exact ones.  Each of exact and `test` runs twice in this
    process (same bits?); the sha256 of the final samples compares processes and machines.

    One latent's max error is one draw of the rounding: it moves between draws about as much as two
    TF32 paths differ.  With `draws` > 1 the decoder errors are also measured at that many latents
    (`over_draws`): per draw, exact's and `test`'s error, and the condition that `test`'s largest
    error over the draws is no larger than exact's largest."""
    g = torch.Generator(device=device).manual_seed(3)
    zs = [torch.randn((particles, *model.get_in_shape()), generator=g, device=device) for _ in range(draws)]
    z = zs[0]
    y = operator.measure(image, torch.Generator(device=device).manual_seed(4)).expand(particles, -1, -1, -1)

    def run():
        batch = make_batch(model, operator, image, 1, particles, device)
        S.latent_daps(model, operator, batch, S.DAPSConfig.with_steps(anneal_steps, mcmc=mcmc_config(algo, mcmc_steps)))
        return batch.x.clone()

    def measure(cfg: SpeedConfig, twice: bool):
        h = apply_speed(model, cfg)
        try:
            first = (probe(model, operator, z, y), run())
            first[0]["more"] = [probe(model, operator, zk, y) for zk in zs[1:]]
            second = (probe(model, operator, z, y), run()) if twice else None
        finally:
            h.restore()
            if cfg.compile:
                reset_compiler()
        return first, second

    (strict_p, strict_s), _ = measure(STRICT_FP32, twice=False)
    (exact_p, exact_s), exact_again = measure(SpeedConfig(), twice=True)
    (test_p, test_s), test_again = measure(test, twice=True)
    drawn = list(zip([exact_p] + exact_p.pop("more"), [test_p] + test_p.pop("more"),
                     [strict_p] + strict_p.pop("more")))  # (exact, test, strict) probes per latent
    exact_vs_strict, test_vs_strict = compare(exact_p, strict_p), compare(test_p, strict_p)
    floor = psnr(strict_s, exact_s)
    to_exact = psnr(test_s, exact_s)
    err_keys = ("decode_max_rel_err", "decode_grad_path_max_rel_err", "grad_max_rel_err")
    test_twice = _same(test_p, test_again[0]) and torch.equal(test_s, test_again[1])
    per_draw = [(compare(e, s), compare(t, s)) for e, t, s in drawn]
    over_draws = {k: {"exact": [ce[k] for ce, _ in per_draw], "test": [ct[k] for _, ct in per_draw]}
                  for k in err_keys}
    return {
        "test": test.label(), "preset": test.preset, "particles": particles, "anneal_steps": anneal_steps,
        "mcmc_steps": mcmc_steps, "reference": "strict fp32 (tf32 off)",
        "exact_vs_strict_fp32": exact_vs_strict, "test_vs_strict_fp32": test_vs_strict,
        "test_vs_exact": {**compare(test_p, exact_p), "final_sample_psnr_db": to_exact,
                          "final_sample_psnr_db_min": min(to_exact)},
        "floor_strict_fp32_vs_exact_final_sample_psnr_db": floor,
        "floor_strict_fp32_vs_exact_final_sample_psnr_db_min": min(floor),
        "test_vs_strict_fp32_final_sample_psnr_db_min": min(psnr(test_s, strict_s)),
        "exact_bit_identical_twice": _same(exact_p, exact_again[0]) and torch.equal(exact_s, exact_again[1]),
        "test_bit_identical_twice": test_twice,
        "exact_final_sample_sha256": _sha256(exact_s), "test_final_sample_sha256": _sha256(test_s),
        "draws": len(drawn), "over_draws": over_draws,
        "conditions": {
            **{f"{k}_le_daps_tf32": test_vs_strict[k] <= exact_vs_strict[k] for k in err_keys},
            **({f"{k}_max_over_draws_le_daps_tf32": max(v["test"]) <= max(v["exact"])
                for k, v in over_draws.items()} if len(drawn) > 1 else {}),
            "final_sample_psnr_to_exact_ge_floor": min(to_exact) >= min(floor),
            "bit_identical_twice": test_twice,
        },
    }
