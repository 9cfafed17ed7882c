"""Model registry: `build_model(model_cfg, device)` → a `LatentModel`."""
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


_BUILTIN = {"toy": "toy", "ldm": "ldm", "ldm_random": "ldm"}  # name -> module, imported on first use (diffusers is heavy)


def _import_builtin(name: str) -> None:
    if name in _BUILTIN and name not in MODELS:
        import importlib

        importlib.import_module(f"{__name__}.{_BUILTIN[name]}")


def build_model(model_cfg: Any, device: torch.device | str = "cpu") -> LatentModel:
    """Build the model named by `model_cfg.name` (Hydra node or dict) on `device`."""
    name = model_cfg["name"]
    _import_builtin(name)
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; registered: {sorted(MODELS)}")
    model = MODELS[name](model_cfg, torch.device(device))
    return model.eval().requires_grad_(False)
