"""Config → objects → run → outputs.  `posterior_sample.py` calls `run(cfg)`."""
from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cores.data import ImageFolder
from cores.evaluation import image_record
from cores.mcmc import MCMCConfig
from cores.models import build_model
from cores.operators import get_operator
from cores.outputs import to_uint8
from cores.rng import make_generator, stream_seed
from cores.run_folder import RunFolder
from sampler import DAPSConfig, SamplerHook, initial_batch, latent_daps


class ConfigError(ValueError):
    """A bad setting, reported as one line before any heavy work."""


def resolve_device(cfg: DictConfig, local_rank: int = 0) -> torch.device:
    """The configured device; under torchrun `auto`/`cuda` mean cuda:LOCAL_RANK."""
    if cfg.get("use_tpu", False):
        try:
            import torch_xla.core.xla_model as xm  # noqa: F401
        except ImportError:
            raise ConfigError("use_tpu=true but torch_xla is not installed") from None
        raise ConfigError("use_tpu=true: TPU execution is not implemented yet")
    if cfg.get("deterministic", False):
        set_deterministic()
    dev = str(cfg.get("device", "auto"))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev} requested but CUDA is not available on this machine")
    if dev == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if dev in ("auto", "cuda"):
        return torch.device("cuda", local_rank)
    try:
        return torch.device(dev)
    except RuntimeError:
        raise ConfigError(f"device={dev}: expected auto, cpu, cuda or cuda:N") from None


def set_deterministic() -> None:
    """Deterministic cuDNN/cuBLAS kernels: a GPU result then does not vary between runs or
    processes (CPU results are deterministic anyway).  Must run before the first CUDA call."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # the decoder's attention backward defaults to memory-efficient SDPA, which is not deterministic
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)


def daps_config(sampler_cfg: DictConfig, record_trajectory: bool) -> DAPSConfig:
    a, o, m = sampler_cfg.annealing, sampler_cfg.ode, sampler_cfg.mcmc
    return DAPSConfig(
        num_steps=int(a.num_steps), sigma_max=float(a.sigma_max), sigma_min=float(a.sigma_min),
        timestep=str(a.timestep), ode_steps=int(o.num_steps), ode_sigma_min=float(o.sigma_min),
        mcmc=MCMCConfig(algo=str(m.algo), num_steps=int(m.num_steps), lr=float(m.lr), tau=float(m.tau),
                        lr_min_ratio=float(m.lr_min_ratio), momentum=float(m.momentum),
                        grad_clamp=float(m.grad_clamp)),
        record_trajectory=record_trajectory,
    )


def shard_ids(ids: Sequence[int], shard: int, num_shards: int) -> List[int]:
    """Contiguous block `shard` of `num_shards` (cluster multiruns sweep `shard`, not start/end ids)."""
    n = len(ids)
    lo, hi = n * shard // num_shards, n * (shard + 1) // num_shards
    return list(ids[lo:hi])


def build_extras(cfg: DictConfig, model, device: torch.device, folder: RunFolder):
    """Repulsion module and sampler hooks named by the config (None / [] when off)."""
    repulsion = None
    if float(cfg.repulsion_scale) != 0.0:
        from repulsion import RepulsionModule

        repulsion = RepulsionModule.from_config(cfg, model, device, folder)
    hooks: List[SamplerHook] = []
    if int(cfg.pruning_step) >= 0:
        from cores.pruning import PruningHook

        hooks.append(PruningHook.from_config(cfg, folder))
    if int(cfg.hard_data_consistency) == 1:
        from cores.optimization import OptimizationHook

        hooks.append(OptimizationHook.from_config(cfg, folder))
    return repulsion, hooks


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def measure_images(operator, gt: torch.Tensor, image_ids: Sequence[int], seed: int) -> torch.Tensor:
    """y_i = A(gt_i) + σ_y·n_i with n_i from the image's own stream (independent of batching)."""
    ys = [operator.measure(gt[k:k + 1], make_generator(stream_seed(seed, i, 0, "measurement"), gt.device))
          for k, i in enumerate(image_ids)]
    return torch.cat(ys)


