"""DINO-SVGD particle repulsion added to the PF-ODE score (RLSD, Zilberstein et al., ICLR 2025).

Particles of one image push each other apart in a feature space early in the
annealing, so that a particle set can cover both the correct orientation and
the 180° twin instead of collapsing into one basin.

Definition (`compute_repulsion_gradient`), per image group of N ≥ 2 finite particles
with features f_i = φ(z_i); every sum and median runs over the N − 1 others j ≠ i:

    d_ij = ||f_i − f_j||
    m_i  = median_{j≠i} d_ij                    (torch.median: the lower median)
    h_i  = m_i² / log N
    w_ij = exp(−d_ij² / h_i)
    g_i  = Σ_{j≠i} 2·w_ij·(f_i − f_j) / h_i     (feature space)
    r_i  = J_φ(z_i)ᵀ g_i / S_i,   S_i = Σ_{j≠i} w_ij     (normalizer "rlsd", the default)
    r_i  = J_φ(z_i)ᵀ g_i / (1 + S_i)                     (normalizer "density")

"rlsd" is RLSD's kernel (Zilberstein et al., ICLR 2025; repository
nzilberstein/Repulsive-score-distillation-RSD-, `constrained_sampling/algos/rsd.py`,
`RSD.sample`): it forms f_i − f_j, drops the diagonal with a ~eye mask before the
distances, the median and the kernel sum, takes `median(dim=1)` (torch's lower median)
of the N − 1 distances, sets h = median² / log(N − 1), sums 2·w·(f_i − f_j)/h over
j ≠ i, pulls it back with one VJP of Σ f·g.detach() and divides by the kernel sum over
j ≠ i.  Its update subtracts γ·√(1 − ᾱ_t)·r from the predicted noise ε̂; since the score
is −ε̂/√(1 − ᾱ_t), that is score + γ·r: RLSD's γ is our λ (`repulsion_scale`), with
score' = score + λ·r, and r_i points from the other particles' features towards f_i,
so λ > 0 pushes the particles apart.

One deliberate difference: h uses log N, not RLSD's log(N − 1).  At N = 2 RLSD's
log(1) = 0 gives h = +inf, hence w_12 = 1, g = 0 and r = 0 (no repulsion at all with
two particles; NaN if the two features coincide, 0/0).  With log N, N = 2 gives
w_12 = exp(−log 2) = 1/2 exactly; for N ≥ 3 h is log(N − 1)/log N of RLSD's
(0.63 at N = 3, 0.79 at N = 4, 0.94 at N = 8).

"density" is the kernel-density form: quantile median (mean of the two middle values for an
even count, which differs from the lower median only for odd N) and the kernel sum
including w_ii = 1.  It is exactly r_i = −∇_{z_i} log Σ_j exp(−||φ(z_i) − f_j||² / h_i)
with the others' features f_j and h_i held fixed (tests check this by autograd and
finite differences).  For even N both use the same median and
|r_density| / |r_rlsd| = S_i / (1 + S_i) per particle: exactly 1/3 at N = 2 and 0.43 at
N = 4 on the toy and on 384-d random features (PROJECT.md §3), so "density" is the weaker
force at the same λ, by a factor that depends on N.

Why dividing by S_i is safe: at least ⌈(N − 1)/2⌉ of the N − 1 distances are ≤ m_i,
and each of those has w_ij ≥ exp(−m_i² log N / m_i²) = 1/N, so
S_i ≥ ⌈(N − 1)/2⌉ / N ≥ 1/3 (1/2 for even N; the bound is approached when those
neighbours sit exactly at m_i and the rest far away).  If m_i = 0 (at least half of the
others coincide with particle i) the bandwidth is clamped, those neighbours get w = 1
and contribute no force, so S_i ≥ 1.  N = 1 (or a group whose other particles are
non-finite) gives r = 0.

Weight statistics (`weights_mean`, `weights_max`, `weights_nonzero_frac`) are over the
off-diagonal pairs j ≠ i; "nonzero" means w_ij > `WEIGHT_NONZERO_TOL`.  No second-order
graph: g is detached and pulled back with one `autograd.grad(Σ_i f_i·g_i, z)`; features
of different rows never mix, so one backward over the whole batch gives every row its
own J_iᵀ g_i.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from cores.config import RepulsionConfig
from cores.evaluation import finite_or_none
from sampler import ImageOutput, ParticleBatch, SamplerHook, ScoreFn, StepContext

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["compute_repulsion_gradient", "RepulsionHook", "feature_statistics", "summarize", "run_totals",
           "schedule_factor", "logged_step", "repulsion_groups",
           "REPULSION_FIELDS", "DinoFeatureExtractor", "WEIGHT_NONZERO_TOL", "NORMALIZERS"]

WEIGHT_NONZERO_TOL = 1e-6
#: `repulsion_normalizer` values: RLSD's kernel (default) or the KDE log-density gradient
NORMALIZERS = ("rlsd", "density")
RATIO_WARN = 10.0

#: the exact fields of one repulsion.jsonl line: the original study's names and meanings, then the
#: injected multiplier λ, the project's own per-particle ratio at σ_i, and the feature space
REPULSION_FIELDS = ("image_idx", "step", "sigma", "repulsion_on", "repulsion_scale_used", "score_base_norm",
                    "repulsion_norm", "scaled_repulsion_norm", "ratio_scaled_to_score", "repulsion_cleared",
                    "mean_pairwise_dino_dist", "weights_mean", "weights_max", "weights_nonzero_frac",
                    "repulsion_time_sec", "repulsion_multiplier", "ratio_per_particle_at_sigma", "feature")


def __getattr__(name: str):
    """`from repulsion import DinoFeatureExtractor` without importing timm until needed."""
    if name == "DinoFeatureExtractor":
        from cores.dino import DinoFeatureExtractor

        return DinoFeatureExtractor
    raise AttributeError(f"module 'repulsion' has no attribute {name!r}")


# ----------------------------------------------------------------------------- kernel
def _group_kernel(f: torch.Tensor, eps: float, normalizer: str = "rlsd"
                  ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
    """Feature-space SVGD direction g (n, D) and normaliser (n,) for one group of n ≥ 2 finite rows."""
    n = f.shape[0]
    diff = f.unsqueeze(1) - f.unsqueeze(0)                       # (n, n, D): f_i − f_j
    d2 = diff.pow(2).sum(-1)                                     # exact zeros on the diagonal
    d = d2.sqrt()
    off = ~torch.eye(n, dtype=torch.bool, device=f.device)
    if normalizer == "density":
        med = torch.quantile(d[off].view(n, n - 1), 0.5, dim=1)  # median over j ≠ i
        h = (med.pow(2) / max(math.log(n), eps)).clamp_min(1e-30)  # identical particles: g = 0 anyway
        w = torch.exp(-d2 / h.unsqueeze(1))                      # w_ii = 1
        g = (2 * w.unsqueeze(-1) * diff).sum(1) / h.unsqueeze(1)
        wo, norm = w[off], w.sum(1)                              # 1 + Σ_{j≠i} w_ij
    else:                                                        # "rlsd": diagonal dropped first
        diff, d2 = diff[off].view(n, n - 1, -1), d2[off].view(n, n - 1)
        med = torch.median(d[off].view(n, n - 1), dim=1).values  # lower median, as in RLSD
        h = (med.pow(2) / max(math.log(n), eps)).clamp_min(1e-30)
        w = torch.exp(-d2 / h.unsqueeze(1))
        g = (2 * w.unsqueeze(-1) * diff).sum(1) / h.unsqueeze(1)
        wo, norm = w.reshape(-1), w.sum(1)                       # Σ_{j≠i} w_ij ≥ ⌈(n−1)/2⌉/n
    stats = {"mean_pairwise_dist": float(d[off].mean()), "weights_mean": float(wo.mean()),
             "weights_max": float(wo.max()), "weights_nonzero_frac": float((wo > WEIGHT_NONZERO_TOL).float().mean())}
    return g, norm, stats


def _empty_stats(n: int, nonfinite: List[int]) -> Dict[str, Any]:
    return {"num_particles": n, "nonfinite_rows": nonfinite, "mean_pairwise_dist": None, "weights_mean": None,
            "weights_max": None, "weights_nonzero_frac": None}


def compute_repulsion_gradient(latents: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                               groups: Optional[torch.Tensor] = None, eps: float = 1e-6,
                               normalizer: str = "rlsd") -> Tuple[torch.Tensor, Dict[str, Any]]:
    """SVGD repulsion r (same shape as `latents`) and diagnostics; see the module doc for the formula.

    `normalizer`: "rlsd" (RLSD's kernel, divides by Σ_{j≠i} w_ij) or "density" (divides by
    1 + Σ_{j≠i} w_ij, quantile median: the KDE log-density gradient).

    `feature_fn` maps (B, …) latents to (B, D) features row by row (decode + DINO,
    decode + flatten, or flatten).  `groups` (B,) labels the rows: only rows with the
    same label interact (default: one group).  Rows whose features are not finite are
    left out of their group and get r = 0; they are listed in `nonfinite_rows`.
    Diagnostics: `per_group[label]` with `num_particles`, `nonfinite_rows`,
    `mean_pairwise_dist`, `weights_mean`, `weights_max`, `weights_nonzero_frac`
    (None for groups with < 2 finite rows), the same four averaged over groups at the
    top level, and `nonfinite_rows` (batch row indices).
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"repulsion_normalizer={normalizer!r}: expected one of {NORMALIZERS}")
    B = latents.shape[0]
    if groups is None:
        groups = torch.zeros(B, dtype=torch.long)
    labels = groups.detach().cpu().tolist()
    r = torch.zeros_like(latents)
    diag: Dict[str, Any] = {"per_group": {}, "nonfinite_rows": []}
    if B == 0:
        return r, diag
    with torch.enable_grad():
        z = latents.detach().requires_grad_(True)
        f = feature_fn(z)
        f = f.reshape(B, -1)
        fd = f.detach()
        finite = torch.isfinite(fd).all(1).cpu()
        g_all = torch.zeros_like(fd)
        norm_all = torch.ones(B, dtype=fd.dtype, device=fd.device)
        active = torch.zeros(B, dtype=torch.bool)
        for lab in dict.fromkeys(labels):
            rows = [k for k, l in enumerate(labels) if l == lab]
            good = [k for k in rows if finite[k]]
            bad = [k for k in rows if not finite[k]]
            diag["nonfinite_rows"] += bad
            if len(good) < 2:
                diag["per_group"][lab] = _empty_stats(len(rows), bad)
                continue
            idx = torch.as_tensor(good, device=fd.device)
            g, wsum, stats = _group_kernel(fd[idx], eps, normalizer)
            g_all[idx] = g
            norm_all[idx] = wsum
            active[good] = True
            diag["per_group"][lab] = {"num_particles": len(rows), "nonfinite_rows": bad, **stats}
        if active.any():
            # rows outside any active group carry g = 0; mask them out of the product entirely so a
            # non-finite feature (0·NaN) cannot reach the backward of any row
            keep = active.to(fd.device)
            target = torch.where(keep.unsqueeze(1), f, torch.zeros_like(f))
            (vjp,) = torch.autograd.grad((target * g_all).sum(), z)
            scale = (1.0 / norm_all).view(B, *([1] * (latents.ndim - 1))).to(vjp.dtype)
            r = torch.where(keep.view(B, *([1] * (latents.ndim - 1))), vjp * scale, torch.zeros_like(vjp))
            r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0) if not torch.isfinite(r).all() else r
    vals = [s for s in diag["per_group"].values() if s["mean_pairwise_dist"] is not None]
    for key in ("mean_pairwise_dist", "weights_mean", "weights_max", "weights_nonzero_frac"):
        diag[key] = float(sum(s[key] for s in vals) / len(vals)) if vals else None
    return r.detach(), diag


