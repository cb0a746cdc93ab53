"""1 vs 2 processes for the same job: the quickstart (160 steps, global batch 8) on each backend, on this machine.

    HF_HUB_OFFLINE=1 python benchmarks/distributed_bench.py [--backends pytorch llamafactory] [--out /tmp/dist-bench]

Runs, one after another, with `llfarm run quickstart --set export.formats=[]`:
  1 process                  (torch's default intra-op threads)
  1 process, OMP_NUM_THREADS=1  (what torchrun gives each rank)
  1 process, batch_size=4 and grad_accum=2  (the same global batch in the micro-batches each DDP rank sees)
  2 processes (DDP, gloo)    distributed.launcher=torchrun, nproc_per_node=2, batch_size=4 (the same global batch)
and prints a Markdown table: wall time of the whole command, the trainer's train_runtime, first/final/mean loss,
and the final and mean loss difference of the 2-process run against the 1-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LLFARM = str(Path(sys.executable).parent / "llfarm")
CONFIGS = {
    "1 process": ([], {}),
    "1 process, OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"}),
    "1 process, batch 4 x grad_accum 2": (["training.batch_size=4", "training.grad_accum=2"], {}),
    "2 processes (torchrun, gloo)": (["distributed.launcher=torchrun", "distributed.nproc_per_node=2",
                                      "training.batch_size=4"], {}),
}


def run(backend: str, name: str, sets: list[str], env: dict[str, str], out: Path) -> dict:
    run_id = f"{backend}-{len(list(out.glob(backend + '-*')))}"
    args = [LLFARM, "run", "quickstart", "-b", backend, "-o", str(out), "--run-id", run_id,
            "--set", "export.formats=[]", *[a for s in sets for a in ("--set", s)]]
    load = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.run(args, env=dict(os.environ, **env), capture_output=True, text=True, check=False)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{backend} {name} failed:\n{proc.stderr[-3000:]}")
    run_dir = out / run_id
    m = json.loads((run_dir / "manifest.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    fm = m["final_metrics"]
    return {"backend": backend, "config": name, "wall_s": round(wall, 1), "train_runtime_s": fm.get("train_runtime"),
            "first_loss": losses[0], "final_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
            "world_size": fm.get("world_size", 1), "load_before": round(load, 2), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["pytorch", "llamafactory"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/llfarm-dist-bench"))
    opts = ap.parse_args()
    shutil.rmtree(opts.out, ignore_errors=True)
    opts.out.mkdir(parents=True)
    results = []
    for backend in opts.backends:
        for name, (sets, env) in CONFIGS.items():
            r = run(backend, name, sets, env, opts.out)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    (opts.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| backend | processes | wall (s) | train_runtime (s) | final loss | mean loss | final vs 1 proc | "
          "mean vs 1 proc | final vs batch 4 x accum 2 | load avg before |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def diff(r: dict, config: str, key: str) -> str:
        base = next(b for b in results if b["backend"] == r["backend"] and b["config"] == config)
        return f"{(r[key] - base[key]) / base[key] * 100:+.4f}%"

    for r in results:
        print(f"| {r['backend']} | {r['config']} | {r['wall_s']} | {r['train_runtime_s']:.1f} | {r['final_loss']:.7f} "
              f"| {r['mean_loss']:.5f} | {diff(r, '1 process', 'final_loss')} | {diff(r, '1 process', 'mean_loss')} | "
              f"{diff(r, '1 process, batch 4 x grad_accum 2', 'final_loss')} | {r['load_before']} |")


if __name__ == "__main__":
    main()
