"""metrics.jsonl: one line per logging step, the same keys for every backend.

Keys: step, total_steps, epoch, loss, eval_loss, learning_rate, grad_norm, tokens_per_s, memory_mb, time,
plus stage metrics when present (rewards_chosen, rewards_rejected, reward_margin, reward_accuracy, accuracy).
Backends' children write it through :func:`trainer_callback` (a transformers TrainerCallback) or
:class:`MetricsWriter` directly; the runner tails it for the progress bar.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

# Backend/trainer key → llfarm key.
RENAMES = {
    "train_loss": "loss", "lr": "learning_rate", "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected", "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "eval_reward_margin",
    "eval_rewards/accuracies": "eval_reward_accuracy", "eval_accuracy": "eval_accuracy",
    "current_steps": "step", "train_tokens_per_second": "tokens_per_s", "margin": "reward_margin",
}
KEEP = {"step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s",
        "memory_mb", "time", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
        "eval_reward_margin", "eval_reward_accuracy", "accuracy", "eval_accuracy"}


def normalize(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        k = RENAMES.get(k, k)
        if k in KEEP and isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[k] = v
    return out


class MetricsWriter:
    def __init__(self, path: str | Path, total_steps: int | None = None):
        self.path = Path(path)
        self.total_steps = total_steps
        self.start = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        line = normalize(row)
        if self.total_steps and "total_steps" not in line:
            line["total_steps"] = self.total_steps
        line.setdefault("time", round(time.time() - self.start, 3))
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        return line


def trainer_callback(path: str | Path):
    """A transformers TrainerCallback that appends normalized rows to ``path`` on every log."""
    from transformers import TrainerCallback

    class LlfarmMetrics(TrainerCallback):
        def __init__(self) -> None:
            self.writer = MetricsWriter(path)
            self.tokens = 0
            self.last_time = time.time()
            self.last_tokens = 0

        def on_train_begin(self, args, state, control, **kw):
            self.writer.total_steps = state.max_steps

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or not state.is_world_process_zero:   # one writer: global rank 0
                return
            row = dict(logs)
            row["step"] = state.global_step
            row["total_steps"] = state.max_steps
            if state.epoch is not None:
                row["epoch"] = round(state.epoch, 4)
            seen = getattr(state, "num_input_tokens_seen", 0) or 0
            now = time.time()
            if seen > self.last_tokens and now > self.last_time:
                row["tokens_per_s"] = round((seen - self.last_tokens) / (now - self.last_time), 2)
                self.last_tokens, self.last_time = seen, now
            row["memory_mb"] = _memory_mb()
            if "train_runtime" in row and "loss" not in row:
                return  # the end-of-training summary, not a step
            self.writer.write(row)

    return LlfarmMetrics()


def _memory_mb() -> float:
    try:
        import torch
        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:  # noqa: BLE001 - metrics must never break training
        pass
    try:
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except Exception:  # noqa: BLE001
        return 0.0


def plot_loss(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """loss.png from metrics rows (train loss, and eval loss when present)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
