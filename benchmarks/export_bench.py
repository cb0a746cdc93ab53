"""Export speed and peak memory on a ~0.5B Llama with random weights (bf16 safetensors, ~1 GB).

    python benchmarks/export_bench.py [--workdir DIR] [--keep]

Builds the model once (with torch), fabricates two run dirs beside it — a full-model run and a LoRA-adapter run
(r=16 on every linear layer) — then times each export case in a fresh process and reads that process's peak RSS
(``VmHWM`` of /proc/self/status: unlike ``ru_maxrss`` it restarts at exec, so neither the builder's memory nor
another case's counts). Prints a Markdown table.
Everything is written under --workdir (default: a temp dir) and deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 28,
          "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
CASES = {  # name: (run, formats, quant)
    "gguf-f16 (full-model run)": ("full", ["gguf"], "f16"),
    "gguf-q8_0 (full-model run)": ("full", ["gguf"], "q8_0"),
    "merged + gguf-q8_0 (LoRA run: PEFT merge, save, convert)": ("lora", ["merged", "gguf"], "q8_0"),
}


def build(workdir: Path) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llfarm.resources import BUILTIN_MODELS

    base = workdir / "base"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(BUILTIN_MODELS["tiny-llama"] / f, base / f)
    manifest = {"model_path": str(base), "template": "chatml", "system": None, "strategy_name": "bench",
                "stage": "sft"}
    full = workdir / "full"
    shutil.copytree(base, full / "model")
    (full / "manifest.json").write_text(json.dumps({**manifest, "output_kind": "model"}))
    lora = workdir / "lora"
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(lora / "adapter")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, lora / "adapter" / f)
    (lora / "manifest.json").write_text(json.dumps({**manifest, "output_kind": "adapter"}))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return {"params": n_params, "safetensors_bytes": size}


def peak_rss_kb() -> int:
    """This process's resident-set high-water mark (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(case: str, workdir: Path) -> None:
    """One export in this process; prints JSON with wall time and this process's peak RSS."""
    from llfarm.export import export_run

    run, formats, quant = CASES[case]
    rss_before = peak_rss_kb()
    t0 = time.perf_counter()
    paths = export_run(workdir / run, formats, quant=quant, out=workdir / f"out-{run}-{quant}")
    seconds = time.perf_counter() - t0
    gguf = next(p for p in paths if p.suffix == ".gguf")
    print(json.dumps({"seconds": seconds, "peak_rss_kb": peak_rss_kb(),
                      "rss_after_imports_kb": rss_before, "gguf_bytes": gguf.stat().st_size,
                      "torch_imported": "torch" in sys.modules}))
    shutil.rmtree(workdir / f"out-{run}-{quant}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.workdir)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llfarm-export-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        info = build(workdir)
        print(f"built {info['params'] / 1e6:.0f}M params, {info['safetensors_bytes'] / 2**30:.2f} GiB bf16 "
              f"safetensors in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        rows = []
        for case in CASES:
            proc = subprocess.run([sys.executable, __file__, "--child", case, "--workdir", str(workdir)],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                sys.exit(f"{case} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((case, r))
            print(f"{case}: {r}", file=sys.stderr)
        print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
        print(f"model: {info['params'] / 1e6:.0f}M params, {info['safetensors_bytes'] / 2**30:.2f} GiB bf16\n")
        print("| case | wall time (s) | source read (MB/s) | peak RSS (MiB) | RSS after imports (MiB) | GGUF (MiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for case, r in rows:
            print(f"| {case} | {r['seconds']:.1f} | {info['safetensors_bytes'] / 1e6 / r['seconds']:.0f} | "
                  f"{r['peak_rss_kb'] / 1024:.0f} | {r['rss_after_imports_kb'] / 1024:.0f} | "
                  f"{r['gguf_bytes'] / 2**20:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
