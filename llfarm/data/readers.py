"""Where records come from: one streaming reader per kind of source, each naming every record's place
(``file:line`` or ``file[row N]``) so that errors point at it. Memory does not grow with the number of records.

    .jsonl .ndjson (.gz)      one JSON object per line (a UTF-8 BOM is accepted)
    .json (.gz)               a JSON array of objects (streamed), or JSON lines
    .csv .tsv                 a header row, then one record per row (csv module)
    .parquet                  record batches (pyarrow)
    .txt .md                  plain text: a document per line, or per file (data.text_unit)
    a folder                  a datasets.save_to_disk folder (Dataset or DatasetDict), or a folder of .txt files
    builtin:NAME              the shipped samples
    hf:ORG/NAME               a hub dataset through `datasets` (offline: only if cached)
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import DataError
from ..resources import resolve_builtin_data

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".txt": "text", ".md": "text"}
BOM = b"\xef\xbb\xbf"
Record = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Reader:
    ref: str                # as the strategy names it (absolute path, builtin:NAME, hf:ORG/NAME)
    key: str                # the strategy key, data.train or data.train[1]
    kind: str               # jsonl | json | csv | tsv | parquet | text | arrow | textdir | hub
    path: Path | None = None
    gz: bool = False
    split: str = "train"
    text_unit: str = "line"

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else self.ref

    # ---- identity --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of the content (a folder: of every file in it; a hub dataset: of its datasets fingerprint)."""
        if self.kind == "hub":
            ds = self._hub()
            return hashlib.sha256(f"{self.ref}|{self.split}|{ds._fingerprint}".encode()).hexdigest()
        assert self.path is not None
        if self.path.is_dir():
            h = hashlib.sha256()
            for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(self.path)}\0{sha256_file(f)}\0".encode())
            return h.hexdigest()
        return sha256_file(self.path)

    # ---- columns, for an early 'missing column' error ----------------------------------------------
    def columns(self) -> list[str] | None:
        """The field names every record has (csv/tsv header, parquet/arrow schema), or None for JSON and text."""
        if self.kind in ("csv", "tsv"):
            import csv
            with self._text() as fh:
                header = next(csv.reader(fh, delimiter="\t" if self.kind == "tsv" else ","), None)
            if not header:
                raise DataError("the file has no header row", where=self.label,
                                hint="the first row must name the columns")
            return header
        if self.kind == "parquet":
            return list(self._parquet().schema_arrow.names)
        if self.kind in ("arrow", "hub"):
            return list(self._dataset().column_names)
        return None

    # ---- records ------------------------------------------------------------------------------------
    def records(self) -> Iterator[Record]:
        rows = {"jsonl": self._jsonl, "json": self._json, "csv": self._csv, "tsv": self._csv,
                "parquet": self._parquet_rows, "text": self._text_rows, "textdir": self._text_rows,
                "arrow": self._dataset_rows, "hub": self._dataset_rows}[self.kind]()
        if not self.gz:
            return rows
        return self._gzip_guarded(rows)

    def _gzip_guarded(self, rows: Iterator[Record]) -> Iterator[Record]:
        try:
            yield from rows
        except (EOFError, gzip.BadGzipFile, zlib_error()) as exc:
            raise DataError(f"the gzip data is cut short or corrupt ({exc})", where=self.label,
                            hint="check the file (gzip -t)") from None

    def _open(self):
        assert self.path is not None
        if not self.gz:
            return open(self.path, "rb")
        f = gzip.open(self.path, "rb")
        try:
            f.peek(1)
        except (OSError, EOFError) as exc:
            f.close()
            raise DataError(f"cannot read it as gzip ({exc})", where=self.label,
                            hint="a .gz file must be gzip-compressed; decompress it or rename it") from None
        return f

    def _text(self):
        import io
        return io.TextIOWrapper(self._open(), encoding="utf-8-sig", newline="")

    def _jsonl(self, fh=None) -> Iterator[Record]:
        with (fh or self._open()) as f:
            for n, line in enumerate(f, 1):
                if n == 1 and line.startswith(BOM):
                    line = line[len(BOM):]
                if not line.strip():
                    continue
                where = f"{self.label}:{n}"
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise DataError(_json_problem(exc, "malformed JSON line"), where=where,
                                    hint="each line of a .jsonl file must be one JSON object in UTF-8") from None
                if not isinstance(item, dict):
                    raise DataError(f"expected a JSON object, received {type(item).__name__}", where=where,
                                    hint="each line of a .jsonl file must be one JSON object")
                yield where, item

    def _json(self) -> Iterator[Record]:
        """A JSON array (its first non-blank character is '['), else JSON lines."""
        f = self._open()
        head = f.peek(1 << 16)[: 1 << 16]
        if head.lstrip(BOM).lstrip().startswith(b"["):
            with f:
                yield from _json_array(f, self.label)
        else:
            yield from self._jsonl(f)

    def _csv(self) -> Iterator[Record]:
        import csv
        with self._text() as fh:
            reader = csv.DictReader(fh, delimiter="\t" if self.kind == "tsv" else ",")
            try:
                for row in reader:
                    where = f"{self.label}:{reader.line_num}"
                    if None in row:
                        raise DataError(f"the row has {len(reader.fieldnames or []) + len(row[None])} fields, the "
                                        f"header {len(reader.fieldnames or [])}", where=where,
                                        hint="quote fields that contain the delimiter")
                    yield where, {k: v for k, v in row.items() if k}
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 text ({exc.reason})", where=self.label, hint="save it as UTF-8") from None
            except csv.Error as exc:
                raise DataError(f"malformed CSV: {exc}", where=f"{self.label}:{reader.line_num}") from None

    def _parquet(self):
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(self.path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
            raise DataError(f"cannot read it as parquet ({str(exc).splitlines()[0][:120]})", where=self.label,
                            hint="write it with pyarrow/pandas to_parquet") from None

    def _parquet_rows(self) -> Iterator[Record]:
        n = 0
        for batch in self._parquet().iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"{self.label}[row {n}]", row

    def _text_rows(self) -> Iterator[Record]:
        assert self.path is not None
        files = sorted(self.path.rglob("*.txt")) if self.path.is_dir() else [self.path]
        for f in files:
            reader = Reader(ref=str(f), key=self.key, kind="text", path=f, gz=self.gz and f == self.path)
            with reader._open() as fh:
                try:
                    if self.text_unit == "file":
                        text = fh.read().decode("utf-8-sig")
                        if text.strip():
                            yield str(f), {"text": text}
                        continue
                    for n, line in enumerate(fh, 1):
                        text = line.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
                        if text.strip():
                            yield f"{f}:{n}", {"text": text}
                except UnicodeDecodeError as exc:
                    raise DataError(f"not UTF-8 text ({exc.reason})", where=str(f), hint="save it as UTF-8") from None

    def _hub(self):
        import os

        try:
            from datasets import load_dataset
            return load_dataset(self.ref.removeprefix("hf:"), split=self.split)
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, no such split: one line each
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            if offline:
                raise DataError(f"hub dataset '{self.ref}' is not in the local cache and HF_HUB_OFFLINE=1 forbids "
                                "downloading it", where=self.key,
                                hint="download it once with HF_HUB_OFFLINE unset, or point the strategy at a local "
                                     "file") from None
            raise DataError(f"cannot load hub dataset '{self.ref}' (split {self.split}): "
                            f"{' '.join(str(exc).split())[:200]}", where=self.key,
                            hint="check the name, the split, and your network/token") from None

    def _dataset(self):
        if self.kind == "hub":
            return self._hub()
        from datasets import DatasetDict, load_from_disk
        try:
            ds = load_from_disk(str(self.path))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot load the saved dataset ({' '.join(str(exc).split())[:160]})",
                            where=self.label, hint="a folder written by datasets' save_to_disk") from None
        if isinstance(ds, DatasetDict):
            if self.split not in ds:
                raise DataError(f"the saved DatasetDict has no split '{self.split}' (splits: {', '.join(ds)})",
                                where=self.key, hint="set split: in the source")
            ds = ds[self.split]
        return ds

    def _dataset_rows(self) -> Iterator[Record]:
        n = 0
        for batch in self._dataset().iter(batch_size=1000):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys), strict=True):
                n += 1
                yield f"{self.label}[row {n}]", dict(zip(keys, values, strict=True))


