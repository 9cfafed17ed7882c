"""Shared parts of the benchmark: the model and measurement of a workload, presets, timers."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sampler as S  # noqa: E402
from cores.mcmc import MCMCConfig  # noqa: E402
from cores.operators import get_operator  # noqa: E402
from cores.speed import SpeedConfig, compile_seconds, speed_config  # noqa: E402

NUM_ANNEAL = 50
ODE_STEPS = 2
TINY_CFG = ROOT / "tests" / "fixtures" / "ldm_tiny_ffhq.yaml"
TINY_CKPT = ROOT / "tests" / "fixtures" / "ldm_tiny_ffhq.pt"
MCMC_DEFAULTS = {"langevin": dict(num_steps=100, lr=5e-5, lr_min_ratio=0.01),
                 "hmc": dict(num_steps=65, lr=2.1e-5, lr_min_ratio=0.12, momentum=0.41)}

def build(tiny: bool, device: torch.device):
    """(model, operator, clean image (1,3,R,R)) for the full-size architecture or the tiny fixture."""
    import yaml

    from cores.models.ldm import build_ldm, build_random_ldm

    if tiny:
        cfg = {"name": "ldm", "ldm_config": yaml.safe_load(TINY_CFG.read_text()), "diffusion_path": str(TINY_CKPT)}
        model = build_ldm(cfg, device)
    else:
        cfg = yaml.safe_load((ROOT / "configs" / "model" / "ffhq256ldm.yaml").read_text())
        model = build_random_ldm(cfg, device, seed=0)
    res = model.image_resolution
    operator = get_operator("phase_retrieval", oversample=2.0, resolution=res, sigma=0.05)
    image = None
    demo = sorted((ROOT / "dataset" / "demo-ffhq").glob("*.png"))
    if demo:
        from cores.data import load_image

        image = load_image(demo[0], res)[None].to(device)
    if image is None:
        g = torch.Generator().manual_seed(0)
        image = torch.nn.functional.interpolate(torch.rand(1, 3, res // 8, res // 8, generator=g) * 2 - 1,
                                                size=(res, res), mode="bilinear").to(device)
    return model, operator, image


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mcmc_config(algo: str, steps: int, lr: Optional[float] = None) -> MCMCConfig:
    """MCMC settings of `algo` with `steps` steps (and the workload's Langevin `lr`, when given)."""
    d = dict(MCMC_DEFAULTS[algo])
    d["num_steps"] = steps
    if lr is not None:
        d["lr"] = lr
    return MCMCConfig(algo=algo, **d)


def make_batch(model, operator, image, images: int, particles: int, device, seed: int = 42):
    from cores.rng import make_generator, stream_seed

    ys = [operator.measure(image, make_generator(stream_seed(seed, i, 0, "measurement"), device))
          for i in range(images)]
    return S.initial_batch(model, torch.cat(ys), list(range(images)), particles, seed, 10.0, device)


def load_preset(name: str) -> SpeedConfig:
    """SpeedConfig of configs/speed/<name>.yaml (its `defaults` list resolved: exact first)."""
    import yaml

    d = yaml.safe_load((ROOT / "configs" / "speed" / f"{name}.yaml").read_text()) or {}
    vals: Dict[str, Any] = {}
    for base in d.pop("defaults", []) or []:
        if isinstance(base, str) and base != "_self_":
            vals.update(asdict(load_preset(base)))
    vals.update(d)
    return speed_config(vals)


def reset_compiler() -> None:
    compile_seconds()  # book dynamo's compile time before reset() clears its counters
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - no dynamo
        pass

def timeit(fn: Callable[[], Any], device: torch.device, reps: int, warm: int = 2) -> float:
    """Mean seconds per call (CUDA events on GPU, perf_counter on CPU), after `warm` calls."""
    for _ in range(warm):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0 / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def random_dino(device: torch.device, res: int = 256):
    """DINO ViT-S/16 architecture (timm) with random weights, at res² input (256² for W)."""
    import functools

    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=res, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    return vit.to(device).eval().requires_grad_(False)

def header(device: torch.device) -> Dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "card": name, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32_default": torch.backends.cuda.matmul.allow_tf32}

def write_json(path: Optional[str], data: Dict[str, Any]) -> None:
    """`data` as JSON at `path` (its folder created); nothing without a path (no --json)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str))

def fmt(v: Optional[float], f: str = "{:.2f}") -> str:
    return "n/a" if v is None else f.format(v)

def _ints(text: str) -> List[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]
