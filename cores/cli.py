"""Command-line plumbing before Hydra runs: early one-line errors and sweep folders."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from cores.errors import ConfigError
from cores.validation import check_save_dir

#: keys in which the jobs of one run folder may differ (shards of one run, not a sweep)
SHARED_FOLDER_KEYS = ("shard", "num_shards", "device", "data.start_id", "data.end_id", "resume", "name", "save_dir")


def check_command_line(argv: Sequence[str], config_dir: Path) -> None:
    """Compose the config from the command line's overrides before Hydra does, so that a typo
    (`repulsion_scael=1`) or a bad group name is one line naming the setting instead of Hydra's
    multi-line message.  Multirun sweeps and Hydra's own flags are left to Hydra."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = list(argv)
    if any(a.startswith("-") for a in args):  # -m, --cfg, --help, …: Hydra's business
        return
    overrides = [a for a in args if "=" in a]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        text = " ".join(str(err).split()).split(" Config search path")[0]
        key = next((o.split("=", 1)[0] for o in overrides if f"'{o.split('=', 1)[0]}'" in text), None)
        if key is not None and ("Could not override" in text or "not in struct" in text):
            from cores.config import TOP_LEVEL_KEYS

            close = difflib.get_close_matches(key.split(".")[-1], sorted(TOP_LEVEL_KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close and "." not in key else ""
            raise ConfigError(f"unknown setting {key}{hint}") from None
        raise ConfigError(text) from None
    try:
        check_save_dir(str(cfg.save_dir))  # Hydra creates its log folder inside it before anything else
    except OmegaConfBaseException as err:
        raise ConfigError(" ".join(str(err).split())) from None


def sweep_folder_override(args: Sequence[str]) -> List[str]:
    """For a multirun: the Hydra override that names each job's subfolder after the keys it sweeps.

    `-m num_samples=2,4 name=sweep` writes `sweep/num_samples=2` and `sweep/num_samples=4`, while
    `-m shard=0,1,2,3 num_shards=4 name=X` keeps every shard in `X` (they fill one run).  Hydra's
    `override_dirname` is built from each job's overrides; all keys but the swept ones are excluded.
    """
    if not any(a in ("-m", "--multirun") for a in args):
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()} - set(SHARED_FOLDER_KEYS)
    exclude = sorted({o.key_or_group for o in parsed} - swept)
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"]


def sweep_subfolder() -> str:
    """Inside a Hydra job: the subfolder of this sweep job (empty outside a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return hc.job.override_dirname if hc.mode == RunMode.MULTIRUN else ""


def interrupted_message(save_dir: str, name: str, argv: Sequence[str]) -> str:
    """One line for Ctrl-C: what is finished and the exact command that continues the run."""
    import shlex

    from cores.run_folder import RunFolder

    folder = RunFolder(Path(save_dir) / name)
    done = len(folder.finished_images()) if folder.root.exists() else 0
    args = [a for a in argv[1:] if not a.startswith(("resume=", "+resume=", "hydra.job.config.override_dirname"))]
    cmd = " ".join(shlex.quote(a) for a in ["python", "posterior_sample.py", *args, "resume=true"])
    return f"interrupted: {done} image(s) finished in {folder.root}; continue with: {cmd}"


def one_line_error(err: BaseException) -> str:
    return "error: " + " ".join(str(err).split())
