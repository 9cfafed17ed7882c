"""Entry point: `python posterior_sample.py [hydra overrides]`.

Wires config → objects → run → outputs; everything else lives in `cores/`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cores.cli import interrupted_message, one_line_error, sweep_subfolder
    from cores.errors import ConfigError
    from cores.pipeline import run

    sweep = sweep_subfolder()
    if sweep:  # each job of a sweep gets its own run folder, named from the swept overrides
        cfg.name = f"{cfg.name}/{sweep}"
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as err:  # bad settings and missing files are not crashes
        print(one_line_error(err), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted_message(str(cfg.save_dir), str(cfg.name), sys.argv), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    from cores.cli import check_command_line, one_line_error, sweep_folder_override
    from cores.errors import ConfigError

    try:  # a typo or bad group is one line before Hydra starts
        check_command_line(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    except ConfigError as err:
        print(one_line_error(err), file=sys.stderr)
        sys.exit(2)
    sys.argv += sweep_folder_override(sys.argv[1:])
    main()
