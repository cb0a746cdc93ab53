"""All user-facing errors. Each renders as one line: where, what was expected, what was received, a hint.

The CLI turns any :class:`LlfarmError` into that line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlfarmError(Exception):
    """Root of every error llfarm reports to a user."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        parts = [f"{self.where}: {self.message}" if self.where else self.message]
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return " — ".join(parts)


class StrategyError(LlfarmError):
    """A strategy file is malformed, has unknown keys or invalid values."""

    def __init__(self, problems: list[str], *, where: str | None = None, hint: str | None = None):
        self.problems = problems
        message = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        super().__init__(message, where=where, hint=hint)


class DataError(LlfarmError):
    """A dataset is missing, malformed, or in the wrong format for the stage."""


class ModelError(LlfarmError):
    """A model path or id cannot be resolved."""


class UnsupportedError(LlfarmError):
    """A backend cannot run this strategy (stage, method, quantization or platform)."""


class BackendUnavailable(LlfarmError):
    """A backend's package or hardware is missing on this machine."""


class RunError(LlfarmError):
    """A run directory is missing or incomplete."""


class TrainingFailed(RunError):
    """The backend process exited with an error (not bad input: exit code 1)."""

    exit_code = 1


class ExportError(LlfarmError):
    """An export cannot be produced faithfully."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(choices: Iterable[str]) -> str:
    return "one of " + ", ".join(sorted(choices))
