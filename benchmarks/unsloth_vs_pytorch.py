#!/usr/bin/env python
"""SFT throughput and peak GPU memory of the same job on llfarm's `pytorch` and `unsloth` backends.

The job: a randomly initialised Llama built from a config (default ~0.67B parameters: hidden 2048, 12 layers,
vocab 32000), LoRA r=16 on all linear layers (or QLoRA with --method qlora), bf16, a fixed number of optimizer
steps, the same batch size and sequence length for both backends. Every example is exactly --seq-len tokens
(long answers truncated at data.max_length), so no step carries padding. Both runs go through `llfarm run`, so
they train on the same token ids (llfarm.train_common) and log with the same callback (llfarm.metrics):

- tokens/s: tokens of the steps after --warmup divided by their wall time (from metrics.jsonl `time`);
- peak memory: the largest `memory_mb` in metrics.jsonl = torch.cuda.max_memory_allocated() in the trainer.

Gradient checkpointing is the same for both (--gradient-checkpointing on: pytorch's
training.gradient_checkpointing and Unsloth's "unsloth" mode; off: neither).

    python benchmarks/unsloth_vs_pytorch.py                       # needs a CUDA GPU and llfarm[unsloth]
    python benchmarks/unsloth_vs_pytorch.py --method qlora --seq-len 2048
    python benchmarks/unsloth_vs_pytorch.py --plan-only           # build model + data, compile both; no GPU needed

Writes --workdir/results.json and prints a Markdown table. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

TINY = Path(__file__).resolve().parent.parent / "llfarm" / "builtin" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WORDS = ["river", "stone", "light", "garden", "window", "paper", "music", "winter", "orange", "market", "story",
         "bridge", "number", "silver", "cloud", "forest", "letter", "engine", "planet", "yellow", "quiet", "travel",
         "morning", "simple", "question", "answer"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="pytorch,unsloth", help="comma-separated, run in this order")
    p.add_argument("--method", choices=["lora", "qlora"], default="lora")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per backend")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", type=Path, default=Path("bench-unsloth"))
    p.add_argument("--timeout", type=int, default=3600, help="seconds per backend run")
    p.add_argument("--plan-only", action="store_true", help="compile both plans and stop (works without a GPU)")
    args = p.parse_args(argv)
    if args.warmup >= args.steps - 1:
        p.error("--warmup must leave at least two measured steps")
    return args


# ---------------------------------------------------------------- the model and the data

def build_model(args: argparse.Namespace, out: Path) -> int:
    """A random-init Llama (seed 0) in bf16 with the tiny model's tokenizer (its ids are < --vocab). Returns
    the parameter count. Reused when the folder already holds the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TINY)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.seq_len),
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    stamp = out / "bench_config.json"
    wanted = json.dumps(config.to_dict(), sort_keys=True)
    if stamp.is_file() and json.loads(stamp.read_text())["config"] == wanted:
        return json.loads(stamp.read_text())["parameters"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (TINY / name).is_file():
            shutil.copy(TINY / name, out / name)
    stamp.write_text(json.dumps({"config": wanted, "parameters": n}))
    return n


def write_data(args: argparse.Namespace, path: Path) -> int:
    """One example per sequence of the run: a short prompt and an answer longer than --seq-len tokens."""
    rng = random.Random(0)
    n = args.steps * args.batch_size
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            answer = " ".join(rng.choice(WORDS) for _ in range(args.seq_len))  # ≥ 1 token per word
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Write text number {i}."},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return n


def write_strategy(args: argparse.Namespace, backend: str, model: Path, data: Path, path: Path) -> Path:
    gc = args.gradient_checkpointing == "on"
    strategy = {
        "name": f"bench-{backend}",
        "description": "benchmarks/unsloth_vs_pytorch.py",
        "backend": backend,
        "model": {"path": str(model), "dtype": "bfloat16"},
        "template": "chatml",
        "stage": "sft",
        "method": {"type": args.method, "r": 16, "alpha": 16, "dropout": 0.0, "target_modules": "all"},
        "data": {"train": str(data), "max_length": args.seq_len},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": 1,
                     "learning_rate": 2.0e-4, "scheduler": "constant", "precision": "bf16",
                     "gradient_checkpointing": gc, "logging_steps": 1, "save_every": None, "keep_checkpoints": 1,
                     "seed": 0},
        "backend_options": {"unsloth": {"use_gradient_checkpointing": "unsloth" if gc else False}},
    }
    path.write_text(json.dumps(strategy, indent=2) + "\n", encoding="utf-8")   # JSON is valid YAML
    return path


