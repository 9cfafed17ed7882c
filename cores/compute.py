"""Network evaluations per image (`compute`) and their FLOP estimate (`tflop`), counted where the
networks are called, so every sampler and hook that calls them is counted by the same mechanism.

Unit: rows.  One particle through a network once = 1, a call on B rows = B.  The networks:

    unet              the denoiser: one per `model.tweedie` call (PF-ODE Euler steps, repulsion's z0hat)
    decoder_forward   `model.decode` (MCMC gradients, pruning, pixel/DINO features, optimisation, final decode)
    decoder_backward  a backward through a decode: counted when the gradient reaches the decode's output
    encoder           `model.encode`
    dino_forward      the DINO ViT (`DinoFeatureExtractor.forward`: repulsion and diversity-pruning features)
    dino_backward     a backward through it (repulsion's vector–Jacobian product)

Interface:

    instrument_model(model)            once per model, after `apply_speed`: tweedie/decode/encode report
    counted_call(net, fn, x, *args)    any other network reports through this (DINO does, in `forward`)
    meter = ComputeMeter()
    with meter.counting(lambda: batch.image_ids):  # the image of each row the networks see
        latent_daps(...)
    meter.take(image_idx) -> {"compute": {net: rows}, "tflop": float | None}

Outside `counting` nothing is counted (ground-truth encodes, evaluation, trajectory frames, speed
warm-ups).  A network called inside it on a number of rows other than the owners' raises: a count
is exact or it is an error.  Counting adds no device sync: calls are tallied per owner tensor and
attributed to images once, in `settle()` (which `take` calls).

FLOPs: per row, measured once per network and row shape with `torch.utils.flop_counter` on the
exact (eager, fp32) path at one row, then multiplied by the rows counted.  That is exact for
these networks (convolutions, matmuls and attention act on each image separately) and counts
what the FLOP counter knows (matmul, convolution, attention kernels; elementwise work, norms and
resampling count as zero; CPU attention is not counted).  A network whose measured FLOPs are zero
(the toy prior: interpolation and elementwise arithmetic only) makes the image's `tflop` null.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["NETWORKS", "ComputeMeter", "instrument_model", "counted_call", "run_compute"]

NETWORKS = ("unet", "decoder_forward", "decoder_backward", "encoder", "dino_forward", "dino_backward")
#: network -> (forward field, backward field or None)
_FIELDS = {"unet": ("unet", None), "decoder": ("decoder_forward", "decoder_backward"),
           "encoder": ("encoder", None), "dino": ("dino_forward", "dino_backward")}
#: model methods that `apply_speed` may shadow; the FLOP probe runs with them removed (exact path)
_SHADOWABLE = ("decode", "eps_model", "tweedie", "encode")

_ACTIVE: List["ComputeMeter"] = []  # the meter counting now (innermost last)

Key = Tuple[str, Tuple[int, ...]]   # (field, row shape)


class _Probe:
    """One row of a call, kept to measure the network's FLOPs per row later (outside the loop)."""

    def __init__(self, exact: Callable, x: torch.Tensor, args: tuple, kwargs: dict, backward: bool):
        B = x.shape[0]
        one = lambda a: a[:1] if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == B else a  # noqa: E731
        self.exact, self.x = exact, x[:1].detach().clone()
        self.args, self.kwargs = tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}
        self.backward = backward

    def flops(self) -> Tuple[int, int]:
        """(forward, backward) FLOPs of one row."""
        from torch.utils.flop_counter import FlopCounterMode

        x = self.x.clone().requires_grad_(self.backward)
        with torch.set_grad_enabled(self.backward):
            with FlopCounterMode(display=False) as fwd:
                out = self.exact(x, *self.args, **self.kwargs)
            with FlopCounterMode(display=False) as bwd:
                if self.backward and out.requires_grad:
                    torch.autograd.grad(out.float().sum(), x, allow_unused=True)
        return int(fwd.get_total_flops()), int(bwd.get_total_flops())


