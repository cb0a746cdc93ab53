"""`llfarm data split` and `llfarm data convert`: deterministic file tools, streaming."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from ..errors import DataError
from .formats import KIND_OF, detect_format, normalize, rename_columns
from .prepare import held_out
from .readers import Reader


def output_kind(reader: Reader) -> str:
    """split writes records as they were read: csv/tsv/text keep their form, everything else becomes JSON lines."""
    return reader.kind if reader.kind in ("csv", "tsv", "text") else "jsonl"


SUFFIX = {"csv": ".csv", "tsv": ".tsv", "text": ".txt", "jsonl": ".jsonl"}


def default_outputs(reader: Reader, *labels: str) -> list[Path]:
    assert reader.path is not None
    name = reader.path.name
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"):
        name = name.removesuffix(ext)
    suffix = SUFFIX[output_kind(reader)]
    return [reader.path.with_name(f"{name}.{label}{suffix}") for label in labels]


class Writer:
    """Records out in one form, into a hidden temp file renamed into place at the end (nothing half-written)."""

    def __init__(self, path: Path, kind: str, fields: list[str] | None = None) -> None:
        self.path, self.kind = path, kind
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.fh = open(self.tmp, "wb")
        self.text = io.TextIOWrapper(self.fh, encoding="utf-8", newline="") if kind in ("csv", "tsv", "text") \
            else None
        self.csv = csv.DictWriter(self.text, fieldnames=fields or [], delimiter="\t" if kind == "tsv" else ",",
                                  extrasaction="ignore") if kind in ("csv", "tsv") else None
        if self.csv is not None:
            self.csv.writeheader()
        self.count = 0

    def write(self, rec: dict[str, Any]) -> None:
        self.count += 1
        if self.csv is not None:
            self.csv.writerow(rec)
        elif self.text is not None:
            self.text.write(rec["text"].replace("\n", " ") + "\n")
        else:
            self.fh.write(orjson.dumps(rec) + b"\n")

    def write_raw(self, line: bytes) -> None:
        self.count += 1
        self.fh.write(line)

    def close(self, keep: bool) -> None:
        (self.text or self.fh).close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def check_outputs(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.exists() and not force:
            raise DataError("the output exists", where=str(p), hint="pass --force to replace it, or name another")
        if not p.parent.is_dir():
            raise DataError("the output's folder does not exist", where=str(p))


def split_file(reader: Reader, fraction: float, seed: int, train_out: Path, eval_out: Path) -> tuple[int, int]:
    """Two passes: count, then write each record to train or eval (the same records for the same seed)."""
    n = sum(1 for _ in reader.records())
    if n < 2:
        raise DataError(f"{n} record(s): nothing to split", where=reader.label)
    held = held_out(n, fraction, seed)
    if all(held):
        raise DataError(f"{fraction:.0%} of {n} records leaves none for training", where=reader.label)
    fields = reader.columns() if reader.kind in ("csv", "tsv") else None
    kind = output_kind(reader)
    train_w, eval_w = Writer(train_out, kind, fields), Writer(eval_out, kind, fields)
    ok = False
    try:
        if reader.kind == "jsonl":            # JSON lines are copied byte for byte (the first pass checked them)
            with reader._open() as fh:
                lines = (line.removeprefix(b"\xef\xbb\xbf") for line in fh if line.strip())
                for i, line in enumerate(lines):
                    (eval_w if held[i] else train_w).write_raw(line if line.endswith(b"\n") else line + b"\n")
        else:
            for i, (_, rec) in enumerate(reader.records()):
                (eval_w if held[i] else train_w).write(rec)
        ok = True
    finally:
        train_w.close(ok)
        eval_w.close(ok)
    return train_w.count, eval_w.count


# ---------------------------------------------------------------- convert

TARGETS = ("alpaca", "messages", "sharegpt", "preference")
FROM_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def _to_alpaca(row: dict[str, Any], where: str) -> dict[str, Any]:
    msgs = row["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    body = msgs[1:] if system is not None else msgs
    if [m["role"] for m in body] != ["user", "assistant"]:
        raise DataError("a conversation with several turns has no alpaca form", where=where,
                        hint="convert it --to messages or --to sharegpt")
    out = {"instruction": body[0]["content"], "input": "", "output": body[1]["content"]}
    if system is not None:
        out["system"] = system
    return out


CONVERTERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "alpaca": _to_alpaca,
    "messages": lambda row, where: {"messages": row["messages"]},
    "sharegpt": lambda row, where: {"conversations": [{"from": FROM_ROLE[m["role"]], "value": m["content"]}
                                                      for m in row["messages"]]},
    "preference": lambda row, where: {
        "prompt": row["prompt"][0]["content"] if len(row["prompt"]) == 1 else row["prompt"],
        "chosen": row["chosen"], "rejected": row["rejected"]},
}


def convert_records(reader: Reader, target: str, fmt: str, columns: dict[str, str]) -> Iterator[dict[str, Any]]:
    detected = None
    for where, rec in reader.records():
        rec = rename_columns(rec, columns)
        if detected is None:
            detected = fmt if fmt != "auto" else detect_format(rec)
            if detected is None:
                raise DataError(f"cannot tell the format from the keys {sorted(rec)[:8]}", where=where,
                                hint="set --format")
            kind = KIND_OF[detected]
            if (target == "preference") != (kind == "preference") or kind == "text":
                raise DataError(f"{detected} records cannot become {target} records", where=reader.label,
                                hint="alpaca, messages and sharegpt convert into each other; preference pairs "
                                     "into the TRL preference form")
        yield CONVERTERS[target](normalize(detected, rec, where, None), where)


def convert_file(reader: Reader, target: str, fmt: str, columns: dict[str, str], out: Path) -> int:
    w = Writer(out, "jsonl")
    ok = False
    try:
        for rec in convert_records(reader, target, fmt, columns):
            w.write(rec)
        ok = True
    finally:
        w.close(ok)
    return w.count
