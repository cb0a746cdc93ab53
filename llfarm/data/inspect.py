"""`llfarm data inspect`: what a dataset holds, before you train on it.

One streaming pass over the normalized rows (from the cache when a run already made it): counts, format, roles,
turns, system prompts, duplicates, empty answers. With a tokenizer (a strategy's, or ``--model``): token lengths of
the rendered examples with the strategy's template — a histogram, how many ``max_length`` truncates, and how many
it leaves with no trained token (those are dropped) — on a seeded sample (``--sample``; 0 = every example).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson


@dataclass
class Stats:
    """Statistics of normalized rows, one cheap ``add`` per row (it runs a million times for a million records)."""
    sample_size: int
    seed: int = 42
    count: int = 0
    shapes: Counter = field(default_factory=Counter)      # the sequence of roles of each conversation
    empty_answers: int = 0
    duplicates: int = 0
    answer_chars: int = 0
    _seen: set = field(default_factory=set, repr=False)
    sample: list = field(default_factory=list, repr=False)
    _rng: random.Random = field(default=None, repr=False)  # type: ignore[assignment]
    _next: int = 0
    _w: float = 1.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, row: dict[str, Any]) -> None:
        self.count += 1
        h = hash(orjson.dumps(row))          # 64-bit, this process only: enough to count duplicates
        if h in self._seen:
            self.duplicates += 1
        else:
            self._seen.add(h)
        if "messages" in row:
            msgs = row["messages"]
            answer = msgs[-1]["content"]
            self.empty_answers += not answer.strip()
            self.answer_chars += len(answer)
        elif "prompt" in row:
            msgs = row["prompt"]
            self.empty_answers += not (row["chosen"].strip() and row["rejected"].strip())
            self.answer_chars += len(row["chosen"]) + len(row["rejected"])
        else:
            msgs = ()
            self.empty_answers += not row.get("text", "").strip()
            self.answer_chars += len(row.get("text", ""))
        self.shapes[tuple([m["role"] for m in msgs])] += 1
        self._sample(row)

    def _sample(self, row: dict[str, Any]) -> None:
        """A seeded uniform sample of sample_size rows (reservoir sampling, Li's algorithm L: a random number only
        when a row is taken, not for every row); sample_size 0 keeps every row."""
        k = self.sample_size
        if k == 0 or len(self.sample) < k:
            self.sample.append(row)
            if len(self.sample) == k:
                self._w = math.exp(math.log(self._rng.random()) / k)
                self._next = k + int(math.log(self._rng.random()) / math.log(1 - self._w)) + 1
            return
        if self.count == self._next:
            self.sample[self._rng.randrange(k)] = row
            self._w *= math.exp(math.log(self._rng.random()) / k)
            self._next += int(math.log(self._rng.random()) / math.log(1 - self._w)) + 1

    @property
    def roles(self) -> Counter:
        out: Counter = Counter()
        for shape, n in self.shapes.items():
            for role in shape:
                out[role] += n
        return out

    @property
    def user_turns(self) -> Counter:
        out: Counter = Counter()
        for shape, n in self.shapes.items():
            if shape:
                out[min(shape.count("user"), 4)] += n
        return out

    @property
    def with_system(self) -> int:
        return sum(n for shape, n in self.shapes.items() if shape and shape[0] == "system")


class FastTokenizer:
    """What measuring lengths needs of a tokenizer, on the `tokenizers` library alone (no transformers, no torch):
    a model's tokenizer.json, its bos/eos from tokenizer_config.json, and — as ``tokenizer_for_template`` does for
    training — the template's end-of-turn as eos when it is one token. The ids equal the fast tokenizer's."""

    def __init__(self, folder: Path, template) -> None:
        import json

        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        self.bos_token = _content(cfg.get("bos_token"))
        self.eos_token = _content(cfg.get("eos_token"))
        if template.eos and self._tok.token_to_id(template.eos) is not None:
            self.eos_token = template.eos

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def length_counter(model_path: str, template):
    """A FastTokenizer where the model has a tokenizer.json (a local folder or the hub cache), else transformers'."""
    folder = Path(model_path) if Path(model_path).is_dir() else None
    if folder is None:
        try:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(model_path, "tokenizer.json")
            folder = Path(found).parent if isinstance(found, str) else None
        except ImportError:
            folder = None
    if folder is not None and (folder / "tokenizer.json").is_file():
        return FastTokenizer(folder, template)
    from transformers import AutoTokenizer

    from ..train_common import tokenizer_for_template
    tok = tokenizer_for_template(AutoTokenizer.from_pretrained(model_path), template)
    tok.lengths = lambda texts: [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    return tok


def token_lengths(rows: list[dict[str, Any]], template, tokenizer, max_length: int) -> dict[str, Any]:
    """Lengths of the rendered examples (prompt + answer, as training tokenizes them) and what max_length does.
    ``tokenizer`` has bos_token, eos_token and lengths(texts) (see length_counter)."""
    from ..train_common import split_sft

    prompts, answers = [], []
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for row in rows:
        if "messages" in row:
            prompt, answer = split_sft(template, row["messages"], tokenizer)
        elif "prompt" in row:
            prompt = template.render(row["prompt"], add_generation_prompt=True, bos_token=bos, eos_token=eos)
            answer = max((row["chosen"], row["rejected"]), key=len)
        else:
            prompt, answer = "", row.get("text", "")
        prompts.append(prompt)
        answers.append(answer)
    p_len, a_len = tokenizer.lengths(prompts), tokenizer.lengths(answers)
    lengths = sorted(p + a for p, a in zip(p_len, a_len, strict=True))
    truncated = sum(x > max_length for x in lengths)
    no_answer = sum(p >= max_length for p, row in zip(p_len, rows, strict=True) if "text" not in row)

    def q(f: float) -> int:
        return lengths[min(len(lengths) - 1, int(f * len(lengths)))] if lengths else 0

    top = lengths[-1] if lengths else 0
    hist, lo = [], 0
    for k in range(3, max(4, math.ceil(math.log2(max(top, max_length, 8)))) + 1):
        hi = 2 ** k
        hist.append({"from": lo + 1, "to": hi, "count": sum(lo < x <= hi for x in lengths)})
        lo = hi
    first = next((i for i, h in enumerate(hist) if h["count"]), 0)
    last = max((i for i, h in enumerate(hist) if h["count"] or h["from"] <= max_length <= h["to"]), default=0)
    return {"examples": len(lengths), "min": lengths[0] if lengths else 0, "p50": q(0.5), "p90": q(0.9),
            "p99": q(0.99), "max": top, "max_length": max_length, "truncated": truncated,
            "no_trained_token": no_answer, "histogram": hist[first:last + 1]}


def report(stats: Stats, sources: list[dict[str, Any]], tokens: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"sources": sources, "records": stats.count,
                           "formats": sorted({s["format"] for s in sources}),
                           "roles": dict(stats.roles), "user_turns": {("4+" if k == 4 else str(k)): v
                                                                      for k, v in sorted(stats.user_turns.items())},
                           "with_system": stats.with_system, "duplicates": stats.duplicates,
                           "empty_answers": stats.empty_answers,
                           "mean_answer_chars": round(stats.answer_chars / max(stats.count, 1), 1)}
    if tokens is not None:
        scale = stats.count / max(tokens["examples"], 1)
        tokens = dict(tokens, sampled=tokens["examples"] < stats.count,
                      estimated_truncated=round(tokens["truncated"] * scale),
                      estimated_no_trained_token=round(tokens["no_trained_token"] * scale))
        out["tokens"] = tokens
    return out


def render(rep: dict[str, Any]) -> None:
    """The report as rich tables (for people; --json is for scripts)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="data", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for s in rep["sources"]:
        t.add_row("source", f"{s['path']} ({s['format']}, {s['count']} records"
                            + (f", weight {s['weight']}" if s.get("weight", 1) != 1 else "") + ")")
    t.add_row("records", str(rep["records"]))
    t.add_row("roles", ", ".join(f"{k} {v}" for k, v in rep["roles"].items()) or "-")
    t.add_row("user turns", ", ".join(f"{k}: {v}" for k, v in rep["user_turns"].items()) or "-")
    t.add_row("with a system message", str(rep["with_system"]))
    t.add_row("duplicates", str(rep["duplicates"]))
    t.add_row("empty answers", str(rep["empty_answers"]))
    t.add_row("mean answer length", f"{rep['mean_answer_chars']} characters")
    console.print(t)
    tok = rep.get("tokens")
    if tok is None:
        console.print("token lengths: give a strategy (or --model) to measure them")
        return
    where = f"a seeded sample of {tok['examples']}" if tok["sampled"] else f"all {tok['examples']}"
    h = Table(title=f"tokens per example ({where}; max_length {tok['max_length']})")
    h.add_column("tokens", justify="right")
    h.add_column("examples", justify="right")
    h.add_column("")
    peak = max((b["count"] for b in tok["histogram"]), default=1) or 1
    for b in tok["histogram"]:
        mark = " ← max_length" if b["from"] <= tok["max_length"] <= b["to"] else ""
        h.add_row(f"{b['from']}–{b['to']}", str(b["count"]), "█" * round(30 * b["count"] / peak) + mark)
    console.print(h)
    console.print(f"p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, max {tok['max']} tokens; "
                  f"max_length truncates {tok['truncated']} and leaves {tok['no_trained_token']} with no trained "
                  f"token (dropped)" + (f" — about {tok['estimated_truncated']} and "
                                        f"{tok['estimated_no_trained_token']} of all {rep['records']}"
                                        if tok["sampled"] else ""))
