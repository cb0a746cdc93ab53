"""Read, detect, check and normalize training data — once, in the core, for every backend.

Formats (JSONL or a JSON array): alpaca (instruction/input/output[, system]), messages (OpenAI role/content
lists), ShareGPT (conversations with from/value), and preference pairs in TRL form (prompt/chosen/rejected as
strings or message lists) or alpaca form (instruction/input/chosen/rejected). Errors name the file and line.

The normalized files written into ``native/data/`` are:
  sft:        {"messages": [{"role": ..., "content": ...}, ...]}   (ends with an assistant turn)
  preference: {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, one_of
from .resources import resolve_builtin_data

PREFERENCE = "preference"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass
class PreparedData:
    kind: str                       # sft | preference
    source_format: str              # alpaca | messages | sharegpt | preference
    train_path: Path                # normalized JSONL
    eval_path: Path | None
    n_train: int
    n_eval: int
    sources: dict[str, str] = field(default_factory=dict)   # original path → sha256
    train_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)
    eval_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def write(self, out_dir: Path) -> PreparedData:
        """Write the normalized JSONL files into ``out_dir`` (native/data/) and point at them."""
        self.train_path = out_dir / "train.jsonl"
        write_jsonl(self.train_path, self.train_rows)
        if self.eval_rows:
            self.eval_path = out_dir / "eval.jsonl"
            write_jsonl(self.eval_path, self.eval_rows)
        return self


# ---------------------------------------------------------------- reading

def resolve_path(ref: str, key: str) -> Path:
    if ref.startswith("builtin:"):
        return resolve_builtin_data(ref, key)
    if "://" in ref or ref.startswith("hf:"):
        raise DataError(f"remote datasets are not read directly: '{ref}'", where=key,
                        hint="download it to a .jsonl file first and point the strategy at that path")
    path = Path(ref)
    if not path.is_file():
        raise DataError(f"file not found: {ref}", where=key, hint="check the path (relative paths are "
                        "resolved against the strategy file's folder)")
    return path


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """[(location, record)] where location is 'file:line' (JSONL) or 'file[record N]' (JSON array)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", where=str(path), hint="save the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg}", where=f"{path}:{exc.lineno}",
                            hint="the file starts with '[' so it is read as one JSON array") from None
        out = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"expected an object per record, received {type(item).__name__}",
                                where=f"{path}[record {i}]")
            out.append((f"{path}[record {i}]", item))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON line: {exc.msg} (column {exc.colno})", where=f"{path}:{n}",
                            hint="each line of a .jsonl file must be one JSON object") from None
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, received {type(item).__name__}", where=f"{path}:{n}",
                            hint="each line of a .jsonl file must be one JSON object")
        out.append((f"{path}:{n}", item))
    return out


def detect_format(record: dict[str, Any]) -> str | None:
    if "chosen" in record and "rejected" in record:
        return PREFERENCE
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


# ---------------------------------------------------------------- per-format normalization

def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string, received {type(value).__name__}", where=where)
    return value


def _messages(value: Any, where: str, key: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"'{key}' must be a non-empty list of messages", where=where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"'{key}[{i}]' must have '{role_key}' and '{content_key}'", where=where)
        raw_role = m[role_key]
        role = (roles or {r: r for r in ROLES}).get(raw_role)
        if role is None:
            expected = one_of(roles or ROLES)
            raise DataError(f"'{key}[{i}].{role_key}' must be {expected}, received {raw_role!r}", where=where)
        out.append({"role": role, "content": _text(m[content_key], where, f"{key}[{i}].{content_key}")})
    return out


def _check_dialogue(msgs: list[dict[str, str]], where: str) -> None:
    if msgs[-1]["role"] != "assistant":
        raise DataError("the conversation must end with an assistant message (the answer to learn)", where=where)
    if not any(m["role"] == "user" for m in msgs):
        raise DataError("the conversation has no user message", where=where)