def run_batch(cfg, model, operator, dataset: ImageFolder, image_ids: List[int], daps: DAPSConfig,
              repulsion, hooks, folder: RunFolder, device, progress) -> None:
    x = torch.stack([dataset[i - dataset.start_id] for i in image_ids]).to(device)
    with torch.no_grad():
        gt = model.reference_image(x)
    y = measure_images(operator, gt, image_ids, int(cfg.seed))
    batch = initial_batch(model, y, image_ids, int(cfg.num_samples), int(cfg.seed), daps.sigma_max, device)
    t0 = time.perf_counter()
    timing = latent_daps(model, operator, batch, daps, repulsion=repulsion, hooks=hooks, progress=progress)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        losses = operator.loss(batch.x, batch.y)
    share = 1.0 / len(image_ids)  # images of one batch share its wall time equally
    for k, idx in enumerate(image_ids):
        rows = batch.rows_of_image(idx)
        pids = batch.particle_ids[rows].tolist()
        rec = image_record(idx, batch.x[rows].cpu(), gt[k].cpu(), losses[rows].cpu(), pids,
                           float(cfg.eval.success_psnr), bool(cfg.eval.lpips))
        rec["time_sec"] = elapsed * share
        rec["timing"] = {"per_step_sec": [t * share for t in timing["per_step_sec"]],
                         "batch_images": len(image_ids)}
        rec["nan_events"] = [e for e in batch.nan_events if e["image_idx"] == idx]
        for hook in hooks + ([repulsion] if repulsion is not None else []):
            if hasattr(hook, "image_summary"):
                rec.update(hook.image_summary(idx))
        for hook in hooks:  # e.g. pruning regret, which needs the final per-particle PSNRs
            if hasattr(hook, "finalize_record"):
                hook.finalize_record(rec)
        if cfg.save_traj and batch.trajectory:
            save_trajectory(folder, "trajectory", model, batch.trajectory, rows, idx, pids,
                            int(cfg.traj_every), device)
        folder.write_image(rec, batch.x[rows].cpu(), pids, gt[k].cpu(), y[k].cpu(), bool(cfg.save_samples))


def save_trajectory(folder: RunFolder, sub: str, model, trajectory: List[torch.Tensor], rows,
                    image_idx: int, particle_ids: List[int], every: int, device) -> None:
    """Decode the recorded z0y latents (only here, only every `every` steps) into one strip per particle."""
    picked = trajectory[::max(1, every)] + ([trajectory[-1]] if (len(trajectory) - 1) % max(1, every) else [])
    with torch.no_grad():
        for j, p in enumerate(particle_ids):
            r = int(rows[j])
            frames = [to_uint8(model.decode(z[r:r + 1].to(device))[0]) for z in picked]
            folder.write_trajectory(sub, image_idx, p, frames)


def run(cfg: DictConfig) -> Dict:
    """Run the configured job; returns the metrics dict written to metrics.json.

    Every check that can fail runs before the folder is touched or a model is built.  Under
    torchrun each rank takes its block of the images still to do; rank 0 prepares the folder
    and, once every rank is done, writes metrics.json and the grid.
    """
    from cores import distributed
    from cores.resume import prepare_folder
    from cores.validation import validate_config, validate_inputs

    validate_config(cfg)
    rank = distributed.env_info()
    device = resolve_device(cfg, rank.local_rank)
    folder = RunFolder(Path(cfg.save_dir) / str(cfg.name))
    dataset = ImageFolder(cfg.data.root, int(cfg.data.resolution), int(cfg.data.start_id), cfg.data.end_id)
    validate_inputs(cfg, dataset)
    ids = shard_ids(dataset.indices, int(cfg.shard), int(cfg.num_shards))
    if not ids:
        raise ConfigError(f"shard={cfg.shard}, num_shards={cfg.num_shards}: the {len(dataset)} image(s) of "
                          f"data.start_id={cfg.data.start_id}..data.end_id={cfg.data.end_id} leave this shard empty")
    distributed.setup(device)
    try:
        verdict = None
        if rank.is_main:
            try:
                verdict = ("ok", prepare_folder(cfg, folder, ids))
            except ConfigError as err:
                verdict = ("error", str(err))
        verdict = distributed.broadcast(verdict)
        if verdict[0] == "error":
            raise ConfigError(verdict[1])
        todo = shard_ids(verdict[1], rank.rank, rank.world_size)
        start, t_start = _dt.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
        model, repulsion, hooks = None, None, []
        if todo:
            model, repulsion, hooks = sample_images(cfg, todo, dataset, folder, device, rank.is_main, start)
        meta = run_metadata(cfg, device, start, hooks, repulsion)
        meta["metadata"]["wall_time_sec"] = time.perf_counter() - t_start
        metas = distributed.gather(meta)  # also waits until every rank has written its records
        if rank.is_main:
            metrics = write_summary(folder, merge_metadata(metas), int(cfg.grid_max_images))
            print(summary_table(metrics, folder.root))
        distributed.barrier()
        if not rank.is_main:
            metrics = json.loads((folder.root / "metrics.json").read_text())
        return metrics
    finally:
        distributed.teardown()


