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


# Any one of these lets AutoTokenizer load (fast tokenizer.json; BPE vocab.json + merges.txt; SentencePiece; WordPiece).
LOADABLE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")


def check_model(resolved: str, ref: str, *, revision: str | None = None, hub_cache: bool = True) -> None:
    """What would otherwise fail inside the training process after the run directory exists, checked cheaply (JSON
    and file names; no torch, no transformers): a local folder's config.json and tokenizer, or, offline, whether a
    hub id is in the Hugging Face cache."""
    path = Path(resolved)
    if path.is_dir():
        _check_local(path, ref)
    elif hub_cache:               # plan compiles for a model it need not have; run must load it
        _check_hub_cached(resolved, revision)


def _read_json(path: Path, ref: str, what: str) -> dict:
    import json
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelError(f"{ref}/{path.name} is not UTF-8 text ({exc.reason})", where="model.path",
                         hint=f"restore the model's {what}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{ref}/{path.name} is not valid JSON ({exc.msg}, line {exc.lineno})", where="model.path",
                         hint=f"restore the model's {what} (download or save_pretrained it again)") from None
    except OSError as exc:
        raise ModelError(f"cannot read {ref}/{path.name}: {exc.strerror}", where="model.path") from None
    if not isinstance(data, dict):
        raise ModelError(f"{ref}/{path.name} is not a JSON object", where="model.path",
                         hint=f"restore the model's {what}")
    return data


def _check_local(path: Path, ref: str) -> None:
    config = _read_json(path / "config.json", ref, "config.json")
    if not isinstance(config.get("model_type"), str) and not config.get("architectures"):
        raise ModelError(f"{ref}/config.json names no model_type, so transformers cannot tell which model it is",
                         where="model.path", hint="restore the model's config.json")
    if not any((path / f).is_file() for f in LOADABLE_TOKENIZER_FILES):
        raise ModelError(f"{ref} has no tokenizer (none of {', '.join(LOADABLE_TOKENIZER_FILES[:4])}, ...)",
                         where="model.path",
                         hint="save the tokenizer into the model folder (tokenizer.save_pretrained(folder))")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            _read_json(path / name, ref, "tokenizer files")


def _check_hub_cached(repo_id: str, revision: str | None) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub id must already be in the cache; online the hub is asked at load time."""
    import os
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import try_to_load_from_cache
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is reported below the same way
        found = None
    if not isinstance(found, str):
        raise ModelError(f"'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it",
                         where="model.path",
                         hint=f"download it once with network (hf download {repo_id}), or point model.path at a "
                              "local folder")
