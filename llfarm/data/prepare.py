"""Prepared data: every source normalized once into a cache, and a run's selection over the cached sources.

    scan(source)        stream it: detect and check the format record by record (errors name file:line), normalize,
                        and — when writing — store the normalized rows once, keyed by the source's content hash
                        (cache/data/src-<key>/data.jsonl + line offsets + meta.json). A second run, a second
                        backend, `validate` after a run: the scan is a lookup.
    select(...)         mixing weights (seeded), max_samples, the eval split, and — for a run that stops before one
                        pass over the data (training.max_steps) — a seeded subset of exactly the examples it will see:
                        index lists over the cached sources, no copy of the data.
    materialize()       the training/eval files the backends read (cache/data/sel-<key>/train.jsonl), written once
                        per selection; a single whole source is read in place.

Memory stays flat in the number of records (indices only); the cache is safe to delete (LLFARM_CACHE, default
~/.cache/llfarm). Runs reference it from manifest.json instead of copying the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..errors import DataError
from .formats import (
    KIND_OF,
    STAGE_KIND,
    conversation,
    detect_format,
    normalize,
    rename_columns,
    shape,
    turn_problem,
    unpair,
)
from .readers import Reader, open_source

NORMALIZER_VERSION = 1
COMPLETE = "meta.json"           # written last: a cache entry without it is incomplete


def cache_root() -> Path:
    env = os.environ.get("LLFARM_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llfarm"


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- one source

@dataclass
class SourceData:
    ref: str
    key: str                     # the strategy key, data.train[1]
    weight: float
    sha256: str                  # the source's content
    format: str
    kind: str                    # sft | preference | text
    count: int
    cache_key: str
    shapes: dict[str, int] = field(default_factory=dict)     # conversations with a system message / several turns
    turn_problem: list[str] | None = None      # [where, what] of the first conversation whose turns do not alternate
    dir: Path | None = None                                   # the cache entry, when written
    first: list[dict[str, Any]] = field(default_factory=list, repr=False)   # the first rows (not written: checks)

    @property
    def data_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "data.jsonl"

    def offsets(self) -> array:
        assert self.dir is not None
        out = array("Q")
        with open(self.dir / "offsets.bin", "rb") as fh:
            out.frombytes(fh.read())
        return out

    def manifest(self) -> dict[str, Any]:
        return {"path": self.ref, "sha256": self.sha256, "format": self.format, "count": self.count,
                "weight": self.weight}


def scan(reader: Reader, *, weight: float, fmt_setting: str, stage_kind: str | None, system: str | None,
         columns: dict[str, str], write: bool, visit: Callable[[dict[str, Any]], None] | None = None,
         stage: str | None = None, unpair_pairs: bool = False) -> SourceData:
    """Check and normalize one source (see the module docstring); from the cache when it is there. ``visit`` sees
    every normalized row (from the cache, or as the source is read); ``stage_kind`` None accepts any kind."""
    sha = reader.fingerprint()
    cache_key = digest(NORMALIZER_VERSION, sha, reader.kind, reader.split, reader.text_unit, fmt_setting, system,
                       sorted(columns.items()), *(["unpair"] if unpair_pairs else []))
    final = cache_root() / "data" / f"src-{cache_key[:40]}"
    if (final / COMPLETE).is_file():
        meta = json.loads((final / COMPLETE).read_text(encoding="utf-8"))
        src = SourceData(ref=reader.ref, key=reader.key, weight=weight, sha256=sha, format=meta["format"],
                         kind=meta["kind"], count=meta["count"], cache_key=cache_key, shapes=meta["shapes"],
                         turn_problem=meta["turn_problem"], dir=final)
        check_kind(src.kind, src.format, stage_kind, reader.key, stage)
        if visit is not None:
            with open(src.data_path, "rb") as fh:
                for line in fh:
                    visit(orjson.loads(line))
        return src
    check_columns(reader, columns)
    tmp = final.parent / f".tmp-{cache_key[:16]}-{os.getpid()}" if write else None
    try:
        src = _scan(reader, sha, cache_key, weight, fmt_setting, stage_kind, system, columns, tmp, visit, stage,
                    unpair_pairs)
        if tmp is not None:
            try:
                os.replace(tmp, final)
            except OSError:                  # another process finished the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
            src.dir = final
        return src
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _scan(reader: Reader, sha: str, cache_key: str, weight: float, fmt_setting: str, stage_kind: str | None,
          system: str | None, columns: dict[str, str], tmp: Path | None,
          visit: Callable[[dict[str, Any]], None] | None, stage: str | None,
          unpair_pairs: bool = False) -> SourceData:
    fmt: str | None = None
    first_where = ""
    count = with_system = multi_turn = 0
    problem: list[str] | None = None
    first: list[dict[str, Any]] = []
    fh = offsets = None
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        fh = open(tmp / "data.jsonl", "wb")
        offsets = array("Q")
    pos = 0
    dumps = orjson.dumps
    try:
        for where, rec in reader.records():
            if columns:
                rec = rename_columns(rec, columns)
            if fmt is None:
                fmt = fmt_setting if fmt_setting != "auto" else detect_format(rec)
                first_where = where
                if fmt is None:
                    raise DataError(f"cannot tell the format from the keys {sorted(rec)[:8]}", where=where,
                                    hint="expected alpaca (instruction/output), messages, conversations (ShareGPT), "
                                         "prompt/chosen/rejected or text; set data.format, or map names with "
                                         "data.columns")
                check_kind("kto" if unpair_pairs and KIND_OF[fmt] == "preference" else KIND_OF[fmt], fmt,
                           stage_kind, reader.key, stage)
            elif fmt_setting == "auto":
                other = detect_format(rec)
                if other is not None and other != fmt:
                    raise DataError(f"this record is in {other} format, the first one ({first_where}) in {fmt}",
                                    where=where, hint="a source must use one format throughout")
            row = normalize(fmt, rec, where, system)
            for row in (unpair(row) if unpair_pairs and "chosen" in row else (row,)):
                count += 1
                if visit is not None:
                    visit(row)
                if count <= 2:
                    first.append(row)
                msgs = conversation(row)
                if len(msgs) > 2:                # a single user turn and its answer has one shape, and alternates
                    s, m = shape(msgs)
                    with_system += s
                    multi_turn += m
                    if problem is None:
                        p = turn_problem(msgs)
                        if p:
                            problem = [where, p]
                if fh is not None:
                    line = dumps(row) + b"\n"
                    offsets.append(pos)
                    fh.write(line)
                    pos += len(line)
    finally:
        if fh is not None:
            fh.close()
    if count == 0:
        raise DataError("the dataset is empty: zero examples means zero training steps", where=reader.label,
                        hint="add examples, or point the strategy at another file")
    assert fmt is not None
    kind = "kto" if unpair_pairs and KIND_OF[fmt] == "preference" else KIND_OF[fmt]
    src = SourceData(ref=reader.ref, key=reader.key, weight=weight, sha256=sha, format=fmt, kind=kind,
                     count=count, cache_key=cache_key, shapes={"system": with_system, "multi-turn": multi_turn},
                     turn_problem=problem, first=first)
    if tmp is not None:
        with open(tmp / "offsets.bin", "wb") as out:
            offsets.tofile(out)
        meta = {"source": reader.ref, "sha256": sha, "format": fmt, "kind": kind, "count": count,
                "shapes": src.shapes, "turn_problem": problem, "normalizer": NORMALIZER_VERSION}
        (tmp / COMPLETE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return src


def check_kind(kind: str, fmt: str, stage_kind: str | None, key: str, stage: str | None = None) -> None:
    if stage_kind is None or kind == stage_kind:
        return
    if stage_kind == "kto":
        hint = "or set preference.unpair: true to read pairs as KTO feedback" if kind == "preference" else ""
        raise DataError(f"stage 'kto' needs unpaired feedback (prompt/completion/label), received {fmt}-format data",
                        where=key, hint=f"give records with a true/false label {hint}".strip())
    if stage_kind == "text":
        raise DataError(f"stage 'pt' needs plain text (a .txt file, or records with 'text'), received {fmt}-format "
                        "data", where=key, hint="continued pretraining trains on every token of documents; use "
                                               "stage: sft for conversations, dpo/orpo/simpo for pairs")
    if kind == "kto":
        raise DataError(f"stage '{stage}' cannot train on KTO feedback (prompt/completion/label)", where=key,
                        hint="use stage: kto for this data")
    if stage_kind == "preference":
        raise DataError(f"stage '{stage or 'dpo/rm'}' needs preference pairs (prompt/chosen/rejected), received "
                        f"{fmt}-format data",
                        where=key, hint="use stage: sft for this data, or give a preference dataset "
                                        "(builtin:preference)")
    if kind == "preference":
        raise DataError("stage 'sft' needs instruction or conversation data, received preference pairs", where=key,
                        hint="use stage: dpo or rm for preference data")
    raise DataError(f"stage 'sft' needs instruction or conversation data, received {fmt} data", where=key,
                    hint="plain text is for continued pretraining; give alpaca, messages or ShareGPT records")


def check_columns(reader: Reader, columns: dict[str, str]) -> None:
    """A column named by data.columns that a CSV/parquet/saved dataset does not have: one error, up front."""
    if not columns:
        return
    have = reader.columns()
    if have is None:
        return
    for canonical, name in columns.items():
        if name not in have and canonical not in have:
            raise DataError(f"data.columns maps '{canonical}' to column '{name}', which is not in the data "
                            f"(columns: {', '.join(have[:12])})", where=reader.label,
                            hint="fix data.columns or the file's header")


# ---------------------------------------------------------------- a run's selection

@dataclass
class PreparedData:
    """What a strategy's data comes to: counts and checks for every backend, and (after ``materialize``) the
    training/eval JSONL files of normalized rows the backends read."""
    kind: str
    source_format: str
    n_train: int
    n_eval: int
    n_available: int                      # training examples before a max_steps subset
    sources: list[SourceData]
    eval_sources: list[SourceData]
    key: str                              # identifies the selection (sources, weights, seed, split, subset)
    train_index: array = field(repr=False, default_factory=lambda: array("Q"))   # global row numbers
    eval_index: array = field(repr=False, default_factory=lambda: array("Q"))
    train_path: Path | None = None
    eval_path: Path | None = None

    @property
    def shapes(self) -> dict[str, int]:
        out = {"system": 0, "multi-turn": 0}
        for s in (*self.sources, *self.eval_sources):
            for k, v in s.shapes.items():
                out[k] += v
        return out

    @property
    def turn_problem(self) -> list[str] | None:
        return next((s.turn_problem for s in (*self.sources, *self.eval_sources) if s.turn_problem), None)

    def manifest(self) -> dict[str, Any]:
        return {"format": self.source_format, "kind": self.kind, "n_train": self.n_train, "n_eval": self.n_eval,
                "n_available": self.n_available,
                "sha256": {s.ref: s.sha256 for s in (*self.sources, *self.eval_sources)},
                "sources": [s.manifest() for s in self.sources],
                "eval_sources": [s.manifest() for s in self.eval_sources],
                "selection": self.key,
                "train": str(self.train_path) if self.train_path else None,
                "eval": str(self.eval_path) if self.eval_path else None}

    # ---- files --------------------------------------------------------------------------------------
    def materialize(self) -> PreparedData:
        """The train/eval files: a whole single source in place, otherwise written once per selection."""
        if self.train_path is not None:
            return self
        if _is_whole(self.sources, self.train_index):
            self.train_path = self.sources[0].data_path
        else:
            self.train_path = _write_selection(self.key, "train", self.sources, self.train_index)
        if self.n_eval:
            pool = self.eval_sources or self.sources
            if _is_whole(pool, self.eval_index):
                self.eval_path = pool[0].data_path
            else:
                self.eval_path = _write_selection(self.key, "eval", pool, self.eval_index)
        return self

    def sample(self, n: int = 2) -> list[dict[str, Any]]:
        """The first n normalized training rows of the first source (for checks that call user code)."""
        src = self.sources[0]
        if src.dir is not None:
            with open(src.data_path, "rb") as fh:
                return [orjson.loads(line) for _, line in zip(range(n), fh)]
        return list(src.first)[:n]

    def rows(self, which: str = "train", limit: int | None = None):
        """Normalized rows of the selection (streamed from the cache), e.g. for inspect and eval."""
        self.materialize()
        path = self.train_path if which == "train" else self.eval_path
        if path is None:
            return
        with open(path, "rb") as fh:
            for n, line in enumerate(fh):
                if limit is not None and n >= limit:
                    return
                yield orjson.loads(line)


def _is_whole(sources: list[SourceData], index: array) -> bool:
    return len(sources) == 1 and len(index) == sources[0].count and \
        all(i == n for n, i in enumerate(index[:1000])) and index[-1] == len(index) - 1


def _write_selection(key: str, which: str, sources: list[SourceData], index: array) -> Path:
    final = cache_root() / "data" / f"sel-{key[:40]}" / f"{which}.jsonl"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{which}-{os.getpid()}.tmp")
    bounds = []
    start = 0
    for s in sources:
        bounds.append((start, start + s.count, s))
        start += s.count
    try:
        with open(tmp, "wb") as out:
            for lo, hi, s in bounds:
                rows = sorted(i - lo for i in index if lo <= i < hi)
                if not rows:
                    continue
                with open(s.data_path, "rb") as fh:
                    if len(rows) > s.count // 8:              # dense: one sequential pass
                        want = iter(rows)
                        nxt = next(want, None)
                        for n, line in enumerate(fh):
                            while nxt == n:
                                out.write(line)
                                nxt = next(want, None)
                            if nxt is None:
                                break
                    else:                                     # sparse: seek to each row
                        offsets = s.offsets()
                        for r in rows:
                            fh.seek(offsets[r])
                            out.write(fh.readline())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def select(sources: list[SourceData], eval_sources: list[SourceData], *, seed: int, max_samples: int | None,
           eval_split: float, needed: int | None) -> PreparedData:
    """Mix (weights), cap (max_samples), split (eval_split) and, for a run that sees fewer examples than there are,
    take a seeded subset of exactly those. Deterministic in the seed; index lists only."""
    train = _mix(sources, seed)
    mixed = len(sources) > 1 or any(s.weight != 1.0 for s in sources)
    if max_samples and max_samples < len(train):
        if mixed:                            # a mix is capped evenly, not by its first source
            order = list(train)
            random.Random(seed).shuffle(order)
            train = array("Q", sorted(order[:max_samples]))
        else:                                # one source: the first max_samples records, as written
            train = train[:max_samples]
    evals = _mix(eval_sources, seed) if eval_sources else array("Q")
    if not eval_sources and eval_split > 0:
        held = held_out(len(train), eval_split, seed)
        if all(held):
            raise DataError(f"eval_split {eval_split} leaves no training examples out of {len(train)}",
                            where="data.eval_split", hint="lower data.eval_split or add data")
        evals = array("Q", (g for g, h in zip(train, held, strict=True) if h))
        train = array("Q", (g for g, h in zip(train, held, strict=True) if not h))
    available = len(train)
    if needed is not None and needed < len(train):
        keep = sorted(random.Random(seed).sample(range(len(train)), needed))
        train = array("Q", (train[i] for i in keep))
    kinds = {s.kind for s in (*sources, *eval_sources)}
    formats = sorted({s.format for s in sources})
    key = digest("selection", [(s.cache_key, s.weight) for s in sources], [(s.cache_key, s.weight)
                                                                            for s in eval_sources],
                 seed, max_samples, eval_split, needed)
    return PreparedData(kind=kinds.pop() if len(kinds) == 1 else "mixed", source_format="+".join(formats),
                        n_train=len(train), n_eval=len(evals), n_available=available, sources=sources,
                        eval_sources=eval_sources, key=key, train_index=train, eval_index=evals)


def held_out(n: int, fraction: float, seed: int) -> bytearray:
    """Which of n examples go to eval (1) — a seeded shuffle, the first round(n·fraction) (at least one)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    held = bytearray(n)
    for i in idx[:max(1, int(round(n * fraction)))]:
        held[i] = 1
    return held