class ComputeMeter:
    """Network evaluations in row units per image, and FLOPs per row per (network, row shape)."""

    def __init__(self) -> None:
        self._owners: Optional[Callable[[], torch.Tensor]] = None
        self._calls: Dict[Tuple[str, Tuple[int, ...], int], List[Any]] = {}  # (field, shape, id) -> [owners, calls]
        self._probes: Dict[Tuple[str, Tuple[int, ...]], _Probe] = {}         # (net, shape) -> probe
        self.flops_per_row: Dict[Key, int] = {}
        self._rows: Dict[int, Counter] = {}                                  # image -> Counter[(field, shape)]

    @contextlib.contextmanager
    def counting(self, owners: Callable[[], torch.Tensor]) -> Iterator["ComputeMeter"]:
        """Count every network call meanwhile; `owners()` gives the image id of each row it sees.
        Nestable: an inner scope (a call on a subset of rows) restores the outer owners on exit."""
        outer, self._owners = self._owners, owners
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.pop()
            self._owners = outer

    # ------------------------------------------------------------------ recording
    def record(self, net: str, x: torch.Tensor, out: Any, exact: Callable, args: tuple, kwargs: dict) -> None:
        owners = self._owners()
        if owners.shape[0] != x.shape[0]:
            raise ValueError(f"compute: {net} called on {x.shape[0]} rows while the batch has {owners.shape[0]}; "
                             "count such a call inside its own `counting` scope")
        shape = tuple(x.shape[1:])
        fwd, bwd = _FIELDS[net]
        self._tally(fwd, shape, owners)
        if (net, shape) not in self._probes and (fwd, shape) not in self.flops_per_row:
            self._probes[(net, shape)] = _Probe(exact, x, args, kwargs, backward=bwd is not None)
        if bwd is not None and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self._tally(bwd, shape, owners))

    def _tally(self, field: str, shape: Tuple[int, ...], owners: torch.Tensor) -> None:
        entry = self._calls.setdefault((field, shape, id(owners)), [owners, 0])
        entry[1] += 1

    # ------------------------------------------------------------------ results
    def settle(self) -> None:
        """Attribute the tallied calls to images (one device read per owner tensor) and measure the
        FLOPs of networks met for the first time."""
        for (field, shape, _), (owners, calls) in self._calls.items():
            for img, n in Counter(owners.tolist()).items():
                self._rows.setdefault(int(img), Counter())[(field, shape)] += n * calls
        self._calls.clear()
        probes, self._probes = self._probes, {}
        for (net, shape), probe in probes.items():
            f, b = probe.flops()
            fwd, bwd = _FIELDS[net]
            self.flops_per_row[(fwd, shape)] = f
            if bwd is not None:
                self.flops_per_row[(bwd, shape)] = b

    def take(self, image_idx: int) -> Dict[str, Any]:
        """The image's record fields `compute` and `tflop` (its counts are then forgotten)."""
        self.settle()
        rows = self._rows.pop(int(image_idx), Counter())
        compute = {k: 0 for k in NETWORKS}
        for (field, _), n in rows.items():
            compute[field] += int(n)
        return {"compute": compute, "tflop": self.tflop(rows)}

    def tflop(self, rows: Counter) -> Optional[float]:
        """Σ rows × FLOPs per row / 10¹²; None when a network that ran has no countable FLOPs."""
        total = 0
        for key, n in rows.items():
            per_row = self.flops_per_row.get(key, 0)
            if n and per_row <= 0:
                return None
            total += n * per_row
        return total / 1e12


# ---------------------------------------------------------------------- call sites
def counted_call(net: str, fn: Callable, x: torch.Tensor, *args: Any, exact: Optional[Callable] = None,
                 **kwargs: Any) -> Any:
    """`fn(x, *args, **kwargs)`, reported to the meter counting now (if any) as `net` on x's rows.
    `exact` (default `fn`) is what the FLOP probe runs: the eager fp32 path of the same network."""
    out = fn(x, *args, **kwargs)
    if _ACTIVE:
        _ACTIVE[-1].record(net, x, out, exact or fn, args, kwargs)
    return out


class _Counted:
    """A model method that reports its calls (installed as an instance attribute)."""

    def __init__(self, model, name: str, net: str):
        self.model, self.name, self.net = model, name, net
        self.inner = getattr(model, name)  # the bound method, or the speed preset's replacement

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return counted_call(self.net, self.inner, x, *args, exact=self.exact, **kwargs)

    def exact(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The class's own method with every speed replacement removed for the call."""
        saved = {k: self.model.__dict__.pop(k) for k in _SHADOWABLE if k in self.model.__dict__}
        try:
            return getattr(type(self.model), self.name)(self.model, x, *args, **kwargs)
        finally:
            self.model.__dict__.update(saved)


def instrument_model(model) -> None:
    """Make `tweedie` (UNet), `decode` and `encode` report their calls; idempotent.  Install after
    `apply_speed` (its `restore()` would remove these too)."""
    for name, net in (("tweedie", "unet"), ("decode", "decoder"), ("encode", "encoder")):
        if not isinstance(model.__dict__.get(name), _Counted) and hasattr(model, name):
            model.__dict__[name] = _Counted(model, name, net)


def run_compute(records: List[Dict]) -> Dict[str, Any]:
    """Run sums for metrics.json's summary: `compute` per network and `tflop` (null when any image's is)."""
    recs = [r for r in records if isinstance(r.get("compute"), dict)]
    compute = {k: sum(int(r["compute"].get(k, 0)) for r in recs) for k in NETWORKS} if recs else None
    tflops = [r.get("tflop") for r in recs]
    tflop = float(sum(tflops)) if recs and all(t is not None for t in tflops) else None
    return {"compute": compute, "tflop": tflop}