def zlib_error() -> type[Exception]:
    import zlib
    return zlib.error


def _json_problem(exc: Exception, what: str) -> str:
    msg = getattr(exc, "msg", str(exc))
    if "UTF-8" in msg or "surrogate" in msg:
        return f"not valid UTF-8 text ({msg})"
    if "BOM" in msg:
        return "a byte order mark (BOM) inside the file"
    col = getattr(exc, "colno", None)
    return f"{what}: {msg}" + (f" (column {col})" if col else "")


def _json_array(f, label: str) -> Iterator[Record]:
    """The objects of a JSON array, decoded one at a time (memory stays near one record)."""
    dec = json.JSONDecoder()
    chunks = _utf8_chunks(f)
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, eof
        chunk = next(chunks, None)
        if chunk is None:
            eof = True
            return False
        buf += chunk
        return True

    while "[" not in buf and more():
        pass
    buf = buf.lstrip("\ufeff")
    pos = buf.index("[") + 1
    line = buf.count("\n", 0, pos) + 1
    index = 0
    while True:
        while True:                           # skip whitespace and one comma
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                line += buf[pos] == "\n"
                pos += 1
            if pos < len(buf) or not more():
                break
        if pos >= len(buf):
            raise DataError("malformed JSON: the array is not closed", where=f"{label}:{line}",
                            hint="the file starts with '[' so it is read as one JSON array")
        if buf[pos] == "]":
            return
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                if not eof and more():
                    continue
                raise DataError(f"malformed JSON: {exc.msg}", where=f"{label}:{line + buf.count(chr(10), pos, exc.pos)}",
                                hint="the file starts with '[' so it is read as one JSON array") from None
        index += 1
        where = f"{label}[record {index}]"
        if not isinstance(obj, dict):
            raise DataError(f"expected an object per record, received {type(obj).__name__}", where=where)
        if _has_lone_surrogate(buf, pos, end):
            raise DataError("not valid UTF-8 text (a lone surrogate \\ud8xx escape)", where=where)
        line += buf.count("\n", pos, end)
        yield where, obj
        pos = end
        if pos > 1 << 20:                      # drop what has been read
            buf, pos = buf[pos:], 0