def _mix(sources: list[SourceData], seed: int) -> array:
    """Global row numbers: each source whole ``int(weight)`` times plus a seeded sample of the fraction."""
    out = array("Q")
    start = 0
    for n, s in enumerate(sources):
        whole, frac = int(s.weight), s.weight - int(s.weight)
        rows = range(start, start + s.count)
        for _ in range(whole):
            out.extend(rows)
        extra = int(round(frac * s.count))
        if extra:
            out.extend(sorted(random.Random(f"{seed}:{n}").sample(rows, extra)))
        start += s.count
    if len(out) == 0:
        raise DataError("the mix selects no examples (every weight rounds to zero)", where="data.train",
                        hint="raise a source's weight")
    return out


def open_sources(spec, which: str, stage: str, *, write: bool) -> list[SourceData]:
    d = spec.data
    items = d.sources(which)
    stage_kind = STAGE_KIND[stage]
    out = []
    for i, item in enumerate(items):
        key = f"data.{which}" if isinstance(getattr(d, which), str) else f"data.{which}[{i}]"
        reader = open_source(item.path, key, split=item.split, text_unit=d.text_unit)
        out.append(scan(reader, weight=item.weight, fmt_setting=d.format, stage_kind=stage_kind, system=d.system,
                        columns=d.columns, write=write, stage=stage, unpair_pairs=spec.preference.unpair))
    return out


def token_cache_dir(namespace: str, data: PreparedData, *parts: Any) -> Path:
    """Where a tokenized copy of this selection lives: keyed by the data and by ``parts`` (the tokenizer's
    fingerprint, the template, max_length, the stage, ... — whatever decides the tokens)."""
    return cache_root() / "tokens" / f"{namespace}-{digest(data.key, *parts)[:40]}"
