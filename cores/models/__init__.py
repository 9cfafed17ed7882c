"""Model registry: `build_model(model_cfg, device)` → a `LatentModel` (SPEC §8)."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from .base import LatentModel, as_sigma

__all__ = ["LatentModel", "as_sigma", "register_model", "build_model", "MODELS"]

MODELS: Dict[str, Callable[..., LatentModel]] = {}


def register_model(name: str):
    """Decorator: make a builder `fn(model_cfg, device) -> LatentModel` available as `name`."""

    def deco(fn):
        MODELS[name] = fn
        return fn

    return deco


def _import_builtin() -> None:
    # Imported lazily so that `import cores.models` stays cheap (diffusers is heavy).
    from . import toy  # noqa: F401
    try:
        from . import ldm  # noqa: F401
    except ImportError as err:  # pragma: no cover - only when diffusers is absent
        if "diffusers" not in str(err):
            raise


def build_model(model_cfg: Any, device: torch.device | str = "cpu") -> LatentModel:
    """Build the model named by `model_cfg.name` (Hydra node or dict) on `device`."""
    _import_builtin()
    name = model_cfg["name"]
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; registered: {sorted(MODELS)}")
    model = MODELS[name](model_cfg, torch.device(device))
    return model.eval().requires_grad_(False)
