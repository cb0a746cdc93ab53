"""LlamaFactory reads the core's normalized data (one data path for every backend: format detection, eval split,
max_samples and data.system happen once, in the core).

- SFT rows ``{"messages": [...]}`` are registered in ``dataset_info.json`` as ``formatting: sharegpt`` with OpenAI
  tags (role/content/user/assistant/system);
- preference rows are rewritten as ``{"messages": prompt, "chosen": {role, content}, "rejected": {role, content}}``
  (``data/llamafactory_<split>.jsonl``) with ``ranking: true``.

LlamaFactory silently drops conversations whose turns do not alternate; :func:`check_turns` refuses them up front
(the core notes the first such conversation while it reads the data). Files in LlamaFactory's own form are written
once per data selection into the cache (``<cache>/llamafactory/``), never once per run, and LlamaFactory's tokenized
dataset is kept there too (``tokenized_path``, keyed by everything that decides the tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llfarm.data import cache_root
from llfarm.errors import DataError
from llfarm.rundir import atomic_write_text

DATASET_INFO = "dataset_info.json"
TRAIN_DATASET, EVAL_DATASET = "llfarm_train", "llfarm_eval"
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


def check_turns(data) -> None:
    """Every conversation LlamaFactory would drop, refused before anything is written."""
    if data.turn_problem:
        where, problem = data.turn_problem
        raise DataError(problem, where=where, hint="LlamaFactory drops such conversations: merge consecutive messages of one role, or use "
                             "--backend pytorch")


def lf_cache() -> Path:
    return cache_root() / "llamafactory"


def write_datasets(data, native: Path) -> Path:
    """dataset_info.json (absolute paths) and, for preference data, the pairs in LlamaFactory's ranking form."""
    info: dict[str, Any] = {}
    for name, path in ((TRAIN_DATASET, data.train_path), (EVAL_DATASET, data.eval_path)):
        if path is None:
            continue
        path = Path(path)
        if data.kind == "preference":
            out = lf_cache() / f"sel-{data.key[:40]}" / f"{name}.jsonl"
            if not out.is_file():
                lf_form(path, out, ranking_row)
            info[name] = {"file_name": str(out), "formatting": "sharegpt", "ranking": True,
                          "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                          "tags": dict(OPENAI_TAGS)}
        elif data.kind == "kto":
            out = lf_cache() / f"sel-{data.key[:40]}" / f"{name}.kto.jsonl"
            if not out.is_file():
                lf_form(path, out, kto_row)
            info[name] = {"file_name": str(out), "formatting": "sharegpt",
                          "columns": {"messages": "messages", "kto_tag": "label"}, "tags": dict(OPENAI_TAGS)}
        elif data.kind == "text":               # continued pretraining reads the prompt column
            info[name] = {"file_name": str(path), "columns": {"prompt": "text"}}
        else:
            info[name] = {"file_name": str(path), "formatting": "sharegpt", "columns": {"messages": "messages"},
                          "tags": dict(OPENAI_TAGS)}
    out_path = native / DATASET_INFO
    atomic_write_text(out_path, json.dumps(info, indent=2) + "\n")
    return out_path


def ranking_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"messages": r["prompt"], "chosen": {"role": "assistant", "content": r["chosen"]},
            "rejected": {"role": "assistant", "content": r["rejected"]}}


def kto_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [*r["prompt"], {"role": "assistant", "content": r["completion"]}], "label": r["label"]}


def lf_form(src: Path, out: Path, row) -> None:
    """Normalized rows → LlamaFactory's own rows (``row``), streamed into ``out`` (atomically)."""
    import os

    import orjson
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(src, "rb") as fh, open(tmp, "wb") as dst:
        for line in fh:
            dst.write(orjson.dumps(row(orjson.loads(line))) + b"\n")
    os.replace(tmp, out)
