"""Config → objects → loop → records → files.  `posterior_sample.py` calls `run(cfg)`.

1. `build_run_config` + `validate_config`: typed settings, one-line errors, before any work.
2. `prepare_folder`: the run folder (resume, shards, ranks).
3. `build_model`, `get_operator`, `build_hooks`: the objects.
4. per batch of images: `latent_daps` (the loop) → `image_record` + each hook's
   `image_output` (record fields, log lines, trajectories) → `RunFolder` writes them.
5. `write_summary`: metrics.json and the grid rebuilt from every record on disk.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cores.compute import ComputeMeter, instrument_model
from cores.config import DAPSConfig, RunConfig, build_run_config
from cores.data import ImageFolder
from cores.errors import ConfigError
from cores.evaluation import finite_or_none, image_record, psnr
from cores.models import build_model
from cores.operators import get_operator
from cores.outputs import frame_with_label, to_uint8, trajectory_label
from cores.rng import make_generator, stream_seed
from cores.run_folder import RunFolder
from cores.speed import compile_seconds
from cores.vram import VramMeter, merge_vram
from cores.warmup import run_row_counts, warm_up_run
from sampler import SamplerHook, initial_batch, latent_daps

__all__ = ["ConfigError", "run", "build_hooks", "measure_images", "shard_ids", "resolve_device", "write_summary"]


def resolve_device(config: RunConfig, local_rank: int = 0) -> torch.device:
    """The configured device; under torchrun `auto`/`cuda` mean cuda:LOCAL_RANK; `use_tpu` → XLA."""
    if config.use_tpu:
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise ConfigError("use_tpu=true needs torch_xla (pip install torch_xla), which is not installed") from None
        return torch.device(xm.xla_device())
    if config.deterministic:
        set_deterministic()
    dev = config.device
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
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # the decoder's attention backward defaults to memory-efficient SDPA, which is not deterministic
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)


def shard_ids(ids: Sequence[int], shard: int, num_shards: int) -> List[int]:
    """Contiguous block `shard` of `num_shards` (cluster multiruns sweep `shard`, not start/end ids)."""
    n = len(ids)
    lo, hi = n * shard // num_shards, n * (shard + 1) // num_shards
    return list(ids[lo:hi])


def build_hooks(config: RunConfig, model, device: torch.device, vram: VramMeter) -> List[SamplerHook]:
    """The research additions that are on, in loop order (none: plain DAPS)."""
    from cores.optimization import OptimizationHook
    from cores.pruning import PruningHook
    from repulsion import RepulsionHook

    if config.sampler.name == "resample":  # ReSample carries its own data consistency; no additions
        from cores.resample import ResampleLog

        return [ResampleLog(config.sampler)]
    hooks = [RepulsionHook.from_config(config.repulsion, model, device),
             PruningHook.from_config(config.pruning, vram),
             OptimizationHook.from_config(config.optimization, vram)]
    return [h for h in hooks if h is not None]


def run_sampler(model, operator, batch, cfg, hooks: Sequence[SamplerHook] = (), callback=None) -> None:
    """The configured sampler: `sampler.latent_daps` or the ReSample baseline
    (`cores.resample.resample`: same inputs, batch and callback), by `sampler.name`."""
    if cfg.name == "resample":
        from cores.resample import resample

        return resample(model, operator, batch, cfg, hooks=hooks, callback=callback)
    return latent_daps(model, operator, batch, cfg, hooks=hooks, callback=callback)


def feature_totals(config: RunConfig, records: List[Dict]) -> Dict:
    """Run totals of each addition that is on: its settings and its own `summarize(records)`."""
    from cores import optimization, pruning
    import repulsion

    parts = [("repulsion", config.repulsion.needs_hook, repulsion, config.repulsion),
             ("pruning", config.pruning.on, pruning, config.pruning),
             ("optimization", config.optimization.enabled, optimization, config.optimization)]
    return {name: module.run_totals(cfg, records) for name, on, module, cfg in parts if on}


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


def trajectory_steps(recorded: int, every: int) -> List[int]:
    """The steps a trajectory strip shows: every `every`-th of the `recorded` steps, and the last."""
    every = max(1, every)
    steps = list(range(0, recorded, every))
    return steps + ([recorded - 1] if recorded and (recorded - 1) % every else [])


def step_sigmas(annealing) -> List[float]:
    """σ of each annealing step (the noise level step i starts from), as the sampler computes it."""
    from cores.scheduler import EDMScheduler

    a = annealing
    return [float(v) for v in EDMScheduler(a.num_steps, a.sigma_max, a.sigma_min, a.timestep).sigma_steps]


def decode_frames(model, latents: List[torch.Tensor], every: int, device,
                  sigmas: Optional[Sequence[float]] = None) -> List:
    """Decode recorded z0y latents (every `every`-th step and the last) into uint8 frames; with
    `sigmas` (σ per step) each frame carries its step and σ in a band under it."""
    steps = trajectory_steps(len(latents), every)
    with torch.no_grad():
        frames = [to_uint8(model.decode(latents[s].unsqueeze(0).to(device))[0]) for s in steps]
    if sigmas is None:
        return frames
    return [frame_with_label(f, trajectory_label(s, sigmas[s])) for f, s in zip(frames, steps)]


class StepTimer:
    """The sampler callback of a run: per-step wall time, time per phase, progress bar, XLA step marker.
    Every timestamp is the sampler's own, taken after the GPU finished the stage."""

    def __init__(self, pbar: tqdm, images: int, xla_mark_step=None):
        self.pbar, self.images, self.mark_step = pbar, images, xla_mark_step
        self.per_step_sec: List[float] = []
        self.step_end: Dict[int, float] = {}   # step -> time its "step" stage ended
        self.marks: Dict[str, float] = {}      # "begin", "end_hooks", "end" -> time
        self._t0 = 0.0

    def __call__(self, info: Dict) -> None:
        if info["stage"] in ("begin", "end_hooks", "end"):
            self.marks[info["stage"]] = info["time"]
        if info["stage"] == "begin":
            self._t0 = info["time"]
        elif info["stage"] == "step":
            if self.mark_step is not None:
                self.mark_step()
            self.per_step_sec.append(info["time"] - self._t0)
            self.step_end[info["step"]] = self._t0 = info["time"]
            self.pbar.update(self.images)
            if self.pbar.total and self.pbar.n >= self.pbar.total:
                self.pbar.close()  # done: a warning printed after this must not redraw a finished bar

    def segments(self, pruning: bool, prune_step: Optional[int], optimization: bool) -> Dict[str, float]:
        """Seconds per phase of the batch (record field `time_segments`, before sharing among images).

        `optimization`: the end hooks, from the last step to just before the final decode (hard data
        consistency).  The rest, begin → end, is `sampling`; with pruning on it is split at the end of
        the prune step (the pruning itself included) into `pre_pruning` and `post_pruning` (the later
        steps and the final decode; 0 when the prune never fired)."""
        begin, end = self.marks["begin"], self.marks["end"]
        last = self.step_end[max(self.step_end)] if self.step_end else begin
        out: Dict[str, float] = {}
        opt = self.marks["end_hooks"] - last if optimization else 0.0
        sampling = end - begin - opt
        if pruning:
            pre = self.step_end[prune_step] - begin if prune_step in self.step_end else sampling
            out.update(pre_pruning=pre, post_pruning=sampling - pre)
        else:
            out["sampling"] = sampling
        if optimization:
            out["optimization"] = opt
        return out


