"""Record formats: what a record looks like, and its normalized form. Pure functions over one record.

    alpaca      {"instruction", "input" (optional), "output", "system" (optional)}
    messages    {"messages": [{"role": system|user|assistant, "content"}, ...]}
    sharegpt    {"conversations": [{"from": human|gpt|system, "value"}, ...], "system" (optional)}
    preference  {"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}
                or alpaca-style {"instruction", "input", "chosen", "rejected"}
                or ranking-style (LlamaFactory, ShareGPT) {"messages"|"conversations": prompt, "chosen": message,
                "rejected": message}
    text        {"text": str}                     (plain text files become this)
    kto         {"prompt": str|messages, "completion": str, "label": true|false}
                or {"messages": [... ending with the assistant completion], "label": true|false}

Normalized (what every backend reads):
    sft         {"messages": [...]}                           ends with the assistant answer to learn
    preference  {"prompt": [messages ending with user], "chosen": str, "rejected": str}
    text        {"text": str}
    kto         {"prompt": [messages ending with user], "completion": str, "label": bool}
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError, one_of

SFT_FORMATS = ("alpaca", "messages", "sharegpt")
FORMATS = (*SFT_FORMATS, "preference", "kto", "text")
KIND_OF = {"alpaca": "sft", "messages": "sft", "sharegpt": "sft", "preference": "preference", "kto": "kto",
           "text": "text"}
# The kind of normalized data each stage trains on (ppo and grpo take conversations: the prompt, and the answer as
# the reference a reward function may compare with).
STAGE_KIND = {"sft": "sft", "pt": "text", "dpo": "preference", "orpo": "preference", "simpo": "preference",
              "rm": "preference", "kto": "kto", "ppo": "sft", "grpo": "sft"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
# The keys that make a record one format or another (the first record decides with data.format: auto).
SIGNATURE = {"preference": ("chosen", "rejected"), "kto": ("label",), "messages": ("messages",),
             "sharegpt": ("conversations",), "alpaca": ("instruction", "output"), "text": ("text",)}


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys say (SIGNATURE, most specific first). Unrolled: it runs once per record."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "label" in record and ("completion" in record or "messages" in record):
        return "kto"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def closest_format(record: dict[str, Any]) -> str | None:
    """The format whose keys the record shares most of (for a message about a record that is missing one)."""
    scores = {fmt: sum(k in record for k in keys) for fmt, keys in SIGNATURE.items()}
    best = max(scores, key=lambda f: scores[f])
    return best if scores[best] else None


def rename_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """data.columns: {canonical: name in the file}."""
    if not columns:
        return record
    out = dict(record)
    for canonical, name in columns.items():
        if name in out:
            out[canonical] = out.pop(name)
    return out


# ---------------------------------------------------------------- pieces

def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string, received {type(value).__name__}", where=where)
    return value


def _messages(value: Any, where: str, key: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] = ROLES) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"'{key}' must be a non-empty list of messages", where=where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"'{key}[{i}]' must have '{role_key}' and '{content_key}'", where=where)
        role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise DataError(f"'{key}[{i}].{role_key}' must be {one_of(roles)}, received {m[role_key]!r:.40}",
                            where=where)
        out.append({"role": role, "content": _text(m[content_key], where, f"{key}[{i}].{content_key}")})
    return out


def _require(rec: dict[str, Any], fmt: str, keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if k not in rec:
            raise DataError(f"{fmt} record is missing '{k}'", where=where,
                            hint="every record needs the same fields as the first (or map names with data.columns)")


def _prompt_text(rec: dict[str, Any], where: str) -> str:
    text = rec["instruction"]
    extra = rec.get("input") or ""
    if type(text) is not str or type(extra) is not str:          # noqa: E721 - the fast path is exact str
        _text(text, where, "instruction")
        _text(extra, where, "input")
    return f"{text}\n{extra}" if extra else text


def _check_dialogue(msgs: list[dict[str, str]], where: str) -> None:
    if msgs[-1]["role"] != "assistant":
        raise DataError("the conversation must end with an assistant message (the answer to learn)", where=where)
    if not any(m["role"] == "user" for m in msgs):
        raise DataError("the conversation has no user message", where=where)


# ---------------------------------------------------------------- normalization

def normalize(fmt: str, rec: dict[str, Any], where: str, system: str | None) -> dict[str, Any]:
    """One record in format ``fmt`` → its normalized form (see the module docstring)."""
    if fmt == "preference":
        return _preference(rec, where, system)
    if fmt == "kto":
        return _kto(rec, where, system)
    if fmt == "text":
        _require(rec, "text", ("text",), where)
        return {"text": _text(rec["text"], where, "text")}
    if fmt == "alpaca":                    # built as user + assistant: nothing more to check
        _require(rec, "alpaca", ("instruction", "output"), where)
        msgs = [{"role": "user", "content": _prompt_text(rec, where)},
                {"role": "assistant", "content": _text(rec["output"], where, "output")}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(rec["system"], where, "system")})
        elif system:
            msgs.insert(0, {"role": "system", "content": system})
        return {"messages": msgs}
    if fmt == "messages":
        _require(rec, "messages", ("messages",), where)
        msgs = _messages(rec["messages"], where, "messages")
    elif fmt == "sharegpt":
        _require(rec, "sharegpt", ("conversations",), where)
        msgs = _messages(rec["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(rec["system"], where, "system")})
    else:  # pragma: no cover - formats are checked by the schema
        raise DataError(f"unknown format {fmt}", where=where)
    _check_dialogue(msgs, where)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def _preference(rec: dict[str, Any], where: str, system: str | None) -> dict[str, Any]:
    sharegpt = "conversations" in rec and "prompt" not in rec
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, where, "prompt")
    elif "messages" in rec or sharegpt:      # ranking form: the prompt's messages, one answer message each
        prompt = (_messages(rec["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
                  if sharegpt else _messages(rec["messages"], where, "messages"))
    elif "instruction" in rec:
        prompt = [{"role": "user", "content": _prompt_text(rec, where)}]
        if rec.get("system"):
            prompt.insert(0, {"role": "system", "content": _text(rec["system"], where, "system")})
    else:
        raise DataError("preference record needs 'prompt' (or 'instruction') with 'chosen' and 'rejected'",
                        where=where)
    _require(rec, "preference", ("chosen", "rejected"), where)
    if prompt[-1]["role"] != "user":
        raise DataError("the preference prompt must end with a user message", where=where)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    out: dict[str, Any] = {"prompt": prompt}
    for k in ("chosen", "rejected"):
        v = rec[k]
        if isinstance(v, dict):               # one answer message (ranking form)
            v = [v]
        if isinstance(v, list):
            msgs = (_messages(v, where, k, "from", "value", SHAREGPT_ROLES) if sharegpt or (v and "from" in v[0])
                    else _messages(v, where, k))
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"'{k}' must end with an assistant message", where=where)
            v = msgs[-1]["content"]
        out[k] = _text(v, where, k)
    return out


def _kto(rec: dict[str, Any], where: str, system: str | None) -> dict[str, Any]:
    label = rec.get("label")
    if not isinstance(label, bool):
        raise DataError(f"'label' must be true or false, received {label!r:.30}", where=where,
                        hint="KTO feedback marks each completion desirable (true) or not (false)")
    if "completion" in rec:
        _require(rec, "kto", ("prompt",), where)
        p = rec["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, where, "prompt")
        completion = _text(rec["completion"], where, "completion")
    else:
        msgs = _messages(rec["messages"], where, "messages")
        _check_dialogue(msgs, where)
        prompt, completion = msgs[:-1], msgs[-1]["content"]
    if prompt[-1]["role"] != "user":
        raise DataError("the KTO prompt must end with a user message", where=where)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    return {"prompt": prompt, "completion": completion, "label": label}


def unpair(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A normalized preference pair as two KTO rows: chosen desirable, rejected not (preference.unpair)."""
    return [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
            {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of a normalized row (a preference row's prompt, with an empty answer)."""
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        return [*row["prompt"], {"role": "assistant", "content": row.get("chosen", row.get("completion", ""))}]
    return []


def shape(msgs: list[dict[str, str]]) -> tuple[bool, bool]:
    """(has a system message, has more than one user turn)."""
    return bool(msgs) and msgs[0]["role"] == "system", sum(m["role"] == "user" for m in msgs) > 1


def turn_problem(msgs: list[dict[str, str]]) -> str | None:
    """Why the turns do not alternate user/assistant after one optional leading system message (many chat
    templates and LlamaFactory's reader need that), or None."""
    if len(msgs) == 2 and msgs[0]["role"] == "user":      # the common single turn (it ends with the answer)
        return None
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, msg in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            return (f"message {i + 1 + (len(msgs) - len(body))} is '{msg['role']}' where '{want}' is expected "
                    f"(turns must alternate user/assistant after one optional leading system message)")
    return None