def sample_images(cfg: DictConfig, todo: List[int], dataset: ImageFolder, folder: RunFolder,
                  device: torch.device, show_progress: bool, start: str):
    """Build the model and sample `todo` batch by batch, writing each image as it finishes."""
    model = build_model(cfg.model, device)
    from cores.speed import apply_speed

    apply_speed(model, cfg.get("speed"))  # speed switches (all off = the exact path)
    if model.image_resolution != int(cfg.data.resolution):
        raise ConfigError(f"data.resolution={cfg.data.resolution} but model {cfg.model.name} renders "
                          f"{model.image_resolution} px images")
    operator = get_operator(**OmegaConf.to_container(cfg.task, resolve=True))
    daps = daps_config(cfg.sampler, bool(cfg.save_traj))
    repulsion, hooks = build_extras(cfg, model, device, folder)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bs = max(1, int(cfg.batch_size))
    with tqdm(total=len(todo) * daps.num_steps, desc=str(cfg.name), unit="img·step", file=sys.stderr,
              disable=not show_progress) as pbar:
        for k in range(0, len(todo), bs):
            chunk = todo[k:k + bs]
            run_batch(cfg, model, operator, dataset, chunk, daps, repulsion, hooks, folder, device,
                      lambda n, c=len(chunk): pbar.update(n * c))
            if show_progress:  # one writer of the intermediate summary (rank 0)
                write_summary(folder, run_metadata(cfg, device, start, hooks, repulsion), int(cfg.grid_max_images))
    return model, repulsion, hooks


def numerics_summary(records: List[Dict]) -> Dict:
    """Counts of non-finite events (MCMC resets, non-finite final particles) over the run."""
    nan_images = [r["image_idx"] for r in records if r.get("nan_events")]
    bad_images = [r["image_idx"] for r in records if r.get("non_finite_particles")]
    return {
        "nan_events": sum(len(r.get("nan_events", [])) for r in records),
        "images_with_nan_events": nan_images,
        "non_finite_particles": sum(len(r.get("non_finite_particles", [])) for r in records),
        "images_with_non_finite_particles": bad_images,
    }


def hook_summaries(records: List[Dict]) -> Dict:
    """Run totals of repulsion / pruning / optimisation recomputed from every image record on disk,
    so a resumed, sharded or multi-rank run reports all its images, not one process's share.
    Settings (scale, lr, …) stay those of the hooks' own `run_summary()`."""
    out: Dict = {}
    rep = [r["repulsion"] for r in records if isinstance(r.get("repulsion"), dict)]
    if rep:
        out["repulsion"] = {"images": len(rep),
                            "active_steps_per_image": sum(x["active_steps"] for x in rep) / len(rep),
                            "total_time_sec": float(sum(x["total_time_sec"] for x in rep))}
    pru = [r["pruning"] for r in records if isinstance(r.get("pruning"), dict)]
    if pru:
        from cores.evaluation import wilson_ci

        regret = [bool(p["pruning_regret"]) for p in pru if p.get("pruning_regret") is not None]
        out["pruning"] = {"num_pruned_images": sum(bool(p.get("did_prune")) for p in pru)}
        if regret:
            out["pruning"].update({"regret_images": sum(regret), "regret_rate": sum(regret) / len(regret),
                                   "regret_rate_ci95": wilson_ci(sum(regret), len(regret))})
    opt = [r["optimization"] for r in records if isinstance(r.get("optimization"), dict)]
    if opt:
        iters = [i for o in opt for i in o["final_iters"]]
        accepted = sum(bool(a) for o in opt for a in o["accepted_mask"])
        reasons: Dict[str, int] = {}
        for o in opt:
            for why in o["termination_reasons"]:
                reasons[why] = reasons.get(why, 0) + 1
        out["optimization"] = {"num_images": len(opt), "num_particles": len(iters), "total_iters": sum(iters),
                               "mean_iters": sum(iters) / max(1, len(iters)), "num_accepted": accepted,
                               "accepted_rate": accepted / len(iters) if iters else None,
                               "total_time_sec": float(sum(o["total_time_seconds"] for o in opt)),
                               "termination_counts": reasons}
    return out