def run_batch(config: RunConfig, model, operator, dataset: ImageFolder, image_ids: List[int],
              hooks: List[SamplerHook], folder: RunFolder, device, pbar: tqdm,
              meter: Optional[ComputeMeter] = None) -> None:
    """Sample one batch of images and write each image's files and record (with its time per phase
    and, when `meter` counts, its network evaluations)."""
    x = torch.stack([dataset[i - dataset.start_id] for i in image_ids]).to(device)
    warn_foreign_images(config, model, dataset, image_ids, x)
    with torch.no_grad():
        gt = model.reference_image(x)
    y = measure_images(operator, gt, image_ids, config.seed)
    batch = initial_batch(model, y, image_ids, config.num_samples, config.seed, config.sampler.initial_sigma, device)
    timer = StepTimer(pbar, len(image_ids), _xla_mark_step() if config.use_tpu else None)
    meter = meter or ComputeMeter()
    t0 = time.perf_counter()
    with meter.counting(lambda: batch.image_ids):  # every network call is counted for its rows' images
        run_sampler(model, operator, batch, config.sampler, hooks=hooks, callback=timer)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        losses = operator.loss(batch.x, batch.y)
    share = 1.0 / len(image_ids)  # images of one batch share its wall time equally
    for k, idx in enumerate(image_ids):
        rows = batch.rows_of_image(idx)
        pids = batch.particle_ids[rows].tolist()
        ev = config.eval
        rec = image_record(idx, batch.x[rows].cpu(), gt[k].cpu(), losses[rows].cpu(), pids, ev.success_psnr,
                           ev.lpips, orientation_margin_db=ev.orientation_margin_db, measurement_numel=y[k].numel(),
                           pruned=batch.pruned[rows].tolist(), lpips_net=ev.lpips_net)
        rec["time_sec"] = elapsed * share
        rec.update(meter.take(idx))
        rec["timing"] = {"per_step_sec": [t * share for t in timer.per_step_sec], "batch_images": len(image_ids)}
        rec["nan_events"] = [e for e in batch.nan_events if e["image_idx"] == idx]
        rec.update(dataset.source(idx) or {})  # resume checks the data folder against these
        logs, frames = collect_outputs(config, model, hooks, batch, idx, rec, gt[k].cpu(), device)
        prune_step = (rec.get("pruning") or {}).get("prune_step")  # the batch's, as its pruning hook reported
        segments = timer.segments(config.pruning.on, prune_step, config.optimization.enabled)
        rec["time_segments"] = {name: sec * share for name, sec in segments.items()}
        folder.write_logs_and_trajectories(idx, logs, frames)
        folder.write_image(rec, batch.x[rows].cpu(), pids, gt[k].cpu(), y[k].cpu(), config.save_samples)


