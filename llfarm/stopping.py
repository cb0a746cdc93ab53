"""Early stopping and keep_best: what the training process does, and what the run directory records.

The strategy keys (``training.early_stopping``, ``training.keep_best``) become TrainingArguments in the one training
layer (``llfarm.training.best_arguments``: ``metric_for_best_model``, ``greater_is_better``,
``load_best_model_at_end``, and save_steps = eval_steps for keep_best). In the training process:

- early stopping is transformers' ``EarlyStoppingCallback`` (patience, threshold) — added by llfarm's shared trainer
  child, or by a backend's own trainer from its native key;
- keep_best is transformers' ``load_best_model_at_end``: the Trainer loads the best checkpoint's weights when
  training ends, and the backend saves those as adapter/ or model/;
- :func:`outcome_callback` writes ``native/outcome.json`` when training ends: the step it ended at, whether early
  stopping ended it, the best evaluation's step, metric and checkpoint.

:func:`manifest_fields` turns that file into the manifest's ``early_stopped`` and ``best`` blocks.
This module imports nothing heavy; transformers loads only inside :func:`outcome_callback`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUTCOME = "outcome.json"        # in native/, beside final_metrics.json


def outcome_path(final_metrics: str | Path) -> Path:
    """native/outcome.json, from the path of native/final_metrics.json that every training process is given."""
    return Path(final_metrics).with_name(OUTCOME)


def early_stopping_callback(kwargs: dict[str, Any] | None):
    """transformers' EarlyStoppingCallback with llfarm's compiled kwargs (None: no early stopping)."""
    if not kwargs:
        return None
    from transformers import EarlyStoppingCallback
    return EarlyStoppingCallback(**kwargs)


def outcome_callback(path: str | Path, callbacks: list[Any]):
    """A TrainerCallback that writes ``path`` when training ends. ``callbacks`` is the list the trainer was given
    (a backend that adds its own EarlyStoppingCallback appends it there): early stopping is read from the callback
    in it."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Outcome(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                Path(path).unlink(missing_ok=True)     # a resumed or backed-off process writes its own

        def on_train_end(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            stopper = next((c for c in callbacks if isinstance(c, EarlyStoppingCallback)), None)
            stopped = (stopper is not None and state.global_step < state.max_steps
                       and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience)
            best_ckpt = state.best_model_checkpoint
            out = {"global_step": state.global_step, "max_steps": state.max_steps,
                   "metric": args.metric_for_best_model, "best_step": state.best_global_step or None,
                   "best_metric": state.best_metric,
                   "best_checkpoint": Path(best_ckpt).name if best_ckpt else None,
                   "loaded_best": bool(args.load_best_model_at_end and best_ckpt),
                   "early_stopping": ({"patience": stopper.early_stopping_patience,
                                       "threshold": stopper.early_stopping_threshold} if stopper else None),
                   "early_stopped": stopped}
            from .rundir import atomic_write_text
            atomic_write_text(Path(path), json.dumps(out, indent=2) + "\n")

    return Outcome()


def manifest_fields(native: Path, strategy) -> dict[str, Any]:
    """The manifest's ``early_stopped`` and ``best`` blocks from native/outcome.json (only the keys the strategy asked
    for: ``early_stopped`` is null when early stopping was on and did not end the run)."""
    from .rundir import read_json
    from .training import NATIVE_METRICS
    o = read_json(native / OUTCOME)
    tr = strategy.training
    if not o or not (tr.early_stopping or tr.keep_best):
        return {}
    metric = {v: k for k, v in NATIVE_METRICS.items()}.get(o.get("metric"), o.get("metric"))
    out: dict[str, Any] = {}
    if tr.early_stopping:
        out["early_stopped"] = ({"step": o["global_step"], "max_steps": o["max_steps"], "best_step": o["best_step"],
                                 "best_metric": o["best_metric"], "metric": metric,
                                 "patience": (o.get("early_stopping") or {}).get("patience")}
                                if o.get("early_stopped") else None)
    if tr.keep_best:
        out["best"] = {"step": o["best_step"], "metric": metric, "value": o["best_metric"],
                       "checkpoint": f"checkpoints/{o['best_checkpoint']}" if o.get("best_checkpoint") else None,
                       "output_is_best": o["loaded_best"]}
    return out


def ending_note(manifest: dict[str, Any]) -> str:
    """What early stopping and keep_best did, for the line that ends a run (`run`, `resume`, `monitor`): empty when
    the strategy asked for neither."""
    notes = []
    stopped = manifest.get("early_stopped")
    if stopped:
        notes.append(f"stopped early at step {stopped['step']} of {stopped['max_steps']}: {stopped['metric']} "
                     f"best at step {stopped['best_step']} ({stopped['best_metric']:.4f}), then {stopped['patience']} "
                     "evaluations without improvement")
    best = manifest.get("best")
    if best and best.get("output_is_best"):
        notes.append(f"the output is the best checkpoint (step {best['step']}, {best['metric']} {best['value']:.4f})")
    return "".join(f"; {n}" for n in notes)
