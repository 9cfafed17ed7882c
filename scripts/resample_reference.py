"""Reference values of ReSample's own code on the tiny fixture LDM → tests/fixtures/resample_ref.pt.

ReSample's `ldm/models/diffusion/ddim.py`, `ldm/modules/diffusionmodules/util.py` and
`ldm_inverse/condition_methods.py` are exported from a clone of soominkwon/resample into a
temporary folder outside this repository (never committed) and imported as they are, with
light stubs for imports they do not use here (einops, skimage, ldm.util, scripts.utils).  The
tiny fixture LDM (tests/fixtures/ldm_tiny_ffhq.*, loaded with the project's loader) is wrapped
in an adapter with the interface their DDIMSampler expects (`apply_model` under no_grad,
`decode_first_stage`, `differentiable_decode_first_stage`, `encode_first_stage`, CompVis'
float32 `betas`/`alphas_cumprod`).  Their script sets no seed, so every draw of theirs
(`torch.randn`, `torch.randn_like`) is fed from recorded tensors while their code runs; the
test feeds the port the same tensors.  Every case runs their code on one particle at a time
(batch 1); the test runs the port on both particles in one batch.

Command (the fixture in the repository was made with it):

    git clone https://github.com/soominkwon/resample /tmp/resample   # or any clone / bare mirror
    .venv/bin/python scripts/resample_reference.py --repo /tmp/resample

Their optimisers are called with their own keyword arguments where the defaults would make a
CPU test slow (`max_iters`, `eps`: recorded in the fixture's `settings`).

`ddim_schedule_eta` holds their per-step σ_t and √(1 − ᾱ_t) at η > 0 exactly as `p_sample_ddim`
reads them (`torch.full(..., sigmas[index])`, float32); `--schedule-only` adds that entry to an
existing fixture without rerunning the other cases.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIX = REPO / "tests" / "fixtures"
THEIR_FILES = ["ldm/models/diffusion/ddim.py", "ldm/modules/diffusionmodules/util.py",
               "ldm_inverse/condition_methods.py"]
PARTICLES = 2
SCHEDULE_ETAS = (0.5, 1.0)   # η of the `ddim_schedule_eta` case
SETTINGS = {  # what the cases pass to their code (and the test to the port)
    "ddim_steps": 50, "ddim_eta": 0.0, "step_index": 37,
    "latent_max_iters": 12, "latent_eps": 1e-3,
    "pixel_max_iters": 150, "pixel_eps_ratio": 0.3,   # pixel eps² = ratio × particle 0's first loss: one row stops early
    "run_pixel_max_iters": 20, "run_latent_max_iters": 6,
    "measurement_sigma": 0.05, "seed": 1234,
}


def git_show(repo: Path, path: str) -> str:
    git_dir = repo if (repo / "HEAD").is_file() and not (repo / ".git").exists() else repo / ".git"
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def git_commit(repo: Path) -> str:
    git_dir = repo if (repo / "HEAD").is_file() and not (repo / ".git").exists() else repo / ".git"
    return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def import_theirs(repo: Path, tmp: Path):
    """Their modules from `repo` (exported to `tmp`), with stubs for what they import but we do not run."""
    for rel in THEIR_FILES:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(git_show(repo, rel))
    for pkg in ["ldm", "ldm/models", "ldm/models/diffusion", "ldm/modules", "ldm/modules/diffusionmodules",
                "ldm_inverse"]:
        (tmp / pkg / "__init__.py").touch()
    stubs = {
        "einops": {"repeat": lambda *a, **k: None},
        "skimage": {}, "skimage.metrics": {"peak_signal_noise_ratio": lambda *a, **k: None},
        "ldm.util": {"instantiate_from_config": lambda *a, **k: None},
        "scripts": {}, "scripts.utils": {"clear_color": lambda x: x},
    }
    for name, attrs in stubs.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
    sys.path.insert(0, str(tmp))
    import ldm.models.diffusion.ddim as ddim
    import ldm_inverse.condition_methods as cm
    return ddim, cm


class TheirModelAdapter:
    """The tiny project LDM with the attributes and methods their DDIMSampler calls."""

    def __init__(self, model, util):
        self.m = model
        s = model.spec
        betas = util.make_beta_schedule("linear", s.timesteps, linear_start=s.linear_start, linear_end=s.linear_end)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)   # CompVis DDPM.register_schedule
        to_torch = partial(torch.tensor, dtype=torch.float32)
        self.num_timesteps = int(s.timesteps)
        self.betas = to_torch(betas)
        self.alphas_cumprod = to_torch(alphas_cumprod)
        self.alphas_cumprod_prev = to_torch(np.append(1.0, alphas_cumprod[:-1]))
        self.device = torch.device("cpu")

    @torch.no_grad()
    def apply_model(self, x, t, cond):
        return self.m.eps_model(x, t.float())

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.m.decode(z)

    def differentiable_decode_first_stage(self, z):
        return self.m.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.m.encode(x)


class Draws:
    """Recorded N(0, I) tensors handed out in order (patches torch.randn / randn_like)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.k = 0

    def next(self, shape):
        t = self.tensors[self.k]
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"draw {self.k}: recorded shape {tuple(t.shape)}, their code asks {tuple(shape)}")
        self.k += 1
        return t.clone()

    def __enter__(self):
        self._randn, self._randn_like = torch.randn, torch.randn_like
        torch.randn = lambda *shape, **kw: self.next(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape)
        torch.randn_like = lambda x, **kw: self.next(x.shape)
        return self

    def __exit__(self, *exc):
        torch.randn, torch.randn_like = self._randn, self._randn_like