def warn_foreign_images(config: RunConfig, model, dataset: ImageFolder, image_ids: List[int],
                        x: torch.Tensor) -> None:
    """One warning per run when the toy prior meets an image that is not one of its components."""
    rows = model.foreign_rows(x)
    if rows:
        from cores.console import warn

        f = dataset.files[image_ids[rows[0]] - dataset.start_id]
        warn(f"{f} is not one of the toy prior's components (model.prior_images): the toy prior knows only "
             "its own images, so expect low PSNR (about 16 dB) on this and other such images; use a real model",
             key=("toy prior foreign images", str(config.save_dir), config.name))


def collect_outputs(config: RunConfig, model, hooks: List[SamplerHook], batch, idx: int, rec: Dict,
                    gt: torch.Tensor, device) -> Tuple[Dict[str, List[Dict]], Dict[str, Dict[int, List]]]:
    """Every hook's output for image `idx`: record fields (merged into `rec`), log lines, and the
    decoded trajectory frames (survivors' `trajectory/` when `save_traj`, and the hooks' own)."""
    rows = batch.rows_of_image(idx).tolist()
    logs: Dict[str, List[Dict]] = {}
    frames: Dict[str, Dict[int, List]] = {}
    # σ labels for DAPS' annealing steps; ReSample's DDIM noise level depends on the model's ᾱ: no label
    sigmas = step_sigmas(config.sampler.annealing) if config.save_traj and isinstance(config.sampler, DAPSConfig) \
        else None
    if config.save_traj and batch.trajectory:
        frames["trajectory"] = {int(batch.particle_ids[r]): decode_frames(model, [t[r] for t in batch.trajectory],
                                                                         config.traj_every, device, sigmas)
                                for r in rows}
    for hook in hooks:
        out = hook.image_output(idx, rec)
        rec.update(out.record)
        for name, lines in out.jsonl.items():
            logs.setdefault(name, []).extend(lines)
        for sub, per_particle in out.trajectories.items():
            frames[sub] = {p: decode_frames(model, z, config.traj_every, device, sigmas)
                           for p, z in per_particle.items()}
        for name, images in out.scored_images.items():  # a non-finite image scores null
            ok = torch.isfinite(images).flatten(1).all(dim=1).tolist()
            rec[f"psnr_{name}"] = [finite_or_none(v) if good else None
                                   for v, good in zip(psnr(torch.nan_to_num(images), gt).tolist(), ok)]
    return logs, frames