def _merge_summaries(meta: Dict, totals: Dict) -> Dict:
    merged = dict(meta)
    for name, block in totals.items():
        merged[name] = {**(meta.get(name) or {}), **block}
    return merged


def write_summary(folder: RunFolder, extra: Dict, grid_max_images: int) -> Dict:
    """metrics.json and the grid from every record on disk, rewritten until no other job (a
    concurrent shard writing the same folder) added a record meanwhile, so the last writer wins
    with the complete set."""
    from cores.resume import records_signature

    for _ in range(20):
        sig = records_signature(folder)
        records = folder.records()
        metadata = _merge_summaries(extra["metadata"], hook_summaries(records))
        metrics = folder.write_metrics({**extra, "metadata": metadata, "numerics": numerics_summary(records)}, records)
        folder.write_grid(grid_max_images, records=records)
        if records_signature(folder) == sig:
            break
    return metrics


def merge_metadata(per_rank: List[Dict]) -> Dict:
    """One `vram`/`metadata` block from every rank's (rank 0's metadata, peaks = max over ranks)."""
    merged = json.loads(json.dumps(per_rank[0]))
    if len(per_rank) == 1:
        return merged
    peaks = [m["vram"]["peak_memory_mb"] for m in per_rank if m["vram"]["peak_memory_mb"] is not None]
    merged["vram"]["peak_memory_mb"] = max(peaks) if peaks else None
    for m in per_rank[1:]:
        for k, v in m["vram"]["segments"].items():
            merged["vram"]["segments"][k] = max(v, merged["vram"]["segments"].get(k, v))
    merged["metadata"]["world_size"] = len(per_rank)
    merged["metadata"]["wall_time_sec"] = max(m["metadata"]["wall_time_sec"] for m in per_rank)
    merged["metadata"]["ranks"] = [{"rank": r, "device": m["metadata"]["device"],
                                    "gpu_name": m["metadata"]["gpu_name"],
                                    "peak_memory_mb": m["vram"]["peak_memory_mb"],
                                    "wall_time_sec": m["metadata"]["wall_time_sec"]}
                                   for r, m in enumerate(per_rank)]
    return merged


def run_metadata(cfg, device, start: str, hooks, repulsion) -> Dict:
    segments: Dict[str, float] = {}
    meta: Dict = {
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "start_time": start,
        "end_time": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    for obj in hooks + ([repulsion] if repulsion is not None else []):
        segments.update(getattr(obj, "vram_segments", {}) or {})
        if hasattr(obj, "run_summary"):
            meta.update(obj.run_summary())
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    if peak is not None and segments:  # hooks reset the peak counter at their segment boundaries
        peak = max([peak] + [v for v in segments.values() if v is not None])
    return {"vram": {"peak_memory_mb": peak, "segments": segments}, "metadata": meta}


def summary_table(metrics: Dict, root: Path) -> str:
    s = metrics["summary"]

    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    bp = s["best_psnr"]
    lines = [
        f"\nResults in {root}",
        "| images | best PSNR | mean-of-means PSNR | selected PSNR | best SSIM | best LPIPS | success | both orient. | s/image |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['num_images']} | {f(bp['mean'])} ± {f(bp['std'])} | {f(s['mean_of_mean_psnr'])} | "
        f"{f(s['selected_psnr_mean'])} | {f(s['best_ssim_mean'], '{:.3f}')} | {f(s['best_lpips_mean'], '{:.3f}')} | "
        f"{f(s['success_rate'], '{:.0%}')} | {f(s['both_orientations_rate'], '{:.0%}')} | "
        f"{f(s['time_per_image_sec'], '{:.1f}')} |",
    ]
    num = metrics.get("numerics") or {}
    if num.get("nan_events") or num.get("non_finite_particles"):
        lines.append(f"warning: {num['nan_events']} NaN/inf MCMC reset(s) in image(s) {num['images_with_nan_events']}, "
                     f"{num['non_finite_particles']} non-finite final particle(s) (metrics.json: numerics)")
    return "\n".join(lines)
