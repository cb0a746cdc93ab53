"""metrics.jsonl: one line per logging step, the same keys for every backend.

Keys: step, total_steps, epoch, loss, eval_loss, learning_rate, grad_norm, tokens_per_s, memory_mb, time,
plus stage metrics when present: rewards_chosen, rewards_rejected, reward_margin, reward_accuracy, logps_chosen,
logps_rejected (dpo, orpo, simpo, kto); accuracy (rm); reward, reward_std, kl (grpo; ppo's mean reward model score
is reward), rlhf_reward, policy_loss, value_loss (ppo),
plus memory (:data:`MEMORY_KEYS`, MiB = 2**20 bytes, sampled by :func:`memory_sample` at every logging step):

    rss_mb            the training process's resident memory now
    rss_peak_mb       its peak resident memory since training began (Linux: the kernel's high-water mark, reset
                      when training begins, so model loading is not in it; elsewhere: since the process started)
    gpu_allocated_mb  CUDA only: torch.cuda.memory_allocated() now (tensors)
    gpu_reserved_mb   CUDA only: torch.cuda.memory_reserved() now (tensors + the caching allocator's free blocks)
    gpu_peak_mb       CUDA only: torch.cuda.max_memory_allocated() since training began (the CUDA context,
                      a few hundred MiB per process, is in none of the gpu_* figures)
    memory_mb         gpu_peak_mb on CUDA, else rss_peak_mb (kept for older readers)

Backends' children write it through :func:`trainer_callback` (a transformers TrainerCallback) or
:class:`MetricsWriter` directly; the runner tails it for the progress bar, and at the end records the peaks
(:func:`memory_peaks`) in manifest.json's ``memory`` block.
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
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
    "objective/scores": "reward", "objective/kl": "kl", "objective/rlhf_reward": "rlhf_reward",
    "loss/policy_avg": "policy_loss", "loss/value_avg": "value_loss",
}
MEMORY_KEYS = ("rss_mb", "rss_peak_mb", "gpu_allocated_mb", "gpu_reserved_mb", "gpu_peak_mb")
KEEP = {"step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s",
        "memory_mb", "time", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
        "eval_reward_margin", "eval_reward_accuracy", "accuracy", "eval_accuracy",
        "logps_chosen", "logps_rejected", "reward", "reward_std", "kl", "rlhf_reward", "policy_loss", "value_loss",
        *MEMORY_KEYS}


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
            reset_memory_peaks()

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
            if "train_runtime" in row and "loss" not in row:
                return  # the end-of-training summary, not a step
            row.update(memory_sample())
            self.writer.write(row)

    return LlfarmMetrics()


# ---------------------------------------------------------------- memory

MIB = 2**20


def _cuda():
    """torch, when it is already imported and sees a CUDA device (metrics never import torch themselves)."""
    import sys
    torch = sys.modules.get("torch")
    try:
        return torch if torch is not None and torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - metrics must never break training
        return None


def _rss_bytes() -> int | None:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001
        return None


def _rss_peak_bytes() -> int | None:
    """The process's peak RSS: ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:  # noqa: BLE001
        return None


def reset_memory_peaks() -> None:
    """Start the peaks afresh (when training begins): the CUDA allocator's peak, and on Linux the kernel's RSS
    high-water mark (``echo 5 > /proc/self/clear_refs``, which ru_maxrss follows); elsewhere the RSS peak
    keeps counting from the process start."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    torch = _cuda()
    if torch is not None:
        try:
            torch.cuda.reset_peak_memory_stats()
        except Exception:  # noqa: BLE001
            pass


def memory_sample() -> dict[str, float]:
    """The memory keys of a metrics row (see the module docstring), in MiB; keys that cannot be read are left out."""
    out: dict[str, float] = {}
    rss, peak = _rss_bytes(), _rss_peak_bytes()
    if rss is not None:
        out["rss_mb"] = round(rss / MIB, 1)
    if peak is not None:
        out["rss_peak_mb"] = round(max(peak, rss or 0) / MIB, 1)
    torch = _cuda()
    if torch is not None:
        try:
            out["gpu_allocated_mb"] = round(torch.cuda.memory_allocated() / MIB, 1)
            out["gpu_reserved_mb"] = round(torch.cuda.memory_reserved() / MIB, 1)
            out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        except Exception:  # noqa: BLE001
            pass
    if "gpu_peak_mb" in out or "rss_peak_mb" in out:
        out["memory_mb"] = out.get("gpu_peak_mb", out.get("rss_peak_mb"))
    return out


def memory_peaks(rows: list[dict[str, Any]]) -> dict[str, float]:
    """manifest.json's ``memory`` block: the largest of each memory figure over the run's metrics rows, and the
    median tokens/s."""
    out: dict[str, float] = {}
    for key, name in (("rss_peak_mb", "rss_peak_mb"), ("gpu_peak_mb", "gpu_peak_mb"),
                      ("gpu_reserved_mb", "gpu_reserved_peak_mb")):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out[name] = max(values)
    speeds = sorted(r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float)))
    if speeds:
        out["tokens_per_s_median"] = speeds[len(speeds) // 2]
    return out


def plot_loss(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path | None:
    """loss.png from metrics rows: train loss (PPO, which logs no single loss: its policy loss and mean reward), and
    eval loss when present. Every stage that logged a step gets one, so every run directory has the same files."""
    key, label = next(((k, lab) for k, lab in (("loss", "train loss"), ("policy_loss", "policy loss"),
                                               ("reward", "mean reward")) if any(k in r for r in rows)),
                      ("loss", "train loss"))
    train = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    rewards = [(r["step"], r["reward"]) for r in rows if "reward" in r and "step" in r] if key == "policy_loss" else []
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label=label)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if key != "reward" else "reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if rewards:
        twin = ax.twinx()
        twin.plot(*zip(*rewards), color="tab:green", label="mean reward")
        twin.set_ylabel("reward")
        twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
