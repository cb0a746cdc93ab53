"""`llfarm data inspect`: what a dataset holds, before you train on it.

One streaming pass over the normalized rows (from the cache when a run already made it): counts, format, roles,
turns, system prompts, duplicates, empty answers. With a tokenizer (a strategy's, or ``--model``): token lengths of
the rendered examples with the strategy's template — a histogram, how many ``max_length`` truncates, and how many
it leaves with no trained token (those are dropped) — on a seeded sample (``--sample``; 0 = every example).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Stats:
    sample_size: int
    seed: int = 42
    count: int = 0
    roles: Counter = field(default_factory=Counter)
    user_turns: Counter = field(default_factory=Counter)
    with_system: int = 0
    empty_answers: int = 0
    duplicates: int = 0
    answer_chars: int = 0
    _seen: set = field(default_factory=set, repr=False)
    sample: list = field(default_factory=list, repr=False)
    _rng: random.Random = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, row: dict[str, Any]) -> None:
        self.count += 1
        h = int.from_bytes(hashlib.blake2b(orjson.dumps(row), digest_size=8).digest(), "little")
        if h in self._seen:
            self.duplicates += 1
        else:
            self._seen.add(h)
        if "messages" in row:
            msgs = row["messages"]
            answers = [msgs[-1]["content"]]
        elif "prompt" in row:
            msgs = row["prompt"]
            answers = [row["chosen"], row["rejected"]]
        else:
            msgs, answers = [], [row.get("text", "")]
        for m in msgs:
            self.roles[m["role"]] += 1
        users = sum(m["role"] == "user" for m in msgs)
        if msgs:
            self.user_turns[min(users, 4)] += 1
            self.with_system += msgs[0]["role"] == "system"
        self.empty_answers += any(not a.strip() for a in answers)
        self.answer_chars += sum(len(a) for a in answers)
        # reservoir sample (seeded) for the token lengths
        if self.sample_size == 0 or len(self.sample) < self.sample_size:
            self.sample.append(row)
        else:
            j = self._rng.randrange(self.count)
            if j < self.sample_size:
                self.sample[j] = row


def token_lengths(rows: list[dict[str, Any]], template, tokenizer, max_length: int) -> dict[str, Any]:
    """Lengths of the rendered examples (prompt + answer, as training tokenizes them) and what max_length does."""
    from ..train_common import split_sft

    lengths, truncated, no_answer = [], 0, 0
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for row in rows:
        if "messages" in row:
            prompt, answer = split_sft(template, row["messages"], tokenizer)
        elif "prompt" in row:
            prompt = template.render(row["prompt"], add_generation_prompt=True, bos_token=bos, eos_token=eos)
            answer = max((row["chosen"], row["rejected"]), key=len)
        else:
            prompt, answer = "", row.get("text", "")
        p = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
        a = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        lengths.append(p + a)
        truncated += p + a > max_length
        no_answer += p >= max_length and "text" not in row
    lengths.sort()

    def q(f: float) -> int:
        return lengths[min(len(lengths) - 1, int(f * len(lengths)))] if lengths else 0

    top = max(lengths) if lengths else 1
    edges = [2 ** k for k in range(3, max(4, math.ceil(math.log2(max(top, 8)))) + 1)]
    hist, lo = [], 0
    for hi in edges:
        hist.append({"from": lo + 1, "to": hi, "count": sum(lo < x <= hi for x in lengths)})
        lo = hi
    return {"examples": len(lengths), "min": lengths[0] if lengths else 0, "p50": q(0.5), "p90": q(0.9),
            "p99": q(0.99), "max": top if lengths else 0, "max_length": max_length, "truncated": truncated,
            "no_trained_token": no_answer, "histogram": [h for h in hist if h["count"] or h["to"] <= top * 2]}


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