def _xla_mark_step():
    import torch_xla.core.xla_model as xm

    return xm.mark_step


def run(cfg: DictConfig) -> Dict:
    """Run the configured job; returns the metrics dict written to metrics.json.

    Every check that can fail runs before the folder is touched or a model is built.  Under
    torchrun each rank takes its block of the images still to do; rank 0 prepares the folder
    and, once every rank is done, writes metrics.json and the grid.
    """
    from cores import distributed
    from cores.lock import ConfigLock, RunLock
    from cores.resume import check_sources, prepare_folder
    from cores.validation import validate_config, validate_inputs

    config = build_run_config(cfg)
    validate_config(config)
    rank = distributed.env_info()
    device = resolve_device(config, rank.local_rank)
    folder = RunFolder(Path(config.save_dir) / config.name)
    d = config.data
    dataset = ImageFolder(d.root, d.resolution, d.start_id, d.end_id)
    validate_inputs(config, dataset)
    ids = shard_ids(dataset.indices, config.shard, config.num_shards)
    if not ids:
        raise ConfigError(f"shard={config.shard}, num_shards={config.num_shards}: the {len(dataset)} image(s) of "
                          f"data.start_id={d.start_id}..data.end_id={d.end_id} leave this shard empty")
    distributed.setup(device)
    lock = RunLock(folder.root, config.shard, config.num_shards)
    try:
        verdict = None
        if rank.is_main:  # rank 0 holds the folder's lock for every rank of this job
            try:
                with ConfigLock(folder.root):
                    lock.acquire()
                    check_sources(folder, dataset)
                    verdict = ("ok", prepare_folder(cfg, folder, ids))
                    lock.announce()
            except ConfigError as err:
                lock.release()
                verdict = ("error", str(err))
        verdict = distributed.broadcast(verdict)
        if verdict[0] == "error":
            raise ConfigError(verdict[1])
        todo = shard_ids(verdict[1], rank.rank, rank.world_size)
        start, t_start = _dt.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
        compile_before = compile_seconds()  # a sweep's jobs share one process: count this run's only
        vram = VramMeter(device)
        if todo:
            sample_images(config, todo, dataset, folder, device, vram, rank.is_main, start, compile_before)
        meta = run_metadata(device, start, vram, compile_before)
        meta["metadata"]["wall_time_sec"] = time.perf_counter() - t_start
        metas = distributed.gather(meta)  # also waits until every rank has written its records
        if rank.is_main:
            metrics = write_summary(folder, config, merge_metadata(metas))
            from cores.console import format_summary

            print(format_summary(metrics, folder.root))
        distributed.barrier()
        if not rank.is_main:
            metrics = json.loads((folder.root / "metrics.json").read_text())
        return metrics
    finally:
        lock.release()
        distributed.teardown()


def sample_images(config: RunConfig, todo: List[int], dataset: ImageFolder, folder: RunFolder,
                  device: torch.device, vram: VramMeter, show_progress: bool, start: str,
                  compile_before: float = 0.0) -> None:
    """Build the objects and sample `todo` batch by batch, writing each image as it finishes."""
    from cores.speed import apply_speed

    model = build_model(config.model, device)
    apply_speed(model, config.speed)  # speed switches (all off = the exact path)
    instrument_model(model)  # network evaluations per image (cores/compute.py)
    if model.image_resolution != config.data.resolution:
        raise ConfigError(f"data.resolution={config.data.resolution} but model {config.model.get('name')} renders "
                          f"{model.image_resolution} px images")
    operator = get_operator(**config.task)
    hooks = build_hooks(config, model, device, vram)
    meter = ComputeMeter()
    bs = config.batch_size
    # cuDNN benchmark tunes each new shape on first use: every shape of the run is made now, its trials'
    # peak reported as vram.autotune_peak_mb, so the run's peak and segments are the sampler's (cores/warmup.py)
    warm_up_run(model, hooks, run_row_counts(config.num_samples, bs, len(todo), config.pruning), device, vram,
                nograd_rows=[1] if config.save_traj else [])
    vram.start()
    steps = config.sampler.loop_steps
    # the bar is transient (leave=False) and closes at its last step: a warning printed under a finished
    # bar would redraw it, showing its last state two or three times; one final line says what was done
    t_bar = time.perf_counter()
    with tqdm(total=len(todo) * steps, desc=config.name, unit="img·step", file=sys.stderr,
              disable=not show_progress, leave=False) as pbar:
        for k in range(0, len(todo), bs):
            run_batch(config, model, operator, dataset, todo[k:k + bs], hooks, folder, device, pbar, meter)
            if show_progress:  # one writer of the intermediate summary (rank 0)
                write_summary(folder, config, run_metadata(device, start, vram, compile_before))
    elapsed = time.perf_counter() - t_bar
    if show_progress and todo:
        print(f"{config.name}: {len(todo)} image(s), {len(todo) * steps} img·step in {elapsed:.1f} s", file=sys.stderr)


