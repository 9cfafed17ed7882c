"""Once-only particle pruning as a sampler hook (SPEC §4.2, Exp2).

The hook fires once per image, at the first annealing step where
`step == pruning_step` or the σ_break transition `prev_sigma ≥ σ_break > sigma`
happens (whichever comes first; with the default poly-7 grid and σ_break 1.0
the transition is step 30, so `pruning_step > 30` prunes at 30).

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

Modes: `slicing` cuts every per-row tensor of the batch (`ParticleBatch.keep`),
so later steps run on fewer particles; `masking` only flags the particles, and
`finalize_record` reports the pruning regret (did the flagged particles include
the one that ended best by PSNR?).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from cores.outputs import append_jsonl
from sampler import ParticleBatch, SamplerHook, StepContext

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z0y, decoded x) -> (B, D)


@dataclass
class PruningConfig:
    step: int = 29
    keep: int = 2
    mode: str = "slicing"          # slicing | masking
    criterion: str = "loss"        # loss | diversity
    diversity_tol: float = 0.5     # diversity: candidates within (1 + tol)·best loss
    sigma_break: Optional[float] = 1.0  # None: no transition trigger
    feature: str = "pixel"         # diversity feature space: pixel | latent | dino
    save_traj: bool = False
    traj_every: int = 5


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
    """Regret of a masking-mode prune: did the flagged particles include the best final one (by PSNR)?"""
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
    """Prune each image of the batch once (see module doc); writes `pruning.jsonl` via `folder`."""

    def __init__(self, cfg: PruningConfig, folder=None, feature_fn: Optional[FeatureFn] = None):
        if cfg.mode not in ("slicing", "masking"):
            raise ValueError(f"pruning_mode={cfg.mode!r}: expected slicing or masking")
        if cfg.criterion not in ("loss", "diversity"):
            raise ValueError(f"pruning_criterion={cfg.criterion!r}: expected loss or diversity")
        self.cfg = cfg
        self.folder = folder
        self.feature_fn = feature_fn
        self.records: Dict[int, Dict] = {}       # image_idx -> pruning.jsonl line
        self.vram_segments: Dict[str, float] = {}
        self._did_prune = False                  # for the batch in flight
        self._pending_traj: List[tuple] = []     # (image_idx, particle_ids, trajectory, rows) to save at on_end
        self._regret: List[bool] = []
        self.prune_time_sec = 0.0

    @classmethod
    def from_config(cls, cfg, folder=None) -> "PruningHook":
        feat = str(cfg.get("repulsion_feature", "pixel"))
        feature_fn = None
        if str(cfg.pruning_criterion) == "diversity" and feat == "dino":
            feature_fn = _dino_feature_fn(cfg)
        brk = cfg.get("repulsion_sigma_break", None)
        return cls(PruningConfig(
            step=int(cfg.pruning_step), keep=int(cfg.pruning_keep), mode=str(cfg.pruning_mode),
            criterion=str(cfg.pruning_criterion), diversity_tol=float(cfg.get("pruning_diversity_tol", 0.5)),
            sigma_break=None if brk is None else float(brk),
            feature="latent" if feat == "latent" else ("dino" if feature_fn is not None else "pixel"),
            save_traj=bool(cfg.get("save_traj", False)), traj_every=int(cfg.get("traj_every", 5)),
        ), folder, feature_fn)

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
            self._pending_traj = []
        if self._did_prune:
            return
        trigger = self.trigger(ctx)
        if trigger is None:
            return
        self._did_prune = True
        t0 = time.perf_counter()
        self._record_vram("pre_pruning", batch.zt.device, reset=True)
        with torch.no_grad():
            x = ctx.model.decode(batch.z0y)
            losses = ctx.operator.loss(x, batch.y).detach()
            feats = self._features(batch.z0y, x) if self.cfg.criterion == "diversity" else None
        keep_rows: List[int] = []
        for img in _unique_in_order(batch.image_ids.tolist()):
            rows = _rows_by_particle(batch, img)
            l = losses[rows].cpu()
            if self.cfg.criterion == "loss":
                local = select_by_loss(l, self.cfg.keep)
            else:
                local = select_by_diversity(l, feats[rows].cpu(), self.cfg.keep, self.cfg.diversity_tol)
            pids = batch.particle_ids[rows].tolist()
            kept_ids = [pids[i] for i in local]
            pruned_ids = [p for p in pids if p not in kept_ids]
            keep_rows += [int(rows[i]) for i in sorted(local)]
            self.records[img] = {
                "image_idx": int(img), "prune_step": ctx.step, "prev_sigma": ctx.prev_sigma,
                "curr_sigma": ctx.sigma, "repulsion_sigma_break": self.cfg.sigma_break,
                "losses": [_num(v) for v in l.tolist()], "kept_indices": kept_ids,
                "pruned_indices": pruned_ids, "kept_losses": [_num(l[i]) for i in local],
                "batch_before": len(pids),
                "batch_after": len(kept_ids) if self.cfg.mode == "slicing" else len(pids),
                "did_prune": True, "trigger": trigger, "mode": self.cfg.mode,
            }
            if self.cfg.save_traj and batch.trajectory:
                prow = [int(rows[i]) for i in range(len(rows)) if i not in local]
                self._pending_traj.append((img, [pids[i] for i in range(len(rows)) if i not in local],
                                           [t[prow] for t in batch.trajectory]))
        if self.cfg.mode == "slicing":
            batch.keep(sorted(keep_rows))
        self.prune_time_sec += time.perf_counter() - t0

    def on_end(self, batch: ParticleBatch, ctx: StepContext) -> None:
        self._record_vram("post_pruning" if self._did_prune else "pre_pruning", batch.zt.device, reset=True)
        for img in _unique_in_order(batch.image_ids.tolist()):
            if img not in self.records or not self._did_prune:
                n = len(batch.rows_of_image(img))
                self.records[img] = {
                    "image_idx": int(img), "prune_step": None, "prev_sigma": None, "curr_sigma": None,
                    "repulsion_sigma_break": self.cfg.sigma_break, "losses": [], "kept_indices": [],
                    "pruned_indices": [], "kept_losses": [], "batch_before": n, "batch_after": n,
                    "did_prune": False, "trigger": None, "mode": self.cfg.mode,
                }
            if self.folder is not None:
                append_jsonl(self.folder.jsonl("pruning"), self.records[img])
        if self._pending_traj and self.folder is not None:
            from cores.pipeline import save_trajectory

            for img, pids, traj in self._pending_traj:
                save_trajectory(self.folder, "trajectory_pruned", ctx.model, traj, list(range(len(pids))),
                                img, pids, self.cfg.traj_every, batch.zt.device)
        self._pending_traj = []

    # ------------------------------------------------------------------ pipeline interface
    def image_summary(self, image_idx: int) -> Dict:
        rec = self.records.get(int(image_idx))
        if rec is None:
            return {}
        return {"pruning": {k: rec[k] for k in ("did_prune", "trigger", "mode", "prune_step", "kept_indices",
                                                  "pruned_indices", "batch_before", "batch_after")}
                | {"criterion": self.cfg.criterion}}

    def finalize_record(self, rec: Dict) -> None:
        """Add the pruning regret to a finished image's record (masking mode; slicing cannot know it)."""
        p = rec.get("pruning")
        if not p or not p.get("did_prune"):
            return
        if self.cfg.mode != "masking":
            p.update({"pruning_regret": None, "best_kept_psnr": None, "best_pruned_psnr": None,
                      "pruning_regret_db": None})
            return
        p.update(pruning_regret(rec["psnr"], rec["particle_ids"], p["pruned_indices"]))
        if p["pruning_regret"] is not None:
            self._regret.append(bool(p["pruning_regret"]))

    def run_summary(self) -> Dict:
        out = {"pruning": {"mode": self.cfg.mode, "criterion": self.cfg.criterion, "keep": self.cfg.keep,
                           "step": self.cfg.step, "diversity_tol": self.cfg.diversity_tol,
                           "feature": self.cfg.feature,
                           "num_pruned_images": sum(r["did_prune"] for r in self.records.values()),
                           "prune_time_sec": self.prune_time_sec}}
        if self._regret:
            from cores.evaluation import wilson_ci

            n, k = len(self._regret), sum(self._regret)
            out["pruning"].update({"regret_images": k, "regret_rate": k / n, "regret_rate_ci95": wilson_ci(k, n)})
        return out

    # ------------------------------------------------------------------ helpers
    def _features(self, z0y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.feature_fn is not None:
            return self.feature_fn(z0y, x)
        return (z0y if self.cfg.feature == "latent" else x).flatten(1)

    def _record_vram(self, name: str, device: torch.device, reset: bool) -> None:
        """Peak since the last reset → segment `name` (max over batches); CUDA only."""
        if device.type != "cuda":
            return
        mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
        self.vram_segments[name] = max(mb, self.vram_segments.get(name, 0.0))
        if reset:
            torch.cuda.reset_peak_memory_stats(device)


def _num(v) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def _unique_in_order(values: Sequence[int]) -> List[int]:
    seen: List[int] = []
    for v in values:
        if int(v) not in seen:
            seen.append(int(v))
    return seen


def _rows_by_particle(batch: ParticleBatch, image_idx: int) -> List[int]:
    rows = batch.rows_of_image(image_idx).tolist()
    return sorted(rows, key=lambda r: int(batch.particle_ids[r]))


def _dino_feature_fn(cfg) -> Optional[FeatureFn]:
    """DINO CLS features of the decoded images, or None (pixel fallback, one warning) without weights."""
    from cores.dino import DinoFeatureExtractor

    d = cfg.get("dino", {}) or {}
    ext = DinoFeatureExtractor(weights_path=str(d.get("weights_path", "checkpoints/dino_deitsmall16_pretrain.pth")),
                               resize=d.get("resize", None), normalize=bool(d.get("normalize", False)))
    try:
        ext.ensure_available()
    except (FileNotFoundError, OSError) as err:
        warnings.warn(f"pruning_criterion=diversity: DINO weights unavailable ({str(err).splitlines()[0][:120]}); "
                      "using pixel-space distances")
        return None
    return lambda z0y, x: ext(x.float())