# ----------------------------------------------------------------------------- schedule
def schedule_factor(sigma: float, sigma_break: float, sigma_max: float, schedule: str = "constant") -> float:
    """Multiplier of `repulsion_scale` at noise level σ: 0 (OFF) unless σ > σ_break.

    As the original's `get_repulsion_scale` (DAPS/repulsion.py lines 342-359 at b967b2b), with
    u = clip((σ − σ_break) / (σ_max − σ_break + 1e-8), 0, 1), σ_max = the annealing
    schedule's σ_max (σ_0):
      constant → 1;  linear → u;  cosine → (1 + cos(π·(1 − u))) / 2.
    linear and cosine are 1 at σ_max (to 1e-9) and decay towards 0 at σ_break.
    """
    if sigma <= sigma_break:
        return 0.0
    if schedule == "constant":
        return 1.0
    u = min(1.0, max(0.0, (sigma - sigma_break) / (sigma_max - sigma_break + 1e-8)))
    if schedule == "linear":
        return u
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (1.0 - u)))
    raise ValueError(f"repulsion_schedule={schedule!r}: expected constant, linear or cosine")


def logged_step(step: int) -> bool:
    """Steps {0,1,2,5,10} ∪ every 5th below 50 ∪ every 25th from 50 on."""
    if step in (0, 1, 2, 5, 10):
        return True
    return step % 5 == 0 if step < 50 else step % 25 == 0