def numerics_summary(records: List[Dict]) -> Dict:
    """Counts of non-finite events (MCMC resets, non-finite final particles) over the run."""
    return {
        "nan_events": sum(len(r.get("nan_events", [])) for r in records),
        "images_with_nan_events": [r["image_idx"] for r in records if r.get("nan_events")],
        "non_finite_particles": sum(len(r.get("non_finite_particles", [])) for r in records),
        "images_with_non_finite_particles": [r["image_idx"] for r in records if r.get("non_finite_particles")],
    }


def write_summary(folder: RunFolder, config: RunConfig, extra: Dict) -> Dict:
    """metrics.json and the grid from every record on disk, rewritten until no other job (a
    concurrent shard writing the same folder) added a record meanwhile, so the last writer wins
    with the complete set."""
    from cores.resume import records_signature

    for _ in range(20):
        sig = records_signature(folder)
        records = folder.records()
        metadata = {**extra["metadata"], **feature_totals(config, records)}
        if "wall_time_sec" in metadata and records:  # the job's wall clock per image (ranks run in parallel);
            # summary.total_time_sec sums each image's own sampling time, i.e. over ranks
            metadata["wall_time_per_image_sec"] = metadata["wall_time_sec"] / len(records)
        metrics = folder.write_metrics({**extra, "metadata": metadata, "numerics": numerics_summary(records)}, records)
        folder.write_grid(config.grid_max_images, records=records)
        if records_signature(folder) == sig:
            break
    return metrics


def merge_metadata(per_rank: List[Dict]) -> Dict:
    """One `vram`/`metadata` block from every rank's (rank 0's metadata, peaks = max over ranks)."""
    merged = json.loads(json.dumps(per_rank[0]))
    if len(per_rank) == 1:
        return merged
    merged["vram"].update(merge_vram([m["vram"] for m in per_rank]))
    merged["metadata"]["world_size"] = len(per_rank)
    merged["metadata"]["wall_time_sec"] = max(m["metadata"]["wall_time_sec"] for m in per_rank)
    merged["metadata"]["wall_time_sum_over_ranks_sec"] = sum(m["metadata"]["wall_time_sec"] for m in per_rank)
    merged["metadata"]["ranks"] = [{"rank": r, "device": m["metadata"]["device"],
                                    "gpu_name": m["metadata"]["gpu_name"],
                                    "peak_memory_mb": m["vram"]["peak_memory_mb"],
                                    "peak_reserved_mb": m["vram"].get("peak_reserved_mb"),
                                    "wall_time_sec": m["metadata"]["wall_time_sec"]}
                                   for r, m in enumerate(per_rank)]
    return merged


def run_metadata(device: torch.device, start: str, vram: VramMeter, compile_before: float = 0.0) -> Dict:
    """Run-level metadata; `compile_sec` is the compile time since `compile_before` (the process
    total when the run began), so a job of a sweep run in one process is not charged its
    predecessors' compiles."""
    meta: Dict = {
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "start_time": start,
        "end_time": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "compile_sec": max(0.0, compile_seconds() - compile_before),
    }
    return {"vram": vram.summary(), "metadata": meta}

