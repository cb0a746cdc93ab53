"""What does llfarm add on top of LlamaFactory? The same job run two ways, side by side:

  llfarm   `llfarm run STRATEGY --backend llamafactory --set training.max_steps=N ...`  (the whole CLI: resolve,
           data, compile, the entry module around LlamaFactory's run_exp, metrics.jsonl, collect, loss.png, manifest)
  native   `llamafactory-cli train native/llamafactory_train.yaml`  (the config llfarm wrote, run by hand with the
           environment from native/command.txt)

Runs alternate (llfarm, native, llfarm, native, ...) so background load hits both alike. For each run the report
gives the wall time, the CPU time of the process tree (user + sys: less sensitive to other jobs on a shared machine),
HF Trainer's train_runtime (the training loop alone) and wall - train_runtime (start-up and wrap-up outside the
loop); then the medians, the llfarm/native ratios and the overheads. Usage:

    python benchmarks/llamafactory_overhead.py --steps 100 --repeats 3 --workdir /tmp/lf-overhead
    python benchmarks/llamafactory_overhead.py --plan-only      # write the native config, print both commands

The result on the development machine is in benchmarks/RESULTS-llamafactory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def llfarm_args(strategy: str, steps: int) -> list[str]:
    return [strategy, "--backend", "llamafactory", "--set", f"training.max_steps={steps}",
            "--set", "training.save_every=null", "--set", "export.formats=[]"]


def plan(strategy: str, steps: int, workdir: Path) -> tuple[Path, dict[str, str]]:
    """Write the native config with `llfarm plan --out`; returns (yaml path, the env command.txt sets)."""
    out = workdir / "plan"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([str(BIN / "llfarm"), "plan", *llfarm_args(strategy, steps), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llfarm plan failed: {proc.stderr.strip()}")
    command = (out / "native" / "command.txt").read_text().strip()
    env = {}
    for word in shlex.split(command.split(" && ", 1)[1]):
        if "=" not in word or word.startswith("-"):
            break
        key, _, value = word.partition("=")
        env[key] = value
    return out / "native" / "llamafactory_train.yaml", env


def timed(argv: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Wall time, and CPU time (user + sys of the whole process tree, less sensitive to other load)."""
    before = os.times()
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(argv, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - start
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed (exit {proc.returncode}); see {log}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall": round(elapsed, 2), "cpu": round(cpu, 2)}


def train_runtime(results: Path) -> float:
    """HF Trainer's own train_runtime (the training loop only) from LlamaFactory's all_results.json."""
    return float(json.loads(results.read_text())["train_runtime"])


def same_job(a: Path, b: Path, a_root: Path, b_root: Path) -> bool:
    """The llfarm run's config is the planned one, up to the run directory's path."""
    return (a.read_text().replace(str(a_root), "RUN") == b.read_text().replace(str(b_root), "RUN"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="quickstart")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llfarm-lf-overhead"))
    ap.add_argument("--plan-only", action="store_true", help="write the native config and print both commands")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    yaml_path, env = plan(args.strategy, args.steps, args.workdir)
    runs = args.workdir / "runs"
    llfarm_cmd = [str(BIN / "llfarm"), "run", *llfarm_args(args.strategy, args.steps), "-o", str(runs)]
    native_cmd = [str(BIN / "llamafactory-cli"), "train", str(yaml_path)]
    commands = {"llfarm": shlex.join(llfarm_cmd + ["--run-id", "<id>"]),
                "native": " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " " +
                          shlex.join(native_cmd)}
    if args.plan_only:
        print(json.dumps({"commands": commands, "native_config": str(yaml_path), "env": env}, indent=2))
        return 0

    shutil.rmtree(runs, ignore_errors=True)
    rows: dict[str, list[dict[str, float]]] = {"llfarm": [], "native": []}
    for i in range(args.repeats):
        t = timed([*llfarm_cmd, "--run-id", f"r{i}"], {}, args.workdir / f"llfarm-{i}.log")
        t["train_runtime"] = train_runtime(runs / f"r{i}" / "native" / "output" / "all_results.json")
        rows["llfarm"].append(t)
        t = timed(native_cmd, env, args.workdir / f"native-{i}.log")
        t["train_runtime"] = train_runtime(yaml_path.parent.parent / "checkpoints" / "all_results.json")
        rows["native"].append(t)
        print(f"repeat {i + 1}: llfarm {rows['llfarm'][-1]}, native {rows['native'][-1]}", file=sys.stderr)
    first = runs / "r0"
    if not same_job(first / "native" / "llamafactory_train.yaml", yaml_path, first, yaml_path.parent.parent):
        raise SystemExit("the llfarm run's config differs from the planned one: not the same job")
    for who in rows.values():
        for t in who:
            t["outside_loop"] = round(t["wall"] - t["train_runtime"], 2)
    med = {who: {k: round(statistics.median(t[k] for t in ts), 2) for k in ts[0]} for who, ts in rows.items()}
    manifest = json.loads((first / "manifest.json").read_text())
    result = {
        "strategy": args.strategy, "steps": args.steps, "repeats": args.repeats, "runs": rows, "median": med,
        "ratio_llfarm_over_native": {k: round(med["llfarm"][k] / med["native"][k], 3) for k in ("wall", "cpu")},
        "overhead_s": {k: round(med["llfarm"][k] - med["native"][k], 2) for k in ("wall", "cpu", "outside_loop")},
        "llfarm_final_loss": manifest["final_metrics"].get("final_loss"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "versions": {k: manifest["versions"].get(k) for k in ("llfarm", "llamafactory", "torch", "transformers")},
        "commands": commands,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