# ---------------------------------------------------------------- running and measuring

def llfarm(*argv: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "llfarm.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def measure(run: Path, args: argparse.Namespace) -> dict:
    """tokens/s over the steps after warmup, and peak memory, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in rows if "loss" in r and "time" in r}
    last = max(steps)
    first = max(s for s in steps if s <= args.warmup) if any(s <= args.warmup for s in steps) else min(steps)
    seconds = steps[last]["time"] - steps[first]["time"]
    tokens = (last - first) * args.batch_size * args.seq_len
    manifest = json.loads((run / "manifest.json").read_text())
    return {
        "steps_measured": last - first,
        "seconds_measured": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "peak_memory_mb": max((r.get("memory_mb", 0) for r in rows), default=None),
        "final_loss": steps[last]["loss"],
        "train_s": manifest.get("timings", {}).get("train_s"),
        "versions": {k: v for k, v in manifest.get("versions", {}).items() if v},
        "run_dir": str(run),
    }


def table(results: dict, args: argparse.Namespace, meta: dict) -> str:
    setup = (f"GPU: {meta['gpu']} · model: random-init Llama, {meta['parameters'] / 1e9:.2f}B parameters "
             f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}) · {args.method}, r=16, all linear · "
             f"batch {args.batch_size} × {args.seq_len} tokens · {args.steps} steps ({args.warmup} warmup) · "
             f"bf16 · gradient checkpointing {args.gradient_checkpointing}")
    lines = [setup, "",
             "| backend | tokens/s | peak memory (MiB, max_memory_allocated) | final loss |",
             "|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {name} | {r['tokens_per_s']} | {r['peak_memory_mb']} | {r['final_loss']:.4f} |")
    ok = {k: v for k, v in results.items() if "error" not in v}
    if {"pytorch", "unsloth"} <= set(ok) and ok["pytorch"]["tokens_per_s"]:
        speed = ok["unsloth"]["tokens_per_s"] / ok["pytorch"]["tokens_per_s"]
        mem = ok["unsloth"]["peak_memory_mb"] / ok["pytorch"]["peak_memory_mb"]
        lines += ["", f"unsloth / pytorch: {speed:.2f}× tokens/s, {mem:.2f}× peak memory"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.plan_only:
        import torch
        if not torch.cuda.is_available():
            print("benchmark: needs a CUDA GPU (torch.cuda.is_available() is False); --plan-only compiles without "
                  "one", file=sys.stderr)
            return 2
    model = work / "model"
    print(f"building the model in {model} ...", file=sys.stderr)
    parameters = build_model(args, model)
    data = work / "train.jsonl"
    write_data(args, data)
    meta = {"parameters": parameters, "args": {k: str(v) for k, v in vars(args).items()},
            "gpu": "none (plan only)" if args.plan_only else __import__("torch").cuda.get_device_name(0),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: dict[str, dict] = {}
    for backend in backends:
        spec = write_strategy(args, backend, model, data, work / f"strategy-{backend}.yaml")
        if args.plan_only:
            proc = llfarm("plan", str(spec), "--out", str(work / "plans" / backend), timeout=args.timeout)
            results[backend] = {"planned": proc.returncode == 0}
            if proc.returncode != 0:
                results[backend]["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
            continue
        run_id = f"{backend}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"running {backend} ({args.steps} steps) ...", file=sys.stderr)
        proc = llfarm("run", str(spec), "-o", str(work / "runs"), "--run-id", run_id, timeout=args.timeout)
        if proc.returncode != 0:
            last_line = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            results[backend] = {"error": f"exit {proc.returncode}: {last_line}"}
            print(proc.stderr[-4000:], file=sys.stderr)
            continue
        results[backend] = measure(work / "runs" / run_id, args)
    (work / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if args.plan_only:
        print(json.dumps(results, indent=2))
        return 0 if all(r.get("planned") for r in results.values()) else 1
    print(table(results, args, meta))
    print(f"\n(results: {work / 'results.json'})", file=sys.stderr)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
