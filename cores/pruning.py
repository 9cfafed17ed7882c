"""Once-only particle pruning as a sampler hook (Exp2).

The hook fires once per image, at `step == pruning_step` or at the σ_break
transition `prev_sigma ≥ σ_break > sigma` (σ_break = `repulsion_sigma_break`),
whichever comes first, repulsion on or not — the original study's rule
(yuzzznh/diffusion_phase_retrieval DAPS/sampler.py lines 603-613 at b967b2b).
With the default poly-7 grid and σ_break 1.0 the transition is step 30, so
`pruning_step=40` prunes at step 30.  `pruning.jsonl`'s `trigger` says which fired.

Criteria, evaluated per image on the current `z0y` (after MCMC):
- `loss`: keep the `keep` particles with the smallest measurement loss
  L(D_vae(z0y), y) (`topk(largest=False)`).
- `diversity`: candidates are the particles with loss ≤ (1 + tol)·best loss
  (tol = `pruning_diversity_tol`, default 0.5, i.e. within 50 % of the best);
  keep the best-loss particle, then greedily the candidate farthest (largest
  minimum Euclidean distance) from those already kept, in feature space
  (decoded pixels; DINO CLS features when `repulsion_feature=dino` and the
  weights exist; latent when `repulsion_feature=latent`).  If fewer than
  `keep` particles are candidates, the rest are filled in loss order.  Twin
  modes have (nearly) equal loss but lie far apart in pixel space, which is
  what this rule is meant to keep.

Modes (every mode prunes the same particles, and the kept ones follow exactly the same path
in all three: per-particle streams, row-independent steps):
- `slicing` cuts every per-row tensor of the batch (`ParticleBatch.keep`), so later steps run
  on fewer particles; the pruned ones are gone from the outputs.
- `masking` freezes the pruned particles at their z0y of the prune step (`ParticleBatch.freeze`):
  afterwards they do no ODE, MCMC or gradient work (nor hard data consistency), and they are
  decoded with the others at the end.  Same compute as slicing plus one final decode per
  pruned particle.
- `shadow` flags them and lets them run on to the end, to measure what pruning gave up; they
  form their own repulsion group, so they never push the kept particles.
In masking and shadow the record lists every particle with a `pruned` flag; loss selection
(`selected_idx`) picks among the kept ones, the oracle `best_idx` among all, and the pruning
regret says whether the best final particle (by PSNR) was a pruned one.

Refill (`pruning_refill`, slicing only; TDP-style branching): right after the
cut, each image is brought back to the particle count it had, by cloning the
survivors round-robin in kept order (best first).  Clone k of an image with n
particles gets id n + k and a fresh random stream of (seed, image, id)
(`ParticleBatch.refill`), so it leaves its parent with the next noise draw and
the run stays batch-, shard- and resume-invariant.  `pruning.jsonl` and the
record then carry `parents` (new id → parent id, keys as strings, as JSON
keeps them) and `batch_refilled`.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from cores.config import PruningConfig
from cores.evaluation import finite_or_none
from cores.vram import VramMeter
from sampler import ImageOutput, ParticleBatch, SamplerHook, StepContext

__all__ = ["PruningConfig", "PruningHook", "select_by_loss", "select_by_diversity", "pruning_regret", "summarize",
           "run_totals"]

FeatureFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (z0y, decoded x, image ids) -> (B, D)


def select_by_loss(losses: torch.Tensor, keep: int) -> List[int]:
    """Indices of the `keep` smallest losses, smallest first (non-finite losses rank last)."""
    l = torch.nan_to_num(losses.double(), nan=math.inf)
    return torch.topk(l, min(keep, l.numel()), largest=False).indices.tolist()


def select_by_diversity(losses: torch.Tensor, features: torch.Tensor, keep: int, tol: float) -> List[int]:
    """Best-loss particle first, then greedy farthest-point among losses ≤ (1+tol)·best; fill by loss."""
    order = select_by_loss(losses, losses.numel())
    l = torch.nan_to_num(losses.double(), nan=math.inf)
    best = float(l[order[0]])
    if not math.isfinite(best):
        return order[:keep]
    limit = best * (1.0 + tol) if best >= 0 else best
    cand = [i for i in order if float(l[i]) <= limit]
    f = features.flatten(1).double()
    chosen = [order[0]]
    rest = [i for i in cand if i != order[0]]
    while len(chosen) < keep and rest:
        dist = torch.cdist(f[rest], f[chosen]).min(dim=1).values  # distance to the nearest kept one
        pick = rest[int(torch.argmax(dist))]                     # argmax: first (= lowest loss) on ties
        chosen.append(pick)
        rest.remove(pick)
    chosen += [i for i in order if i not in chosen][:keep - len(chosen)]
    return chosen


def pruning_regret(psnr: Sequence[Optional[float]], particle_ids: Sequence[int],
                   pruned_ids: Sequence[int]) -> Dict:
    """Regret of a masking/shadow-mode prune: did the pruned particles include the best final one (by PSNR)?"""
    vals = {int(p): v for p, v in zip(particle_ids, psnr) if v is not None and math.isfinite(v)}
    pruned = {int(p) for p in pruned_ids}
    kept_v = [v for p, v in vals.items() if p not in pruned]
    pruned_v = [v for p, v in vals.items() if p in pruned]
    if not vals:
        return {"pruning_regret": None, "best_kept_psnr": None, "best_pruned_psnr": None,
                "pruning_regret_db": None}
    best_kept = max(kept_v) if kept_v else None
    best_pruned = max(pruned_v) if pruned_v else None
    regret = best_pruned is not None and (best_kept is None or best_pruned > best_kept)
    if not regret:
        gap: Optional[float] = 0.0
    else:
        gap = best_pruned - best_kept if best_kept is not None else None
    return {"pruning_regret": bool(regret), "best_kept_psnr": best_kept, "best_pruned_psnr": best_pruned,
            "pruning_regret_db": gap}


class PruningHook(SamplerHook):
    """Prune each image of the batch once (see module doc)."""

    def __init__(self, cfg: PruningConfig, feature_fn: Optional[FeatureFn] = None, vram: Optional[VramMeter] = None):
        self.cfg = cfg
        self.feature_fn = feature_fn
        self.vram = vram or VramMeter(torch.device("cpu"))
        self.lines: Dict[int, Dict] = {}              # image_idx -> its pruning.jsonl line (until handed over)
        self._time: Dict[int, float] = {}             # image_idx -> seconds spent pruning it
        self._pruned_traj: Dict[int, Dict[int, List[torch.Tensor]]] = {}  # image -> particle -> z0y latents
        self._did_prune = False                       # for the batch in flight

    @classmethod
    def from_config(cls, cfg: PruningConfig, vram: Optional[VramMeter] = None) -> Optional["PruningHook"]:
        if not cfg.on:
            return None
        feature_fn = _dino_feature_fn(cfg.dino_weights_path, cfg.dino_preprocess) if cfg.criterion == "diversity" and cfg.feature == "dino" else None
        if cfg.feature == "dino" and feature_fn is None:
            cfg.feature = "pixel"
        return cls(cfg, feature_fn, vram)

    # ------------------------------------------------------------------ trigger
    def trigger(self, ctx: StepContext) -> Optional[str]:
        """'step' / 'transition' when this step prunes (step wins when both hold), else None."""
        if ctx.step == self.cfg.step:
            return "step"
        b = self.cfg.sigma_break
        if b is not None and ctx.prev_sigma is not None and ctx.prev_sigma >= b > ctx.sigma:
            return "transition"
        return None

    # ------------------------------------------------------------------ hook points
    def on_step(self, batch: ParticleBatch, ctx: StepContext) -> None:
        if ctx.step == 0:
            self._did_prune = False
        if self._did_prune:
            return
        trigger = self.trigger(ctx)
        if trigger is None:
            return
        self._did_prune = True
        t0 = time.perf_counter()
        self.vram.mark("pre_pruning")
        with torch.no_grad():
            x = ctx.model.decode(batch.z0y)
            losses = ctx.operator.loss(x, batch.y).detach()
            feats = self._features(batch.z0y, x, batch.image_ids) if self.cfg.criterion == "diversity" else None
        keep_rows: List[int] = []
        refill = self.cfg.refill and self.cfg.mode == "slicing"
        clones: List[Tuple[int, int, int]] = []       # (image, new particle id, parent id)
        images = list(dict.fromkeys(batch.image_ids.tolist()))
        for img in images:
            rows = batch.rows_by_particle(img)
            l = losses[rows].cpu()
            if self.cfg.criterion == "loss":
                local = select_by_loss(l, self.cfg.keep)
            else:
                local = select_by_diversity(l, feats[rows].cpu(), self.cfg.keep, self.cfg.diversity_tol)
            pids = batch.particle_ids[rows].tolist()
            kept_ids = [pids[i] for i in local]
            if refill:
                clone_ids = list(range(max(pids) + 1, max(pids) + 1 + len(pids) - len(kept_ids)))
                parents = {c: kept_ids[k % len(kept_ids)] for k, c in enumerate(clone_ids)}
                clones += [(img, c, p) for c, p in parents.items()]
            pruned = [i for i in range(len(rows)) if i not in local]
            keep_rows += [int(rows[i]) for i in sorted(local)]
            self.lines[img] = {
                "image_idx": int(img), "prune_step": ctx.step, "prev_sigma": ctx.prev_sigma,
                "curr_sigma": ctx.sigma, "repulsion_sigma_break": self.cfg.sigma_break,
                "losses": [finite_or_none(v) for v in l.tolist()], "kept_indices": kept_ids,
                "pruned_indices": [pids[i] for i in pruned], "kept_losses": [finite_or_none(l[i]) for i in local],
                "batch_before": len(pids),
                "batch_after": len(pids) if self.cfg.mode == "shadow" else len(kept_ids),
                "did_prune": True, "trigger": trigger, "mode": self.cfg.mode,
            }
            if refill:
                self.lines[img].update({"parents": {str(c): p for c, p in parents.items()},
                                        "batch_refilled": len(pids)})
            if self.cfg.save_traj and batch.trajectory:
                self._pruned_traj[img] = {pids[i]: [t[int(rows[i])] for t in batch.trajectory] for i in pruned}
                self.lines[img]["pruned_trajectories"] = [
                    f"trajectory_pruned/{img:05d}_pruned{pids[i]:02d}.png" for i in pruned]
        share = (time.perf_counter() - t0) / max(1, len(images))
        for img in images:
            self._time[img] = share
        pruned_rows = sorted(set(range(len(batch))) - set(keep_rows))
        if self.cfg.mode == "slicing":
            batch.keep(sorted(keep_rows))
        elif self.cfg.mode == "masking":
            batch.freeze(pruned_rows)
        else:  # shadow: flagged, running on
            batch.pruned[torch.as_tensor(pruned_rows, dtype=torch.long, device=batch.pruned.device)] = True
        if clones:
            row = {(int(i), int(p)): r for r, (i, p) in enumerate(zip(batch.image_ids.tolist(),
                                                                       batch.particle_ids.tolist()))}
            batch.refill([row[(img, parent)] for img, _, parent in clones], [c for _, c, _ in clones])

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:
        self.vram.mark("post_pruning" if self._did_prune else "pre_pruning")
        for img in dict.fromkeys(batch.image_ids.tolist()):
            if img not in self.lines or not self._did_prune:
                n = len(batch.rows_of_image(img))
                self.lines[img] = {
                    "image_idx": int(img), "prune_step": None, "prev_sigma": None, "curr_sigma": None,
                    "repulsion_sigma_break": self.cfg.sigma_break, "losses": [], "kept_indices": [],
                    "pruned_indices": [], "kept_losses": [], "batch_before": n, "batch_after": n,
                    "did_prune": False, "trigger": None, "mode": self.cfg.mode,
                }

    def image_output(self, image_idx: int, record: Dict) -> ImageOutput:
        line = self.lines.pop(int(image_idx), None)
        if line is None:
            return ImageOutput()
        keys = ("did_prune", "trigger", "mode", "prune_step", "kept_indices", "pruned_indices", "batch_before",
                "batch_after")
        keys += tuple(k for k in ("parents", "batch_refilled") if k in line)
        summary = {k: line[k] for k in keys} | {"criterion": self.cfg.criterion,
                                                 "prune_time_sec": self._time.pop(int(image_idx), 0.0)}
        if line["did_prune"]:
            if self.cfg.mode != "slicing":
                summary.update(pruning_regret(record["psnr"], record["particle_ids"], line["pruned_indices"]))
            else:  # slicing cannot know what the pruned particles would have become
                summary.update({"pruning_regret": None, "best_kept_psnr": None, "best_pruned_psnr": None,
                                "pruning_regret_db": None})
        traj = self._pruned_traj.pop(int(image_idx), {})
        return ImageOutput(record={"pruning": summary}, jsonl={"pruning": [line]},
                           trajectories={"trajectory_pruned": traj} if traj else {})


    def warm_up(self, model, z: torch.Tensor) -> None:
        """The diversity criterion's feature network at z's rows (the decode is the sampler's warm-up)."""
        if self.feature_fn is not None:
            with torch.no_grad():
                self.feature_fn(z, model.decode(z), torch.zeros(z.shape[0], dtype=torch.long, device=z.device))

    # ------------------------------------------------------------------ helpers
    def _features(self, z0y: torch.Tensor, x: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        if self.feature_fn is not None:
            return self.feature_fn(z0y, x, image_ids)
        return (z0y if self.cfg.feature == "latent" else x).flatten(1)


def summarize(records: List[Dict]) -> Dict:
    """Run totals of pruning from the image records: images pruned, time, regret (masking/shadow modes)."""
    from cores.evaluation import wilson_ci

    pru = [r["pruning"] for r in records if isinstance(r.get("pruning"), dict)]
    out: Dict = {"num_pruned_images": sum(bool(p.get("did_prune")) for p in pru),
                 "prune_time_sec": float(sum(p.get("prune_time_sec") or 0.0 for p in pru))}
    regret = [bool(p["pruning_regret"]) for p in pru if p.get("pruning_regret") is not None]
    if regret:
        out.update({"regret_images": sum(regret), "regret_rate": sum(regret) / len(regret),
                    "regret_rate_ci95": wilson_ci(sum(regret), len(regret))})
    return out


def run_totals(c: PruningConfig, records: List[Dict]) -> Dict:
    """metrics.json `metadata.pruning`: the settings and `summarize(records)`."""
    return {"mode": c.mode, "criterion": c.criterion, "keep": c.keep, "step": c.step,
            **({"refill": True} if c.refill else {}),
            "diversity_tol": c.diversity_tol, "feature": c.feature,
            "sigma_break_trigger": c.sigma_break, **summarize(records)}



def _dino_feature_fn(weights_path: str, preprocess: str = "raw") -> Optional[FeatureFn]:
    """DINO CLS features of the decoded images, with repulsion's DINO input (`dino.preprocess`, decided
    per image), or None (pixel fallback, one warning) without weights."""
    from cores.dino import DinoFeatureExtractor

    ext = DinoFeatureExtractor(weights_path=weights_path, preprocess=preprocess)
    try:
        ext.ensure_available()
    except (FileNotFoundError, OSError) as err:
        warnings.warn(f"pruning_criterion=diversity: DINO weights unavailable ({str(err).splitlines()[0][:120]}); "
                      "using pixel-space distances")
        return None
    return lambda z0y, x, image_ids: ext(x.float(), image_ids)
