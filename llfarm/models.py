"""Resolve ``model.path``: builtin:NAME, a local directory, or a hub id — one loading path for all three."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError
from .resources import resolve_builtin_model


def looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


def resolve_model(ref: str) -> str:
    """An absolute local directory, or the hub id unchanged (loaded later with the hub's own cache)."""
    if ref.startswith("builtin:"):
        return str(resolve_builtin_model(ref))
    if looks_local(ref):
        path = Path(ref).expanduser().resolve()
        if not path.is_dir():
            raise ModelError(f"local model directory not found: {ref}", where="model.path",
                             hint="give a directory with config.json, or a hub id like Qwen/Qwen2.5-0.5B")
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref} has no config.json, so it is not a Hugging Face model directory",
                             where="model.path", hint="point at the folder that holds config.json")
        return str(path)
    if ref.count("/") > 1 or " " in ref:
        raise ModelError(f"'{ref}' is neither an existing directory nor a hub id (org/name)", where="model.path",
                         hint="check the path, or use builtin:tiny-llama")
    return ref


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def tokenizer_fingerprint(model: str, revision: str | None = None) -> str:
    """What decides a model's tokenization, as a hash, without loading anything heavy: the tokenizer files of a
    local folder (or of the hub cache's snapshot), else the hub id and revision."""
    import hashlib

    h = hashlib.sha256()
    folder = Path(model) if Path(model).is_dir() else None
    if folder is None:
        h.update(f"hub:{model}@{revision or 'main'}".encode())
        try:                                    # the files the hub cache holds for it, when it has them
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(model, "tokenizer_config.json", revision=revision)
            folder = Path(found).parent if isinstance(found, str) else None
        except ImportError:
            folder = None
    if folder is not None:
        for name in TOKENIZER_FILES:
            f = folder / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
