"""Run-directory mechanics: atomic manifest, latest checkpoint, metrics trimmed on resume, loss plot."""

from __future__ import annotations

import json
import sys

import pytest

from llfarm.errors import RunError
from llfarm.metrics import MetricsWriter, normalize, plot_loss
from llfarm.resume import drop_metrics_after
from llfarm.rundir import RunDir


def test_manifest_updates_are_atomic_and_merge(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.write_manifest({"status": "created", "a": 1})
    run.update_manifest(status="running")
    data = run.read_manifest()
    assert data["status"] == "running" and data["a"] == 1 and "updated_at" in data
    assert not [p for p in run.root.iterdir() if p.name.startswith(".manifest")], "temp file left behind"


def test_corrupt_or_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="not a run directory"):
        RunDir(tmp_path).read_manifest()
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(RunError, match="corrupt"):
        RunDir(tmp_path).read_manifest()


def test_latest_checkpoint_is_numeric_not_lexical(tmp_path):
    run = RunDir(tmp_path).create()
    for n in (5, 10, 9):
        (run.checkpoints / f"checkpoint-{n}").mkdir()
    assert run.latest_checkpoint().name == "checkpoint-10"


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path).create()
    writer = MetricsWriter(run.metrics_path, total_steps=8)
    for step in range(1, 9):
        writer.write({"step": step, "loss": 1.0 / step})
    drop_metrics_after(run, 5)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]


def test_normalize_maps_backend_keys():
    row = normalize({"train_loss": 1.5, "lr": 0.1, "rewards/margins": 0.3, "current_steps": 4, "junk": "x",
                     "eval_loss": float("nan")})
    assert row == {"loss": 1.5, "learning_rate": 0.1, "reward_margin": 0.3, "step": 4}


def test_loss_plot_is_a_png(tmp_path):
    rows = [{"step": i, "loss": 2.0 / i} for i in range(1, 6)] + [{"step": 5, "eval_loss": 0.7}]
    out = plot_loss(rows, tmp_path / "loss.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert plot_loss([], tmp_path / "none.png") is None
    json.dumps(rows)


def test_memory_sample_and_peaks():
    from llfarm.metrics import MEMORY_KEYS, memory_peaks, memory_sample, reset_memory_peaks
    blob = bytearray(200 * 2**20)
    blob[::4096] = b"x" * len(blob[::4096])            # touch every page
    before = memory_sample()
    del blob
    reset_memory_peaks()                                 # Linux: the RSS high-water mark starts again from now
    after = memory_sample()
    assert set(before) <= {*MEMORY_KEYS, "memory_mb"} and before["rss_peak_mb"] >= before["rss_mb"] > 200
    if sys.platform == "linux":
        assert after["memory_mb"] == after["rss_peak_mb"] < before["rss_peak_mb"] - 150
    rows = [{"step": 1, "rss_peak_mb": 10.0, "tokens_per_s": 5.0}, {"step": 2, "rss_peak_mb": 12.5, "tokens_per_s": 7.0},
            {"step": 3, "rss_peak_mb": 11.0, "tokens_per_s": 6.0}]
    assert memory_peaks(rows) == {"rss_peak_mb": 12.5, "tokens_per_s_median": 6.0}
    assert memory_peaks([]) == {}


def test_eval_data_is_found_in_one_place(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.write_manifest({"status": "completed", "data": {"eval": None}})
    assert run.eval_data() is None
    held = tmp_path / "cache" / "eval.jsonl"
    run.update_manifest(data={"eval": str(held)})
    assert run.eval_data() == held