def normalize_sft(fmt: str, rec: dict[str, Any], where: str, system: str | None) -> dict[str, Any]:
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if k not in rec:
                raise DataError(f"alpaca record is missing '{k}'", where=where)
        prompt = _text(rec["instruction"], where, "instruction")
        extra = _text(rec.get("input") or "", where, "input")
        if extra:
            prompt = f"{prompt}\n{extra}"
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(rec["output"], where, "output")}]
        sys = rec.get("system")
        if sys:
            msgs.insert(0, {"role": "system", "content": _text(sys, where, "system")})
    elif fmt == "messages":
        msgs = _messages(rec.get("messages"), where, "messages")
    elif fmt == "sharegpt":
        msgs = _messages(rec.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES)
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(rec["system"], where, "system")})
    else:  # pragma: no cover - guarded by callers
        raise DataError(f"unknown format {fmt}", where=where)
    _check_dialogue(msgs, where)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def normalize_preference(rec: dict[str, Any], where: str, system: str | None) -> dict[str, Any]:
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = ([{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, where, "prompt"))
    elif "instruction" in rec:
        text = _text(rec["instruction"], where, "instruction")
        extra = _text(rec.get("input") or "", where, "input")
        prompt = [{"role": "user", "content": f"{text}\n{extra}" if extra else text}]
        if rec.get("system"):
            prompt.insert(0, {"role": "system", "content": _text(rec["system"], where, "system")})
    else:
        raise DataError("preference record needs 'prompt' (or 'instruction') with 'chosen' and 'rejected'",
                        where=where)
    if prompt[-1]["role"] != "user":
        raise DataError("the preference prompt must end with a user message", where=where)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    out: dict[str, Any] = {"prompt": prompt}
    for k in ("chosen", "rejected"):
        v = rec[k]
        if isinstance(v, list):
            msgs = _messages(v, where, k)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"'{k}' must end with an assistant message", where=where)
            v = msgs[-1]["content"]
        out[k] = _text(v, where, k)
    return out


# ---------------------------------------------------------------- the whole file

def load(ref: str, key: str, *, stage: str, fmt: str = "auto", system: str | None = None,
         max_samples: int | None = None) -> tuple[str, list[dict[str, Any]], Path]:
    path = resolve_path(ref, key)
    records = read_records(path)
    if not records:
        raise DataError("the dataset is empty: zero training examples means zero training steps",
                        where=str(path), hint="add examples, or point the strategy at another file")
    first_where, first = records[0]
    detected = detect_format(first) if fmt == "auto" else fmt
    if detected is None:
        raise DataError(f"cannot tell the format from the keys {sorted(first)}", where=first_where,
                        hint="expected alpaca (instruction/output), messages, conversations (ShareGPT) or "
                             "prompt/chosen/rejected; or set data.format")
    wants_pref = stage in ("dpo", "rm")
    if wants_pref and detected != PREFERENCE:
        raise DataError(f"stage '{stage}' needs preference pairs (prompt/chosen/rejected), received "
                        f"{detected}-format data", where=key,
                        hint="use stage: sft for this data, or give a preference dataset (builtin:preference)")
    if not wants_pref and detected == PREFERENCE:
        raise DataError("stage 'sft' needs instruction or conversation data, received preference pairs",
                        where=key, hint="use stage: dpo or rm for preference data")
    out = []
    for where, rec in records:
        if fmt == "auto" and detect_format(rec) != detected:
            raise DataError(f"record format differs from the first record ({detected})", where=where,
                            hint="a dataset must use one format throughout")
        out.append(normalize_preference(rec, where, system) if wants_pref
                   else normalize_sft(detected, rec, where, system))
    if max_samples:
        out = out[:max_samples]
    return detected, out, path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def prepare(strategy) -> PreparedData:
    """Load and check the strategy's data (nothing is written until ``.write(dir)``)."""
    d = strategy.data
    fmt, train, train_src = load(d.train, "data.train", stage=strategy.stage, fmt=d.format, system=d.system,
                                 max_samples=d.max_samples)
    sources = {str(train_src): sha256_file(train_src)}
    evals: list[dict[str, Any]] = []
    if d.eval:
        _, evals, eval_src = load(d.eval, "data.eval", stage=strategy.stage, fmt=d.format, system=d.system)
        sources[str(eval_src)] = sha256_file(eval_src)
    elif d.eval_split > 0:
        rng = random.Random(strategy.training.seed)
        idx = list(range(len(train)))
        rng.shuffle(idx)
        n_eval = max(1, int(round(len(train) * d.eval_split)))
        if n_eval >= len(train):
            raise DataError(f"eval_split {d.eval_split} leaves no training examples out of {len(train)}",
                            where="data.eval_split", hint="lower data.eval_split or add data")
        held = set(idx[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    kind = "preference" if strategy.stage in ("dpo", "rm") else "sft"
    return PreparedData(kind=kind, source_format=fmt, train_path=Path("train.jsonl"), eval_path=None,
                        n_train=len(train), n_eval=len(evals), sources=sources,
                        train_rows=train, eval_rows=evals)
