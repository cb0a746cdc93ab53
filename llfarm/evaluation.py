"""`llfarm eval`: how well a run's model answers — loss, perplexity and token accuracy on the answer tokens, and
exact match of its greedy answers — on the run's eval data or any SFT file, optionally against the base model.

Tokenized exactly as training tokenizes (train_common.tokenize_sft with the run's template and data.max_length):

    loss            mean cross-entropy over every answer token of the set (the completion mask of training:
                    the last assistant turn), each predicted from everything before it
    perplexity      exp(loss)
    token_accuracy  share of those answer tokens that are the model's most likely next token
    exact_match     share of examples whose greedy answer (generate's Generator: the run's template, stopping at
                    its end of turn) equals the reference answer, both stripped of surrounding whitespace

Results go to ``eval.json`` in the run directory (atomically) and a summary to manifest.json under ``eval``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, RunError
from .rundir import RunDir, atomic_write_text, now_iso

BATCH = 8


@dataclass
class EvalData:
    rows: list[dict[str, Any]]       # normalized SFT rows: {"messages": [...]} ending with the answer
    source: str                      # "run" (the run's own eval data) or "--data"
    path: str                        # absolute path, or the builtin:/hf: reference
    shown: str                       # as the user gave it (or as the run's path shows it)
    sha256: str                      # of the source's content


def read_sft(ref: str, key: str, system: str | None) -> tuple[list[dict[str, Any]], str]:
    """(normalized rows, sha256) of one SFT source, read and checked by the data layer exactly as a strategy's
    data.train is (same formats, same file:line errors); the normalized rows land in the data cache."""
    from .data import open_source
    from .data.prepare import scan
    src = scan(open_source(ref, key), weight=1.0, fmt_setting="auto", stage_kind="sft", system=system, columns={},
               write=True)
    with open(src.data_path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()], src.sha256


def eval_data(run: RunDir, manifest: dict[str, Any], data: str | None) -> EvalData:
    """The examples to score: ``--data`` (any SFT source llfarm reads, with the run's data.system) or the run's
    own eval data. Every problem is a one-line error before anything is loaded or written."""
    stage = manifest.get("stage", "sft")
    if data is not None:
        rows, sha = read_sft(data, "--data", manifest.get("system"))
        path = Path(data) if not data.startswith(("builtin:", "hf:")) else None
        return EvalData(rows, "--data", str(path.resolve()) if path else data, data, sha)
    if stage != "sft":
        raise DataError(f"a {stage} run's eval data are preference pairs; eval scores answers to prompts",
                        where=str(run), hint="pass --data FILE with instruction or conversation data")
    path = run.eval_data()
    if path is None:
        raise DataError("the run has no eval data (it was trained without data.eval or data.eval_split)",
                        where=str(run), hint="pass --data FILE (any SFT file llfarm reads, or builtin:NAME)")
    if not path.is_file():
        raise DataError(f"the run's eval data is gone ({path}; the data cache may have been cleared)",
                        where=str(run), hint="pass --data FILE, or run `llfarm validate` on its strategy to refill "
                                             "the cache")
    rows, sha = read_sft(str(path), "eval data", manifest.get("system"))
    return EvalData(rows, "run", str(path), run.show(path), sha)


def check_run(run: RunDir) -> dict[str, Any]:
    manifest = run.read_manifest()
    if manifest.get("stage") == "rm":
        raise RunError("this run trained a reward model, which scores pairs rather than answering prompts",
                       where=str(run), hint="its pair accuracy on the training pairs is in manifest.json "
                                            "(final_metrics.train_pair_accuracy)")
    run.output_dir()
    return manifest


def score(model, tokenizer, template, rows: list[dict[str, Any]], max_length: int,
          max_new_tokens: int | None) -> dict[str, Any]:
    """The four numbers for one model (see the module docstring), with the per-example answers."""
    import torch

    from .generate import Generator
    from .train_common import tokenize_sft

    examples, dropped = tokenize_sft(rows, template, tokenizer, max_length)
    nll, right, count = 0.0, 0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(examples), BATCH):
            batch = examples[start:start + BATCH]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in batch])
            attention = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
            mask = torch.tensor([e["completion_mask"] + [0] * (width - len(e["input_ids"])) for e in batch])
            logits = model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1]
            targets, answer = ids[:, 1:], mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll += float(losses[answer].sum())
            right += int((logits.argmax(-1) == targets)[answer].sum())
            count += int(answer.sum())
    gen = Generator(model, tokenizer, template)
    answers = []
    for row in rows:
        reference = row["messages"][-1]["content"]
        budget = max_new_tokens or len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + 16
        answer = gen.complete(gen.messages_ids(row["messages"][:-1]), max_new_tokens=budget)
        answers.append({"prompt": row["messages"][-2]["content"], "reference": reference, "answer": answer,
                        "exact": answer.strip() == reference.strip()})
    loss = nll / count if count else float("nan")
    exact = sum(a["exact"] for a in answers)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if count else float("nan"),
            "token_accuracy": round(right / count, 6) if count else float("nan"),
            "exact_match": round(exact / len(rows), 6) if rows else float("nan"),
            "exact_matches": exact, "n_examples": len(rows), "n_scored": len(examples), "n_dropped": dropped,
            "answer_tokens": count, "answers": answers}


def evaluate(run_dir: Path, data: str | None = None, *, baseline: bool = False,
             max_new_tokens: int | None = None) -> dict[str, Any]:
    """Score a run (and with ``baseline``, its base model) and record it: eval.json + manifest ``eval``."""
    from .compat import quiet_libraries
    from .generate import load_for_inference
    from .strategy import resolve
    from .templates import load_template
    from .train_common import tokenizer_for_template

    run = RunDir(Path(run_dir))
    manifest = check_run(run)
    examples = eval_data(run, manifest, data)
    if not examples.rows:
        raise DataError("no examples to evaluate", where=examples.shown)
    max_length = resolve(run.strategy_path).strategy.data.max_length
    template = load_template(manifest.get("template", "chatml"))
    quiet_libraries()

    def scored(kind: str) -> dict[str, Any]:
        model, tokenizer = load_for_inference(manifest["model_path"], run.output_dir(), kind)
        tokenizer = tokenizer_for_template(tokenizer, template)
        return score(model, tokenizer, template, examples.rows, max_length, max_new_tokens)

    result: dict[str, Any] = {
        "run": run.root.name, "created_at": now_iso(), "stage": manifest.get("stage"),
        "output_kind": manifest.get("output_kind"), "template": template.name, "max_length": max_length,
        "max_new_tokens": max_new_tokens or "reference length + 16",
        "data": {"source": examples.source, "path": examples.path, "shown": examples.shown, "sha256": examples.sha256,
                 "n_examples": len(examples.rows)},
        "model": scored(manifest.get("output_kind", "adapter")),
    }
    if baseline:
        result["baseline"] = {"model_path": manifest["model_path"], **scored("base")}
    atomic_write_text(run.root / "eval.json", json.dumps(result, indent=2) + "\n")
    run.update_manifest(eval=summary(result, examples.shown))
    return result


SUMMARY_KEYS = ("loss", "perplexity", "token_accuracy", "exact_match")


def summary(result: dict[str, Any], shown: str) -> dict[str, Any]:
    """What manifest.json keeps (and `llfarm runs` can show): the four numbers, n, the data, and the baseline's."""
    out: dict[str, Any] = {k: result["model"][k] for k in SUMMARY_KEYS}
    out.update(n=result["data"]["n_examples"], data=shown, at=result["created_at"], file="eval.json")
    if "baseline" in result:
        out["baseline"] = {k: result["baseline"][k] for k in SUMMARY_KEYS}
    return out


def render(result: dict[str, Any], shown_run: str, shown_data: str) -> list[str]:
    d = result["data"]
    m = result["model"]
    lines = [(f"eval {shown_run}: {d['n_examples']} examples from {shown_data} ({m['n_scored']} scored for loss, "
              f"{m['answer_tokens']} answer tokens)"),
             f"{'':<10}{'loss':>9}{'perplexity':>12}{'token acc':>11}{'exact match':>16}"]
    for name in ("model", "baseline"):
        if name in result:
            r = result[name]
            em = f"{r['exact_matches']}/{r['n_examples']} ({r['exact_match']:.3f})"
            lines.append(f"{'run' if name == 'model' else 'baseline':<10}{r['loss']:>9.4f}{r['perplexity']:>12.3f}"
                         f"{r['token_accuracy']:>11.3f}{em:>16}")
    return lines
