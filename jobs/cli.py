"""What every job shares: ``--config FILE key.path=value ...`` and clean exits on user errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import config_error_of
from pipeline.errors import PipelineError

EXIT_USER_ERROR = 2
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config file (see configs/); default: the embedded offline default")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")
    return parser


def run_job(main: Callable[[], int]) -> None:
    """Run ``main``; a PipelineError (bad config, data, path, model), or a config model's ValidationError,
    prints its message, no traceback."""
    try:
        code = main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except ValidationError as e:  # a config value the job itself set or built, outside validate_config
        error = config_error_of(e)
        if error is None:
            raise  # not a config model's: a bug, with its traceback
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def stage_main(description: str, run: Callable) -> int:
    """A stage job: parse ``--config`` and overrides, run the stage, print where its output is."""
    import json

    from pipeline.config import load_config

    args = config_parser(description).parse_intermixed_args()
    result = run(load_config(args.config, args.overrides))
    print(json.dumps({"run_dir": str(result.run_dir), "model_dir": str(result.model_dir),
                      "output": str(result.output), **result.metrics}, indent=2))
    return 0
