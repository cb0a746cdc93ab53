"""Where shipped things live: strategies, templates, the built-in model and sample data.

Installed, `strategies/` and `templates/` are package data under ``llfarm/``; in a source checkout they sit
beside the ``llfarm/`` folder. Both layouts resolve here, and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, ModelError, did_you_mean, one_of

PKG = Path(__file__).resolve().parent
BUILTIN = PKG / "builtin"


def shipped_dir(name: str) -> Path:
    inside = PKG / name
    return inside if inside.is_dir() else PKG.parent / name


def strategies_dir() -> Path:
    return shipped_dir("strategies")


def templates_dir() -> Path:
    return shipped_dir("templates")


BUILTIN_MODELS = {"tiny-llama": BUILTIN / "tiny-llama"}
BUILTIN_DATA = {p.stem: p for p in sorted((BUILTIN / "data").iterdir()) if p.suffix in (".jsonl", ".txt")}


def resolve_builtin_model(ref: str) -> Path:
    name = ref.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model '{name}'{did_you_mean(name, BUILTIN_MODELS)}",
                         where="model.path", hint=f"built-in models: {one_of(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def resolve_builtin_data(ref: str, key: str = "data.train") -> Path:
    name = ref.split(":", 1)[1]
    if name not in BUILTIN_DATA:
        raise DataError(f"unknown built-in dataset '{name}'{did_you_mean(name, BUILTIN_DATA)}",
                        where=key, hint=f"built-in datasets: {one_of(BUILTIN_DATA)}")
    return BUILTIN_DATA[name]
