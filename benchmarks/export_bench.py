"""Export speed and peak memory on a ~0.5B Llama with random weights (bf16 safetensors, ~1 GB), side by side with
llama.cpp's convert_hf_to_gguf.py on the same model.

    tests/fetch-llamacpp-assets            # the reference converter and Llama 2's tokenizer (for the reference cases)
    python benchmarks/export_bench.py [--workdir DIR] [--keep] [--repeat N]

Builds the model once (with torch), with Llama 2's SentencePiece tokenizer rebuilt from llama.cpp's vocab GGUF
(so the reference converter accepts it; without the assets the built-in tiny tokenizer is used and the reference
cases are skipped). Beside it: a full-model run and a LoRA run (r=16 on every linear layer). Each case runs in a
fresh process started by a small wrapper that reads its one child's peak RSS (``getrusage(RUSAGE_CHILDREN)``),
the same way for llfarm and for the reference. Prints a Markdown table; --repeat N keeps each case's fastest run.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

CONFIG = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 28,
          "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode;"
           " print('BENCH', rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
CONVERT = ("import sys; from pathlib import Path; from llfarm.export.gguf_convert import convert; "
           "convert(Path(sys.argv[1]), Path(sys.argv[2]), quant=sys.argv[3], name='bench')")
EXPORT = ("import sys, json; from pathlib import Path; from llfarm.export import export_run; "
          "export_run(Path(sys.argv[1]), json.loads(sys.argv[2]), quant=sys.argv[3], out=Path(sys.argv[4]))")


def build(workdir: Path) -> dict[str, object]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llfarm.resources import BUILTIN_MODELS

    base = workdir / "base"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base)
    try:
        from llamacpp_assets import assets_dir, tokenizer_dir
        tok = tokenizer_dir("llama-spm") if assets_dir() else None
    except ImportError:
        tok = None
    for f in (tok or BUILTIN_MODELS["tiny-llama"]).iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, base / f.name)
    manifest = {"model_path": str(base), "template": "chatml", "system": None, "strategy_name": "bench",
                "stage": "sft"}
    full = workdir / "full"
    shutil.copytree(base, full / "model")
    (full / "manifest.json").write_text(json.dumps({**manifest, "output_kind": "model"}))
    lora = workdir / "lora"
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model.save_pretrained(lora / "adapter")
    (lora / "manifest.json").write_text(json.dumps({**manifest, "output_kind": "adapter"}))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return {"params": n_params, "safetensors_bytes": size, "tokenizer": "Llama 2 (SentencePiece)" if tok else
            "llfarm's tiny (the reference refuses it)", "reference": tok is not None}


def cases(workdir: Path, reference: bool) -> dict[str, tuple[list[str], Path]]:
    """name → (command, what it writes: a GGUF or a folder of them)."""
    py, base = sys.executable, str(workdir / "base")
    out: dict[str, tuple[list[str], Path]] = {}
    for quant in ("f16", "q8_0"):
        ours = workdir / f"ours-{quant}.gguf"
        out[f"llfarm convert, {quant}"] = ([py, "-c", CONVERT, base, str(ours), quant], ours)
        if reference:
            from llamacpp_assets import assets_dir

            ref = workdir / f"ref-{quant}.gguf"
            out[f"convert_hf_to_gguf.py, {quant}"] = ([py, str(assets_dir() / "convert_hf_to_gguf.py"), base,
                                                       "--outfile", str(ref), "--outtype", quant], ref)
    q4 = workdir / "ours-q4_k_m.gguf"
    out["llfarm convert, q4_k_m (llama.cpp's quantizer)"] = ([py, "-c", CONVERT, base, str(q4), "q4_k_m"], q4)
    for name, formats, quant in (("llfarm export --format adapter, f16 (LoRA run)", '["adapter"]', "f16"),
                                 ("llfarm export --format merged gguf, q8_0 (LoRA run: PEFT merge + convert)",
                                  '["merged", "gguf"]', "q8_0")):
        folder = workdir / f"out-{len(out)}"
        out[name] = ([py, "-c", EXPORT, str(workdir / "lora"), formats, quant, str(folder)], folder)
    return out


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of ``argv`` run as the only child of a fresh wrapper process."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None or line.split()[1] != "0":
        sys.exit(f"{argv[:4]} failed:\n{proc.stderr[-3000:]}")
    _, _, seconds, rss_kb = line.split()
    return float(seconds), int(rss_kb)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llfarm-export-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        info = build(workdir)
        print(f"built {info['params'] / 1e6:.0f}M params, {info['safetensors_bytes'] / 2**30:.2f} GiB bf16 "
              f"safetensors in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        root = None
        if info["reference"]:
            from llamacpp_assets import assets_dir
            root = assets_dir()
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root / "gguf-py") if root else "")
        ours_env = dict(os.environ, HF_HUB_OFFLINE="1")
        rows = []
        for name, (argv, written) in cases(workdir, bool(info["reference"])).items():
            runs = [measure(argv, env if "convert_hf_to_gguf" in name else ours_env) for _ in range(args.repeat)]
            seconds, rss = min(runs)
            size = size_of(written)
            rows.append((name, seconds, rss, size, [round(s, 1) for s, _ in runs]))
            print(f"{name}: {seconds:.1f} s, {rss / 1024:.0f} MiB, {size / 2**20:.0f} MiB", file=sys.stderr)
        if info["reference"]:
            from llamacpp_assets import gguf_differences

            for quant in ("f16", "q8_0"):
                diffs = gguf_differences(workdir / f"ours-{quant}.gguf", workdir / f"ref-{quant}.gguf")
                print(f"{quant}: llfarm's GGUF vs the reference's: differences {sorted(diffs) or 'none'}")
        print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
        print(f"model: {info['params'] / 1e6:.0f}M params, {info['safetensors_bytes'] / 2**30:.2f} GiB bf16; "
              f"tokenizer: {info['tokenizer']}\n")
        print("| case | wall time (s) | peak RSS (MiB) | output GGUF (MiB) | all runs (s) |")
        print("|---|---:|---:|---:|---|")
        for name, seconds, rss, size, runs in rows:
            print(f"| {name} | {seconds:.1f} | {rss / 1024:.0f} | {size / 2**20:.0f} | {runs} |")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
