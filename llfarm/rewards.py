"""Reward functions for `stage: grpo` (``preference.rewards``), in TRL's form: ``fn(completions, **columns) ->
list[float]``, called with the generated completions (text) and the dataset's columns — ``prompt`` and ``answer``
(the example's reference answer).

Built in:
    exact_match        1 when the completion, stripped, equals the reference answer
    length             1 - |len(completion) - len(answer)| / len(answer), at least 0: answers of the right length
    format:<regex>     1 when the stripped completion matches the regular expression as a whole

Your own: ``path/to/file.py:function`` (relative to the strategy file) or ``package.module:function``. This is the
one place llfarm runs code a strategy names: it is imported and called in the training process — and once before
anything is written, on two examples, so that a function that does not import, has the wrong signature or raises is
refused up front, naming it and its file.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StrategyError

BUILTIN = ("exact_match", "length", "format:<regex>")


def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answer, strict=True)]


def length(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    return [max(0.0, 1.0 - abs(len(c.strip()) - len(a)) / max(len(a), 1)) for c, a in
            zip(completions, answer, strict=True)]


def format_reward(pattern: str) -> Callable[..., list[float]]:
    regex = re.compile(pattern, re.S)

    def fmt(completions: list[str], **_: Any) -> list[float]:
        return [1.0 if regex.fullmatch(c.strip()) else 0.0 for c in completions]
    fmt.__name__ = "format"
    return fmt


def load(ref: str) -> Callable[..., list[float]]:
    """The reward function ``ref`` names (see the module docstring), or one StrategyError naming it."""
    where = f"preference.rewards: {ref}"
    if ref == "exact_match":
        return exact_match
    if ref == "length":
        return length
    if ref.startswith("format:"):
        try:
            return format_reward(ref[len("format:"):])
        except re.error as exc:
            raise StrategyError([f"the format reward's regular expression does not compile: {exc}"], where=where,
                                hint="write format:<regex>, e.g. format:^The capital of .+\\.$") from None
    module_ref, sep, name = ref.rpartition(":")
    if not sep or not module_ref or not name:
        raise StrategyError([f"unknown reward '{ref}'"], where=where,
                            hint=f"use {', '.join(BUILTIN)}, or file.py:function / package.module:function")
    try:
        if module_ref.endswith(".py"):
            path = Path(module_ref)
            if not path.is_file():
                raise StrategyError([f"reward file not found: {module_ref}"], where=where,
                                    hint="paths are relative to the strategy file")
            spec = importlib.util.spec_from_file_location(f"llfarm_reward_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_ref)
    except StrategyError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises on import
        raise StrategyError([f"the reward module does not import: {type(exc).__name__}: {exc}"], where=where,
                            hint=f"run `python -c \"import {Path(module_ref).stem}\"` to see why") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise StrategyError([f"{module_ref} has no function '{name}'"], where=where)
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "completions" not in params or not takes_kwargs:
        raise StrategyError([f"{name} must be def {name}(completions, **kwargs) -> list[float] (TRL's reward "
                             f"signature); it is {name}{inspect.signature(fn)}"], where=where,
                            hint="it also receives prompts=..., answer=... and the other dataset columns")
    return fn


def check(refs: list[str], prompts: list[str], answers: list[str]) -> None:
    """Load every reward and call it once on examples (completions = the reference answers): refused up front when it
    raises or returns something other than one number per completion."""
    for ref in refs:
        fn = load(ref)
        try:
            out = fn(completions=list(answers), prompts=list(prompts), answer=list(answers))
        except Exception as exc:  # noqa: BLE001 - the user's function
            raise StrategyError([f"the reward raised {type(exc).__name__}: {exc} (called on {len(answers)} example "
                                 "completions)"], where=f"preference.rewards: {ref}") from None
        if not isinstance(out, (list, tuple)) or len(out) != len(answers) or \
                not all(v is None or isinstance(v, (int, float)) for v in out):
            raise StrategyError([f"the reward returned {type(out).__name__} {str(out)[:60]}; it must return one "
                                 f"number per completion ({len(answers)} here)"], where=f"preference.rewards: {ref}")
