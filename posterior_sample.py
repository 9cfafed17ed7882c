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

    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as err:
        # one line, whatever the message: bad settings and missing files are not crashes
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from pathlib import Path

    from cores.errors import ConfigError
    from cores.validation import check_command_line

    try:
        check_command_line(sys.argv[1:], Path(__file__).resolve().parent / "configs")
    except ConfigError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
    main()
