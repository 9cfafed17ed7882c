"""Entry point: `python posterior_sample.py [hydra overrides]`.

Wires config → objects → run → outputs; everything else lives in `cores/`.  Every way to stop is
one stderr line and an exit code (cores/cli.py), Ctrl-C during start-up included.
"""
from __future__ import annotations

import sys

from cores.signals import ctrl_c_deferred

STARTUP_INTERRUPT = "interrupted: during start-up, before the run began; nothing was written"

try:  # Ctrl-C while the heavy modules load (≈ 1.5 s) is one line too (held back: cores/signals.py)
    with ctrl_c_deferred():
        from pathlib import Path

        import hydra
        import torch  # noqa: F401  (torch and torchvision: their C++ initialisers load here, under the
        import torchvision  # noqa: F401  deferral; every run imports both anyway, cores/data.py)
        from omegaconf import DictConfig
except KeyboardInterrupt:
    print(STARTUP_INTERRUPT, file=sys.stderr)
    sys.exit(130)
except ModuleNotFoundError as missing:  # an interpreter without the environment (python3 of the system)
    print(f"error: {sys.executable} has no module {missing.name}: run it with the environment of README's quick "
          "start (.venv/bin/python), or set PYTHON= for the experiment scripts", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cores.cli import run_guarded, sweep_subfolder

    sweep = sweep_subfolder()
    if sweep:  # each job of a sweep gets its own run folder, named from the swept overrides
        cfg.name = f"{cfg.name}/{sweep}"
    code = run_guarded(cfg, sys.argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:
        from cores.cli import (check_command_line, folders_hydra_will_create, one_line_error,
                               remove_refused_run_folders, sweep_folder_override)
        from cores.errors import ConfigError

        try:  # a typo or bad group is one line before Hydra starts
            composed = check_command_line(sys.argv[1:], Path(__file__).resolve().parent / "configs")
        except ConfigError as err:
            print(one_line_error(err), file=sys.stderr)
            sys.exit(2)
        created = folders_hydra_will_create(composed)
        sys.argv += sweep_folder_override(sys.argv[1:])
        try:
            main()
        except SystemExit as stop:
            if stop.code == 2:  # refused: no .hydra_logs (nor empty run folder) left behind
                remove_refused_run_folders(created)
            raise
    except KeyboardInterrupt:  # outside the run itself (start-up, Hydra's set-up)
        print(STARTUP_INTERRUPT, file=sys.stderr)
        sys.exit(130)
