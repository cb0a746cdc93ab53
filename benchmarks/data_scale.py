#!/usr/bin/env python
"""Data at scale: `llfarm validate`, `llfarm data inspect` and a 2-step `llfarm run` on alpaca JSONL files of
10k / 100k / 1M short records (~310 bytes each, like the issue's 313 MB million), on this machine.

For each size it measures, with a fresh cache and then again with the cache warm:
- validate / inspect: wall time and peak RSS;
- run (`--set training.max_steps=2`): time to the first logged step, total wall time, peak RSS of the llfarm
  process and of the training child (sampled every 50 ms with psutil), and the disk the run wrote: its run
  directory and what it added to the data/token cache.

    python benchmarks/data_scale.py                       # 10k, 100k, 1M on pytorch
    python benchmarks/data_scale.py --sizes 10000 --backends pytorch,llamafactory
    python benchmarks/data_scale.py --out benchmarks/RESULTS-data.md

Nothing is downloaded; data is generated deterministically into --workdir.
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

import psutil

LLFARM = str(Path(sys.executable).parent / "llfarm")
WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from capital "
         "river city country").split()


def make_data(path: Path, n: int) -> None:
    if path.is_file():
        return
    rng = random.Random(0)

    def sent(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": sent(rng.randint(10, 40)), "input": "" if i % 3 else sent(10),
                                 "output": sent(rng.randint(15, 55))}) + "\n")
    tmp.rename(path)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure(args: list[str], env: dict[str, str], cwd: Path, first_step: Path | None = None,
            timeout: float = 3600) -> dict:
    """Run llfarm; wall time, peak RSS of the llfarm process and of its descendants, and (when ``first_step`` is a
    run folder glob root) the time its metrics.jsonl first shows a step."""
    start = time.time()
    proc = subprocess.Popen([LLFARM, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    me = psutil.Process(proc.pid)
    peak_parent = peak_child = 0
    first = None
    while proc.poll() is None:
        try:
            peak_parent = max(peak_parent, me.memory_info().rss)
            for c in me.children(recursive=True):
                try:
                    peak_child = max(peak_child, c.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        if first_step is not None and first is None:
            for m in first_step.glob("*/metrics.jsonl"):
                if '"loss"' in m.read_text(encoding="utf-8", errors="replace"):
                    first = time.time() - start
        if time.time() - start > timeout:
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    return {"rc": proc.returncode, "wall_s": round(time.time() - start, 2), "first_step_s": round(first, 2) if first
            else None, "rss_parent_mb": round(peak_parent / 2**20), "rss_child_mb": round(peak_child / 2**20),
            "stdout": out.decode()[-2000:], "stderr": err.decode()[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--backends", default="pytorch")
    p.add_argument("--workdir", type=Path, default=Path("bench-data"))
    p.add_argument("--out", type=Path, help="write the Markdown table here")
    a = p.parse_args(argv)
    work = a.workdir.absolute()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in a.sizes.split(",")):
        data = work / f"alpaca_{n}.jsonl"
        make_data(data, n)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, LLFARM_CACHE=str(cache), HF_HUB_OFFLINE="1")
        row = {"records": n, "file_mb": round(data.stat().st_size / 1e6, 1)}
        row["validate"] = measure(["validate", "quickstart", "--set", f"data.train={data}"], env, work)
        row["inspect"] = measure(["data", "inspect", str(data), "--model", "builtin:tiny-llama", "--json"], env, work)
        for backend in a.backends.split(","):
            for label in ("cold", "warm"):
                runs = work / f"runs-{n}-{backend}-{label}"
                shutil.rmtree(runs, ignore_errors=True)
                before = du(cache)
                r = measure(["run", "quickstart", "--backend", backend, "-o", str(runs), "--set", f"data.train={data}",
                             "--set", "training.max_steps=2", "--set", "export.formats=[]",
                             "--set", "training.save_every=null"], env, work, first_step=runs)
                r["run_dir_mb"] = round(du(runs) / 2**20, 2)
                r["cache_added_mb"] = round((du(cache) - before) / 2**20, 1)
                row[f"run_{backend}_{label}"] = r
        row["validate_warm"] = measure(["validate", "quickstart", "--set", f"data.train={data}"], env, work)
        results.append(row)
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk not in ("stdout", "stderr")}
                              if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results, a.backends.split(","))
    print(table)
    if a.out:
        a.out.write_text(table)
    return 0 if all(v.get("rc", 0) == 0 for r in results for v in r.values() if isinstance(v, dict)) else 1


def render(results: list[dict], backends: list[str]) -> str:
    lines = ["| records (file) | validate cold | validate warm | inspect (10k-sample tokens) | " +
             " | ".join(f"{b} run cold: first step / wall / RSS parent+child / disk run+cache | "
                        f"{b} run warm: first step / wall / disk run+cache" for b in backends) + " |",
             "|---" * (4 + 2 * len(backends)) + "|"]
    for r in results:
        v, vw, i = r["validate"], r["validate_warm"], r["inspect"]
        cells = [f"{r['records']:,} ({r['file_mb']} MB)", f"{v['wall_s']} s, {v['rss_parent_mb']} MB",
                 f"{vw['wall_s']} s, {vw['rss_parent_mb']} MB", f"{i['wall_s']} s, {i['rss_parent_mb']} MB"]
        for b in backends:
            c, w = r[f"run_{b}_cold"], r[f"run_{b}_warm"]
            cells.append(f"{c['first_step_s']} s / {c['wall_s']} s / {c['rss_parent_mb']}+{c['rss_child_mb']} MB / "
                         f"{c['run_dir_mb']}+{c['cache_added_mb']} MB")
            cells.append(f"{w['first_step_s']} s / {w['wall_s']} s / {w['run_dir_mb']}+{w['cache_added_mb']} MB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
