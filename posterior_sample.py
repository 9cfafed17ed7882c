"""Entry point: `python posterior_sample.py [hydra overrides]`.

Wires config → objects → run → outputs; everything else lives in `cores/`.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cores.errors import ConfigError
    from cores.pipeline import run

    sweep = _sweep_subfolder()
    if sweep:  # each job of a sweep gets its own run folder, named from the swept overrides
        cfg.name = f"{cfg.name}/{sweep}"
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as err:
        # one line, whatever the message: bad settings and missing files are not crashes
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted_message(cfg, sys.argv), file=sys.stderr)
        sys.exit(130)


def _sweep_subfolder() -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return hc.job.override_dirname if hc.mode == RunMode.MULTIRUN else ""


def interrupted_message(cfg: DictConfig, argv) -> str:
    """One line for Ctrl-C: what is finished and the exact command that continues the run."""
    import shlex
    from pathlib import Path

    from cores.run_folder import RunFolder

    folder = RunFolder(Path(str(cfg.save_dir)) / str(cfg.name))
    done = len(folder.finished_images()) if folder.root.exists() else 0
    args = [a for a in argv[1:] if not a.startswith(("resume=", "+resume="))] + ["resume=true"]
    cmd = " ".join(shlex.quote(a) for a in ["python", "posterior_sample.py", *args])
    return f"interrupted: {done} image(s) finished in {folder.root}; continue with: {cmd}"


if __name__ == "__main__":
    from pathlib import Path

    from cores.errors import ConfigError
    from cores.cli import check_command_line, sweep_folder_override

    try:
        check_command_line(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    except ConfigError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    sys.argv += sweep_folder_override(sys.argv[1:])
    main()