# ----------------------------------------------------------------------------- hook
class RepulsionHook(SamplerHook):
    """Adds λ·r to the PF-ODE score while σ > σ_break, and logs repulsion.jsonl.

    Per annealing step (`wrap_score`): the scale amounts to w = scale·schedule(σ) and the
    injected multiplier is λ = w² (`repulsion_multiplier: squared`, the original code, which
    applies w twice) or λ = w (`linear`).  ON while λ > 0 → r is computed once for the whole
    batch (images never interact: `batch.image_ids` are the groups) and the returned score
    function is `score + λ·r`.  On logged OFF steps (σ ≤ σ_break, or scale 0 with
    `log_baseline`) the score is returned unchanged; the feature distances and kernel statistics
    are still logged, computed under no_grad, so a scale-0 run gives the baseline curve with
    bit-identical samples.

    Log norms, per image (`REPULSION_FIELDS`): `score_base_norm`, `repulsion_norm`,
    `scaled_repulsion_norm` and `ratio_scaled_to_score` as the original logs them
    (DAPS/cores/scheduler.py lines 465-506 at b967b2b): L2 norms over all the image's particles
    together (the original's batch is one image's particles) at the PF-ODE's last drift
    evaluation of the step (the original overwrites them at every evaluation), with
    `repulsion_scale_used` = w, `repulsion_norm` = ||(λ/w)·r|| (the original hands w·r to the
    ODE, which multiplies it by w again), `scaled_repulsion_norm` = ||λ·r|| and
    ratio = scaled / (score_base_norm + 1e-12).  `repulsion_multiplier` is λ.  The project's own
    ratio, `ratio_per_particle_at_sigma`, is mean_i ||λ·r_i|| / mean_i ||score_i|| over the
    image's particles at the step's first evaluation (σ_i itself).

    Target ratio (`target_ratio` = ρ, replaces the scale and the multiplier meaning): ON while
    ρ·schedule(σ) > 0; r is computed as above, and at the step's first Euler evaluation, where
    ||score|| at σ_i is first known, λ itself is set per image so that `ratio_per_particle_at_sigma`
    = mean ||λ·r_i|| / mean ||score_i|| equals ρ·schedule(σ), capped at `scale_max`, 0 where
    r = 0.  The same λ serves the step's later Euler evaluations; `repulsion_scale_used` and
    `repulsion_multiplier` log it.  The scale then follows the prior's and
    the particle count's score and force magnitudes instead of being tuned per setting.

    Latent decoded for the features (`latent`): `z_t` (default, the original study's
    `compute_repulsion(zt)`); `z_t_vp` = z_t/√(1+σ²), the VP-scaled noisy latent that RLSD
    decodes, with the chain-rule factor 1/√(1+σ²) on the gradient; `z0hat` = D(z_t; σ)
    (one extra denoiser call, no grad) with ∂z0hat/∂z_t taken as the identity.
    """

    def __init__(self, cfg: RepulsionConfig, model, feature_extractor: Optional[FeatureFn] = None):
        self.cfg, self.model, self._extractor = cfg, model, feature_extractor
        self._images: Dict[int, Dict[str, Any]] = {}   # image -> lines, active steps, time, distances
        self._pending: Optional[Dict[str, Any]] = None  # this step's log, completed in on_step

    @classmethod
    def from_config(cls, cfg: RepulsionConfig, model, device) -> Optional["RepulsionHook"]:
        """None at scale 0 without baseline logging: plain DAPS constructs nothing."""
        if not cfg.needs_hook:
            return None
        extractor = None
        if cfg.feature == "dino":
            from cores.dino import DinoFeatureExtractor

            extractor = DinoFeatureExtractor(weights_path=cfg.dino.weights_path, resize=cfg.dino.resize,
                                             normalize=cfg.dino.normalize, device=device,
                                             preprocess=cfg.dino.preprocess)
            extractor.ensure_available()  # fail before heavy work, with the download hint
        return cls(cfg, model, extractor)

    # ------------------------------------------------------------------ features
    def features(self, z: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """φ(z): (B, D) features of latents in the configured space (`groups`: the rows' images, for
        the DINO input's per-image preprocessing)."""
        if self.cfg.feature == "latent":
            return z.flatten(1)
        x = self.model.decode(z)
        if self.cfg.feature == "pixel":
            return x.flatten(1)
        return self._extractor(x, groups) if groups is not None else self._extractor(x)

    def factor(self, sigma: float) -> float:
        """w = scale·schedule(σ): what the user's scale amounts to at σ (λ = `cfg.injected(w)`)."""
        return self.cfg.scale * schedule_factor(sigma, self.cfg.sigma_break, self.cfg.sigma_max, self.cfg.schedule)

    def target(self, sigma: float) -> Optional[float]:
        """ρ·schedule(σ) with a target ratio (0 when OFF); None without one (λ = `factor`)."""
        if self.cfg.target_ratio is None:
            return None
        return self.cfg.target_ratio * schedule_factor(sigma, self.cfg.sigma_break, self.cfg.sigma_max,
                                                       self.cfg.schedule)

    def scale_for_ratio(self, r: torch.Tensor, score_norm: torch.Tensor, groups: torch.Tensor,
                        target: float) -> Dict[int, float]:
        """λ per image with mean_i ||λ·r_i|| / mean_i ||score_i|| = target (the log's norms), capped
        at `scale_max`; 0 where r or the score vanishes (or is not finite)."""
        rn = r.flatten(1).norm(dim=1).double().cpu()
        sn = score_norm.double().cpu()
        out: Dict[int, float] = {}
        for img in dict.fromkeys(groups.tolist()):
            rows = groups == img
            a, b = float(rn[rows].mean()), float(sn[rows].mean())
            lam = target * b / a if a > 0 and math.isfinite(a) and math.isfinite(b) else 0.0
            out[int(img)] = min(lam, self.cfg.scale_max) if math.isfinite(lam) else 0.0
        return out

    def _feature_latent(self, zt: torch.Tensor, sigma: float) -> Tuple[torch.Tensor, float]:
        """(latent the features see, d latent / d z_t as a scalar)."""
        if self.cfg.latent == "z0hat":
            with torch.no_grad():
                return self.model.tweedie(zt, torch.tensor(sigma, device=zt.device, dtype=zt.dtype)), 1.0
        if self.cfg.latent == "z_t_vp":
            c = 1.0 / math.sqrt(1.0 + sigma ** 2)
            return zt * c, c
        return zt, 1.0

    def repulsion(self, zt: torch.Tensor, sigma: float, groups: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """r w.r.t. z_t (chain rule applied) and the kernel diagnostics."""
        u, du_dz = self._feature_latent(zt, sigma)
        r, diag = compute_repulsion_gradient(u, functools.partial(self.features, groups=groups), groups,
                                             normalizer=self.cfg.normalizer)
        return (r * du_dz if du_dz != 1.0 else r), diag

    # ------------------------------------------------------------------ sampler interface
    def wrap_score(self, score_fn: ScoreFn, batch: ParticleBatch, ctx: StepContext) -> ScoreFn:
        target = self.target(ctx.sigma)
        w = self.factor(ctx.sigma)
        lam = self.cfg.injected(w) if target is None else target  # with a target: λ is set per image below
        on = lam > 0 and len(batch) > 0
        logged = logged_step(ctx.step) and len(batch) > 0
        if not (on or logged):
            return score_fn
        t0 = time.perf_counter()
        groups = repulsion_groups(batch)
        if on:
            r, diag = self.repulsion(batch.zt, ctx.sigma, groups)
            if not torch.isfinite(r).all():
                raise AssertionError("repulsion direction is not finite")
        else:
            r, w, lam, target = None, 0.0, 0.0, None
            with torch.no_grad():
                diag = feature_statistics(self._feature_latent(batch.zt, ctx.sigma)[0],
                                          functools.partial(self.features, groups=groups), groups,
                                          weights=not self.cfg.on, normalizer=self.cfg.normalizer)
        if batch.zt.is_cuda:
            torch.cuda.synchronize(batch.zt.device)
        images = image_groups(groups)
        share = (time.perf_counter() - t0) / max(1, len(images))
        for img in images:
            s = self._image(img)
            if on:
                s["active_steps"] += 1
                s["total_time_sec"] += share
                dist = diag["per_group"].get(img, {}).get("mean_pairwise_dist")
                if dist is not None:
                    s["dists"].append(dist)
        first_norm: List[torch.Tensor] = []  # per-row ||score|| at the first evaluation (σ_i)
        last_sq: List[torch.Tensor] = []     # per-row ||score||² at the latest evaluation (logged steps)
        lam_img: Dict[int, float] = {}       # target ratio: λ per image, set at the first Euler evaluation
        lam_rows: List[torch.Tensor] = []    # ... and per row, shaped like r
        self._pending = {"step": ctx.step, "sigma": ctx.sigma, "on": on, "w": w,
                         "lam": lam if target is None else lam_img, "r": r, "diag": diag, "groups": groups,
                         "share": share, "score_norm": first_norm, "last_sq": last_sq} if logged else None

        def score_with_repulsion(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            score = score_fn(z, sigma)
            first = not first_norm
            if first:  # the step's first Euler evaluation, at σ_i
                first_norm.append(score.flatten(1).norm(dim=1))
            if logged:  # the original logs the last evaluation's norms: each call overwrites them
                last_sq[:] = [score.detach().flatten(1).double().pow(2).sum(1)]
            if r is None:
                return score
            if r.shape != score.shape:
                raise AssertionError(f"repulsion shape {tuple(r.shape)} != score {tuple(score.shape)}")
            if target is None:
                push = lam * r
            else:
                if first:  # only now is ||score|| at σ_i known
                    lam_img.update(self.scale_for_ratio(r, first_norm[0], groups, target))
                    for img, v in lam_img.items():
                        if img >= 0:
                            self._image(img)["scales"].append(v)
                    lam_rows.append(torch.tensor([lam_img[int(g)] for g in groups.tolist()], dtype=r.dtype,
                                                 device=r.device).view(-1, *([1] * (r.dim() - 1))))
                push = lam_rows[0] * r
            if first:
                self._warn_ratio(push, score, groups, ctx.step)
            return score + push

        return score_with_repulsion

    def on_step(self, batch: ParticleBatch, ctx: StepContext) -> None:
        """Turn this step's pending measurements into repulsion.jsonl lines, one per image."""
        p, self._pending = self._pending, None
        if p is None:
            return
        groups = p["groups"]
        norms = p["score_norm"][0] if p["score_norm"] else None
        last_sq = p["last_sq"][0].cpu() if p["last_sq"] else None
        r_sq = p["r"].detach().flatten(1).double().pow(2).sum(1).cpu() if p["on"] else None
        for img in image_groups(groups):
            rows = (groups == img).nonzero().flatten()
            g = p["diag"]["per_group"].get(img, {})
            lam = p["lam"].get(int(img), 0.0) if isinstance(p["lam"], dict) else p["lam"]
            used = lam if isinstance(p["lam"], dict) else p["w"]  # the ODE-side factor (the original's)
            # the original's norms: over all the image's particles at the last evaluation
            base = math.sqrt(float(last_sq[rows].sum())) if last_sq is not None else None
            r_img = math.sqrt(float(r_sq[rows].sum())) if r_sq is not None else 0.0
            scaled = lam * r_img
            handed = scaled / used if used else 0.0
            # the project's: per-particle norms at σ_i, averaged over the image's particles
            sn = float(norms[rows.to(norms.device)].mean()) if norms is not None else None
            rn = float(p["r"][rows.to(p["r"].device)].flatten(1).norm(dim=1).mean()) if p["on"] else 0.0
            line = {"image_idx": int(img), "step": int(p["step"]), "sigma": float(p["sigma"]),
                    "repulsion_on": bool(p["on"]), "repulsion_scale_used": float(used),
                    "score_base_norm": base, "repulsion_norm": handed, "scaled_repulsion_norm": scaled,
                    "ratio_scaled_to_score": scaled / (base + 1e-12) if base is not None else None,
                    "repulsion_cleared": not p["on"],
                    "mean_pairwise_dino_dist": g.get("mean_pairwise_dist"), "weights_mean": g.get("weights_mean"),
                    "weights_max": g.get("weights_max"), "weights_nonzero_frac": g.get("weights_nonzero_frac"),
                    "repulsion_time_sec": float(p["share"]), "repulsion_multiplier": float(lam),
                    "ratio_per_particle_at_sigma": (lam * rn / sn) if sn else None, "feature": self.cfg.feature}
            self._image(img)["lines"].append({k: finite_or_none(v) if isinstance(v, float) else v
                                              for k, v in line.items()})

    def warm_up(self, model, z: torch.Tensor) -> None:
        """φ forward and backward (ON steps) and forward without gradient (logged OFF steps) at z's rows."""
        if self.cfg.feature == "latent":
            return
        with torch.enable_grad():
            zz = z.clone().requires_grad_(True)
            torch.autograd.grad(self.features(zz).float().sum(), zz)
        with torch.no_grad():
            self.features(z)

    def image_output(self, image_idx: int, record: Dict) -> ImageOutput:
        s = self._images.pop(int(image_idx), None) or self._new_image()
        d = s["dists"]
        summary = {"active_steps": int(s["active_steps"]), "total_time_sec": float(s["total_time_sec"]),
                   "mean_pairwise_dist": (sum(d) / len(d)) if d else None, "ratio_warning": s["ratio_warning"]}
        if self.cfg.target_ratio is not None:  # the constant λ the target ratio amounted to, over ON steps
            lams = s["scales"]
            summary.update({"scale_used_mean": (sum(lams) / len(lams)) if lams else None,
                            "scale_used_min": min(lams, default=None), "scale_used_max": max(lams, default=None),
                            "scale_capped_steps": sum(v >= self.cfg.scale_max for v in lams)})
        return ImageOutput(record={"repulsion": summary}, jsonl={"repulsion": s["lines"]})


    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _new_image() -> Dict[str, Any]:
        return {"lines": [], "active_steps": 0, "total_time_sec": 0.0, "dists": [], "ratio_warning": False,
                "scales": []}

    def _image(self, img: int) -> Dict[str, Any]:
        return self._images.setdefault(int(img), self._new_image())

    def _warn_ratio(self, push: torch.Tensor, score: torch.Tensor, groups: torch.Tensor, step: int) -> None:
        """One warning per image when ||λ·r|| / ||score|| > RATIO_WARN (repulsion dominates the score)."""
        ratio = (push.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp_min(1e-12)).cpu()
        for img in image_groups(groups[ratio > RATIO_WARN]):
            s = self._image(img)
            if not s["ratio_warning"]:
                s["ratio_warning"] = True
                warnings.warn(f"repulsion: image {img}, step {step}: ||λ·r|| / ||score|| = "
                              f"{float(ratio[groups == img].max()):.3g} > {RATIO_WARN:g} "
                              "(repulsion dominates the score; expect collapse)", RuntimeWarning, stacklevel=2)


def repulsion_groups(batch: ParticleBatch) -> torch.Tensor:
    """Group label per row (CPU): the image id; a shadow particle (pruned, running on) gets −1 − image
    id, so the pruned particles of an image repel each other but never the kept ones, and the kept
    particles follow the same path as under slicing.  Logs and statistics cover labels ≥ 0 only."""
    groups = batch.image_ids.detach().cpu()
    pruned = batch.pruned.detach().cpu()
    return torch.where(pruned, -1 - groups, groups) if bool(pruned.any()) else groups


def image_groups(groups: torch.Tensor) -> List[int]:
    """The image ids among `groups` labels, in order of first appearance (shadow groups, < 0, left out)."""
    return [g for g in dict.fromkeys(groups.tolist()) if g >= 0]


def feature_statistics(latents: torch.Tensor, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                       groups: torch.Tensor, eps: float = 1e-6, weights: bool = True,
                       normalizer: str = "rlsd") -> Dict[str, Any]:
    """The kernel diagnostics of `compute_repulsion_gradient` without any force (logged OFF steps).

    `weights=False` keeps only the distance (the OFF steps of a run whose repulsion is on
    above σ_break log its weights only while it acts); the scale-0 baseline logs all."""
    f = feature_fn(latents).reshape(latents.shape[0], -1).detach()
    labels = groups.tolist()
    diag: Dict[str, Any] = {"per_group": {}}
    for lab in dict.fromkeys(labels):
        rows = [k for k, l in enumerate(labels) if l == lab]
        good = [k for k in rows if bool(torch.isfinite(f[k]).all())]
        bad = [k for k in rows if k not in good]
        if len(good) < 2:
            diag["per_group"][lab] = _empty_stats(len(rows), bad)
            continue
        _, _, stats = _group_kernel(f[torch.as_tensor(good, device=f.device)], eps, normalizer)
        if not weights:
            stats = {**stats, "weights_mean": None, "weights_max": None, "weights_nonzero_frac": None}
        diag["per_group"][lab] = {"num_particles": len(rows), "nonfinite_rows": bad, **stats}
    return diag


def summarize(records: List[Dict]) -> Dict[str, Any]:
    """Run totals of repulsion from the image records (all images of the run, whoever computed them)."""
    rep = [r["repulsion"] for r in records if isinstance(r.get("repulsion"), dict)]
    if not rep:
        return {"images": 0}
    lam = [x["scale_used_mean"] for x in rep if x.get("scale_used_mean") is not None]
    extra = {"scale_used_mean": sum(lam) / len(lam)} if lam else {}  # target ratio: mean λ over images
    return {"images": len(rep), "active_steps_per_image": sum(x["active_steps"] for x in rep) / len(rep),
            "total_time_sec": float(sum(x["total_time_sec"] for x in rep)),
            "ratio_warnings": sorted(r["image_idx"] for r in records
                                     if isinstance(r.get("repulsion"), dict) and r["repulsion"].get("ratio_warning")),
            **extra}


def run_totals(c: RepulsionConfig, records: List[Dict]) -> Dict:
    """metrics.json `metadata.repulsion`: the settings and `summarize(records)`."""
    return {"scale": c.scale, "multiplier": c.multiplier, "sigma_break": c.sigma_break, "schedule": c.schedule,
            "feature": c.feature, "dino_preprocess": c.dino.preprocess if c.feature == "dino" else None,
            "latent": c.latent, "normalizer": c.normalizer,
            "log_baseline": c.log_baseline, "target_ratio": c.target_ratio,
            "scale_max": c.scale_max, **summarize(records)}