"""Every error sekft raises on purpose, in one place.

Each carries a message a user can act on: what was wrong, where (file, line, field,
session index, turn), and what to do. CLIs catch `SekftError`, print its one line and exit
non-zero; anything else escaping is a bug in sekft and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class SekftError(Exception):
    """Base class: the message is the whole story, one line."""


class CheckpointError(SekftError):
    """A base checkpoint folder is missing, incomplete, corrupt or disagrees with its config."""


class ConfigError(SekftError):
    """A config (model, adapter, run, scenario) lacks a key or asks for something unsupported."""


class AdapterError(SekftError):
    """A LoRA adapter does not fit the model, or its files are missing or corrupt."""


class TemplateError(SekftError):
    """A chat template cannot be found, compiled or rendered for a session."""


class DataError(SekftError):
    """Training or eval data is malformed: names file, line and field."""


class MaskError(SekftError):
    """A render-contract check failed where it must not (e.g. under --strict)."""


class ScenarioError(SekftError):
    """A scenario folder is malformed, or its setup failed (not the model's fault)."""


class SandboxError(SekftError):
    """No usable sandbox, or the sandboxed shell could not be started."""


class TrainError(SekftError):
    """A training run cannot start or resume as asked (e.g. --out holds another run)."""


class ResidentError(SekftError):
    """The resident server cannot start or be reached, or a request to it is malformed."""


def run_cli(
    prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None
) -> int:
    """Run a CLI entry point: a `SekftError` becomes one line on stderr and exit code 1."""
    try:
        return main(argv)
    except SekftError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
