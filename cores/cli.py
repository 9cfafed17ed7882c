"""Command-line plumbing around Hydra: early one-line errors, sweep folders, and one line with an
exit code for every way a run can stop (2 bad input, 1 runtime failure, 130 Ctrl-C)."""
from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

from cores.errors import ConfigError
from cores.validation import check_run_name, check_save_dir

EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130

#: keys in which the jobs of one run folder may differ (shards of one run, not a sweep)
SHARED_FOLDER_KEYS = ("shard", "num_shards", "device", "data.start_id", "data.end_id", "resume", "name", "save_dir")


def check_command_line(argv: Sequence[str], config_dir: Path) -> Optional[Any]:
    """Compose the config from the command line's overrides before Hydra does, so that a typo
    (`repulsion_scael=1`) or a bad group name is one line naming the setting instead of Hydra's
    multi-line message.  Multirun sweeps and Hydra's own flags are left to Hydra."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = list(argv)
    if any(a.startswith("-") for a in args):  # -m, --cfg, --help, …: Hydra's business
        return None
    overrides = [a for a in args if "=" in a]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        text = " ".join(str(err).split()).split(" Config search path")[0]
        from hydra.errors import OverrideParseException

        if isinstance(err, OverrideParseException):
            raise ConfigError(override_syntax_message(text, overrides)) from None
        key = next((o.split("=", 1)[0] for o in overrides if f"'{o.split('=', 1)[0]}'" in text), None)
        if key is not None and ("Could not override" in text or "not in struct" in text):
            close = difflib.get_close_matches(key.lstrip("+~"), known_keys(config_dir, overrides, key), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown setting {key}{hint}") from None
        raise ConfigError(text) from None
    try:  # Hydra creates its log folder <save_dir>/<name>/.hydra_logs before anything else
        check_run_name(str(cfg.name))
        check_save_dir(str(cfg.save_dir))
    except OmegaConfBaseException as err:
        raise ConfigError(" ".join(str(err).split())) from None
    return cfg


def known_keys(config_dir: Path, overrides: Sequence[str], key: str) -> List[str]:
    """The settings next to `key` (`sampler.mcmc.num_step` → every `sampler.mcmc.*`; a top-level key → the
    top-level keys), from the config composed without the override that names it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    from cores.config import TOP_LEVEL_KEYS

    parent = key.lstrip("+~").rsplit(".", 1)[0] if "." in key else ""
    if not parent:
        return sorted(TOP_LEVEL_KEYS - {"hydra"})
    rest = [o for o in overrides if o.split("=", 1)[0] != key]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            node = compose(config_name="config", overrides=rest)
        for part in parent.split("."):
            node = node[part]
    except Exception:  # the hint is a courtesy: without it the message still names the key
        return []
    return [f"{parent}.{k}" for k in node] if isinstance(node, DictConfig) else []


def override_syntax_message(text: str, overrides: Sequence[str]) -> str:
    """One sentence for an override Hydra's grammar cannot read (non-ASCII letters or a
    special character in an unquoted value), with the quoting that works."""
    bad = next((o for o in overrides if o in text), None)
    if bad is None or "=" not in bad:
        return text.split(" See https://")[0]
    key, value = bad.split("=", 1)
    return (f"{bad}: Hydra cannot read this value unquoted (non-ASCII letters and characters such "
            f"as ()[]{{}},:=' need quotes); quote it inside the argument: \"{key}='{value}'\"")


def folders_hydra_will_create(cfg: Optional[Any]) -> List[Path]:
    """The run folder's `.hydra_logs` and the folders above it that do not exist yet (deepest first):
    what a refused run removes again, so that a rejected config leaves nothing behind."""
    if cfg is None:
        return []
    logs = Path(str(cfg.save_dir)) / str(cfg.name) / ".hydra_logs"
    return [p for p in [logs, *logs.parents] if not p.exists()]


def remove_refused_run_folders(created: Sequence[Path]) -> None:
    """Undo `folders_hydra_will_create` after a refusal: Hydra's log folder, then each folder that
    is empty now (one that holds anything else is left alone)."""
    for p in created:
        try:
            if p.name == ".hydra_logs":
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rmdir()
        except OSError:
            return


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


def resume_hint(save_dir: str, name: str, argv: Sequence[str]) -> str:
    """`N image(s) finished in <folder>; continue with: <the exact command with resume=true>`, run
    by the interpreter that runs now (the one that has the packages)."""
    import shlex

    from cores.run_folder import RunFolder

    folder = RunFolder(Path(save_dir) / name)
    try:
        done = len(folder.finished_images()) if folder.root.exists() else 0
    except OSError:
        done = 0
    args = [a for a in argv[1:] if not a.startswith(("resume=", "+resume=", "hydra.job.config.override_dirname"))]
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, argv[0] if argv else "posterior_sample.py", *args,
                                            "resume=true"])
    return f"{done} image(s) finished in {folder.root}; continue with: {cmd}"


def interrupted_message(save_dir: str, name: str, argv: Sequence[str]) -> str:
    """One line for Ctrl-C: what is finished and the exact command that continues the run."""
    return f"interrupted: {resume_hint(save_dir, name, argv)}"


def one_line_error(err: BaseException) -> str:
    return "error: " + " ".join(str(err).split())


def is_out_of_memory(err: BaseException) -> bool:
    """torch's allocator failures (CUDA and CPU) and Python's MemoryError."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                              or "Cannot allocate memory" in text)


def run_guarded(cfg: Any, argv: Sequence[str]) -> int:
    """`pipeline.run(cfg)`, with every expected way to stop as one stderr line and an exit code:
    2 bad settings or missing files (before any work), 1 a runtime failure (disk full, out of
    memory, a folder that vanished) with the finished count and the command that continues,
    130 Ctrl-C.  Records are written atomically and last, so whatever stops the run, every
    finished image stays as it was.  Anything else is a bug and keeps its traceback."""
    from cores.pipeline import run

    save_dir, name = str(cfg.save_dir), str(cfg.name)
    try:
        run(cfg)
        return 0
    except (ConfigError, FileNotFoundError) as err:  # bad settings and missing files are not crashes
        print(one_line_error(err), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message
        print(interrupted_message(save_dir, name, argv), file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # disk full, quota, read-only or vanished folder
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}; {resume_hint(save_dir, name, argv)}", file=sys.stderr)
        return EXIT_FAILURE
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        text = " ".join(str(err).split())
        text = text[text.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in text else text  # drop C++ noise
        first = (text[:200] + ("…" if len(text) > 200 else "")) if text else type(err).__name__
        print(f"error: out of memory ({first}); lower batch_size or num_samples; "
              f"{resume_hint(save_dir, name, argv)}", file=sys.stderr)
        return EXIT_FAILURE