def count_draws(fn, gen_shape) -> int:
    """How many draws `fn` makes (run with fresh normal draws, results discarded)."""
    n = [0]
    real_randn, real_like = torch.randn, torch.randn_like

    def fake(*shape, **kw):
        n[0] += 1
        return real_randn(*gen_shape)

    torch.randn, torch.randn_like = fake, lambda x, **kw: (n.__setitem__(0, n[0] + 1), real_like(x))[1]
    try:
        fn()
    finally:
        torch.randn, torch.randn_like = real_randn, real_like
    return n[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, type=Path, help="a clone (or bare mirror) of soominkwon/resample")
    ap.add_argument("--out", type=Path, default=FIX / "resample_ref.pt")
    ap.add_argument("--schedule-only", action="store_true",
                    help="add/refresh only `ddim_schedule_eta` in the existing --out fixture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from cores.models.ldm import build_ldm
    from cores.operators import get_operator

    tmp = Path(tempfile.mkdtemp(prefix="resample_theirs_"))
    ddim, cm = import_theirs(args.repo, tmp)
    import ldm.modules.diffusionmodules.util as util

    cfg = {"name": "ldm", "ldm_config": yaml.safe_load(open(FIX / "ldm_tiny_ffhq.yaml")),
           "diffusion_path": str(FIX / "ldm_tiny_ffhq.pt")}
    model = build_ldm(cfg, "cpu")
    adapter = TheirModelAdapter(model, util)
    op = get_operator("phase_retrieval", oversample=2.0, resolution=64, sigma=SETTINGS["measurement_sigma"])

    class CPUSampler(ddim.DDIMSampler):
        def register_buffer(self, name, attr):   # theirs moves every buffer to CUDA
            setattr(self, name, attr)

    sampler = CPUSampler(adapter)
    schedule_eta = {}
    for eta in SCHEDULE_ETAS:  # 0. their schedule at η > 0, as p_sample_ddim reads it (a float32 torch.full)
        sampler.make_schedule(ddim_num_steps=SETTINGS["ddim_steps"], ddim_eta=eta, verbose=False)
        read = lambda v: torch.stack([torch.full((1,), v[k])[0] for k in range(len(v))])  # noqa: E731
        schedule_eta[eta] = {"sigmas": read(sampler.ddim_sigmas),
                             "sqrt_one_minus_alphas": read(sampler.ddim_sqrt_one_minus_alphas)}
    if args.schedule_only:
        ref = torch.load(args.out, map_location="cpu")
        ref["ddim_schedule_eta"] = schedule_eta
        torch.save(ref, args.out)
        print(f"updated ddim_schedule_eta in {args.out}")
        return
    sampler.make_schedule(ddim_num_steps=SETTINGS["ddim_steps"], ddim_eta=SETTINGS["ddim_eta"], verbose=False)
    noiser = types.SimpleNamespace(__name__="gaussian")
    operator_obj = types.SimpleNamespace(forward=lambda x, **kw: op(x))   # their operators take **kwargs
    cond = cm.get_conditioning_method("ps", adapter, operator_obj, noiser)
    measurement_cond_fn = cond.conditioning

    g = torch.Generator().manual_seed(SETTINGS["seed"])
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    shape = (1, *model.get_in_shape())
    res = model.image_resolution
    x_true = (torch.rand(PARTICLES, 3, res, res, generator=g) * 2 - 1)
    y = op(x_true) + SETTINGS["measurement_sigma"] * randn(PARTICLES, *op(x_true).shape[1:])
    ref = {"settings": SETTINGS, "y": y, "x_true": x_true, "ddim_schedule_eta": schedule_eta}

    # 1. one DDIM step (their p_sample_ddim) at index `step_index`
    k = SETTINGS["step_index"]
    step = int(sampler.ddim_timesteps[k])
    z = randn(PARTICLES, *shape[1:])
    noise = randn(PARTICLES, *shape[1:])
    outs = []
    for p in range(PARTICLES):
        with Draws([noise[p:p + 1]]):
            outs.append(sampler.p_sample_ddim(z[p:p + 1], None, torch.full((1,), step, dtype=torch.long), index=k))
    ref["ddim_step"] = {"index": k, "timestep": step, "z": z, "noise": noise,
                        **{n: torch.cat([o[j] for o in outs]) for j, n in enumerate(["x_prev", "pred_x0", "pseudo_x0"])}}

    # 2. the measurement-gradient step after it (their measurement_cond_fn, scale ᾱ_t/2)
    guided = []
    for p in range(PARTICLES):
        with Draws([noise[p:p + 1]]):
            img = z[p:p + 1].clone().requires_grad_()
            out, _, pseudo = sampler.p_sample_ddim(img, None, torch.full((1,), step, dtype=torch.long), index=k)
            a_t = torch.full((1, 1, 1, 1), sampler.ddim_alphas[k])
            new, _ = measurement_cond_fn(x_t=out, measurement=y[p:p + 1], noisy_measurement=y[p:p + 1], x_prev=img,
                                         x_0_hat=pseudo, scale=a_t * .5)
        guided.append(new.detach())
    ref["guidance"] = {"z_next": torch.cat(guided)}

    # 3. stochastic resample
    pseudo_x0, x_t, rs_noise = randn(PARTICLES, *shape[1:]), randn(PARTICLES, *shape[1:]), randn(PARTICLES, *shape[1:])
    a_t = torch.full((1, 1, 1, 1), sampler.ddim_alphas[k])
    a_prev = torch.full((1, 1, 1, 1), float(sampler.ddim_alphas_prev[k]))
    gamma = 40 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    rs = []
    for p in range(PARTICLES):
        with Draws([rs_noise[p:p + 1]]):
            rs.append(sampler.stochastic_resample(pseudo_x0=pseudo_x0[p:p + 1], x_t=x_t[p:p + 1], a_t=a_prev,
                                                  sigma=gamma))
    ref["stochastic_resample"] = {"index": k, "pseudo_x0": pseudo_x0, "x_t": x_t, "noise": rs_noise,
                                  "out": torch.cat(rs)}

    # 4. one latent optimisation (their lr 5e-3 and eps 1e-3; few iterations: the tiny decoder is slow on a loaded CPU)
    z_init = randn(PARTICLES, *shape[1:]) * 0.5
    lat = [sampler.latent_optimization(measurement=y[p:p + 1], z_init=z_init[p:p + 1].clone(), operator_fn=op,
                                       eps=SETTINGS["latent_eps"], max_iters=SETTINGS["latent_max_iters"])[0].detach()
           for p in range(PARTICLES)]
    ref["latent_optimization"] = {"z_init": z_init, "out": torch.cat(lat)}

    # 5. one pixel optimisation (lr 1e-2; eps set so that particle 0 stops early, particle 1 later or never)
    y_clean = op(x_true)
    x_prime = x_true + torch.tensor([0.05, 0.2]).view(-1, 1, 1, 1) * randn(PARTICLES, 3, res, res)
    first = float(((y_clean[:1] - op(x_prime[:1])) ** 2).mean())
    eps = (SETTINGS["pixel_eps_ratio"] * first) ** 0.5
    pix = [sampler.pixel_optimization(measurement=y_clean[p:p + 1], x_prime=x_prime[p:p + 1], operator_fn=op,
                                      eps=eps, max_iters=SETTINGS["pixel_max_iters"]).detach()
           for p in range(PARTICLES)]
    ref["pixel_optimization"] = {"x_prime": x_prime, "y": y_clean, "eps": eps, "out": torch.cat(pix)}

    # 6. a short resample_sampling run (50 DDIM steps: time travel with a pixel and a latent stage)
    sampler.pixel_optimization = partial(ddim.DDIMSampler.pixel_optimization, sampler,
                                         max_iters=SETTINGS["run_pixel_max_iters"])
    sampler.latent_optimization = partial(ddim.DDIMSampler.latent_optimization, sampler,
                                          max_iters=SETTINGS["run_latent_max_iters"])

    def run_theirs(p: int, draws):
        with Draws(draws):
            out, _ = sampler.resample_sampling(y[p:p + 1], measurement_cond_fn, None, shape, operator_fn=op)
        return out.detach()

    n_draws = count_draws(lambda: sampler.resample_sampling(y[:1], measurement_cond_fn, None, shape, operator_fn=op),
                          shape)   # the number of draws does not depend on their values
    draws = randn(PARTICLES, n_draws, *shape[1:])
    finals = [run_theirs(p, [draws[p, j:j + 1] for j in range(n_draws)]) for p in range(PARTICLES)]
    ref["resample_sampling"] = {"draws": draws, "out": torch.cat(finals)}
    ref["metadata"] = {"repository": "github.com/soominkwon/resample", "commit": git_commit(args.repo),
                       "files": THEIR_FILES, "model": "tests/fixtures/ldm_tiny_ffhq (project loader)",
                       "command": "python scripts/resample_reference.py --repo <clone of soominkwon/resample>",
                       "torch": str(torch.__version__), "particles_run_alone": True}
    torch.save(ref, args.out)
    print(f"wrote {args.out} ({n_draws} draws per particle in resample_sampling; commit {ref['metadata']['commit']})")


if __name__ == "__main__":
    main()