def _has_lone_surrogate(buf: str, start: int, end: int) -> bool:
    segment = buf[start:end]
    if "\\u" not in segment.lower() and not any("\ud800" <= c <= "\udfff" for c in segment):
        return False
    try:
        orjson.loads(segment)
        return False
    except orjson.JSONDecodeError:
        return True


def _utf8_chunks(f, size: int = 1 << 20) -> Iterator[str]:
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    while True:
        data = f.read(size)
        if not data:
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
            return
        try:
            yield decoder.decode(data)
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 text ({exc.reason})", where=getattr(f, "name", "data"),
                            hint="save the file as UTF-8") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_source(ref: str, key: str, *, split: str = "train", text_unit: str = "line") -> Reader:
    """A reader for one source, or one clear error (not found, unknown kind, remote URL)."""
    if ref.startswith("builtin:"):
        path = resolve_builtin_data(ref, key)
        return Reader(ref, key, SUFFIXES[path.suffix], path, text_unit=text_unit)
    if ref.startswith("hf:"):
        if ref.count("/") > 1 or not ref[3:]:
            raise DataError(f"'{ref}' is not a hub dataset id (hf:ORG/NAME)", where=key)
        return Reader(ref, key, "hub", split=split)
    if "://" in ref:
        raise DataError(f"remote URLs are not read directly: '{ref}'", where=key,
                        hint="download it to a file first, or use a hub dataset as hf:ORG/NAME")
    path = Path(ref)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or \
                (path / "state.json").is_file():
            return Reader(ref, key, "arrow", path, split=split)
        if any(path.rglob("*.txt")):
            return Reader(ref, key, "textdir", path, text_unit=text_unit)
        raise DataError("the folder is neither a datasets.save_to_disk folder nor a folder of .txt files",
                        where=ref, hint=f"point {key} at a file, or such a folder")
    if not path.is_file():
        raise DataError(f"file not found: {ref}", where=key,
                        hint="check the path (relative paths in a strategy are resolved against its folder)")
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3] if gz else name).suffix
    kind = SUFFIXES.get(suffix)
    if kind is None:
        raise DataError(f"cannot tell how to read '{path.name}' from its extension", where=key,
                        hint=f"use one of {', '.join(sorted(SUFFIXES))} (optionally .gz), or a folder")
    if gz and kind == "parquet":
        raise DataError("a parquet file is compressed inside; do not gzip it", where=ref)
    return Reader(ref, key, kind, path, gz=gz, split=split, text_unit=text_unit)
