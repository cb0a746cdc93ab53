"""LlamaFactory reads the core's normalized data (one data path for every backend: format detection, eval split,
max_samples and data.system happen once, in the core).

- SFT rows ``{"messages": [...]}`` are registered in ``dataset_info.json`` as ``formatting: sharegpt`` with OpenAI
  tags (role/content/user/assistant/system);
- preference rows are rewritten as ``{"messages": prompt, "chosen": {role, content}, "rejected": {role, content}}``
  (``data/llamafactory_<split>.jsonl``) with ``ranking: true``.

LlamaFactory silently drops conversations whose turns do not alternate; :func:`check_turns` refuses them up front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llfarm.errors import DataError
from llfarm.rundir import atomic_write_text

DATASET_INFO = "dataset_info.json"
TRAIN_DATASET, EVAL_DATASET = "llfarm_train", "llfarm_eval"
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


def turn_problem(messages: list[dict[str, str]], last: str) -> str | None:
    """Why LlamaFactory's ShareGPT reader would skip this conversation (it drops such rows with a warning)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, msg in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            return (f"message {i + 1 + (len(messages) - len(body))} is '{msg['role']}' where LlamaFactory needs "
                    f"'{want}' (turns must alternate user/assistant after one optional leading system message)")
    if not body or body[-1]["role"] != last:
        return f"the conversation must end with a '{last}' message"
    return None


def check_turns(data) -> None:
    """Every conversation LlamaFactory would drop, refused before anything is written."""
    for split, rows in (("train", data.train_rows), ("eval", data.eval_rows)):
        for n, row in enumerate(rows, 1):
            problem = (turn_problem(row["prompt"], "user") if data.kind == "preference"
                       else turn_problem(row["messages"], "assistant"))
            if problem:
                raise DataError(problem, where=f"data.{split} (normalized example {n})",
                                hint="merge consecutive messages of one role, or use --backend pytorch")


def write_datasets(data, native: Path) -> Path:
    """dataset_info.json (absolute paths) and, for preference data, the pairs in LlamaFactory's ranking form."""
    info: dict[str, Any] = {}
    for name, path in ((TRAIN_DATASET, data.train_path), (EVAL_DATASET, data.eval_path)):
        if path is None:
            continue
        path = Path(path).resolve()
        if data.kind == "preference":
            out = path.with_name(f"llamafactory_{path.stem}.jsonl")
            ranking_form(path, out)
            info[name] = {"file_name": str(out), "formatting": "sharegpt", "ranking": True,
                          "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                          "tags": dict(OPENAI_TAGS)}
        else:
            info[name] = {"file_name": str(path), "formatting": "sharegpt", "columns": {"messages": "messages"},
                          "tags": dict(OPENAI_TAGS)}
    out_path = native / DATASET_INFO
    atomic_write_text(out_path, json.dumps(info, indent=2) + "\n")
    return out_path


def ranking_form(src: Path, out: Path) -> None:
    lines = []
    with open(src, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                lines.append(json.dumps({"messages": r["prompt"],
                                         "chosen": {"role": "assistant", "content": r["chosen"]},
                                         "rejected": {"role": "assistant", "content": r["rejected"]}},
                                        ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines), redact=False)   # training data is copied as is
