#!/usr/bin/env bash
# CLI latency (lazy imports) and the quickstart's wall time. Usage: bash benchmarks/core_timings.sh [venv]
set -euo pipefail
VENV=${1:-.venv}
export HF_HUB_OFFLINE=1
out=$(mktemp -d)
for cmd in "--help" "plan quickstart" "plan quickstart --backend llamafactory" "plan unsloth_sft"; do
  best=999
  for _ in 1 2 3 4 5; do
    s=$(date +%s.%N); "$VENV/bin/llfarm" $cmd >/dev/null; e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc); best=$(echo "if ($t < $best) $t else $best" | bc)
  done
  printf 'llfarm %-40s best of 5: %.2f s\n' "$cmd" "$best"
done
s=$(date +%s.%N); run=$("$VENV/bin/llfarm" run quickstart -o "$out" 2>/dev/null | tail -1); e=$(date +%s.%N)
printf 'llfarm run quickstart (train 160 steps + ollama export): %.1f s\n' "$(echo "$e - $s" | bc)"
python3 - "$run" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1]); m = json.loads((run / "manifest.json").read_text())
fm = m["final_metrics"]
print(f"loss {fm['first_loss']:.3f} -> {fm['final_loss']:.3f} over {fm['steps']} steps; train_s {m['timings']['train_s']}")
for p in sorted((run / "exports").iterdir()):
    print(f"  {p.name}: {p.stat().st_size} bytes" if p.is_file() else f"  {p.name}/")
PY
rm -rf "$out"
