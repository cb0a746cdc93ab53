"""The LlamaFactory backend's training process:

    python -m llfarm.backends.llamafactory.entry native/llamafactory_train.yaml \\
        --metrics metrics.jsonl --final native/final_metrics.json --template chatml

It is ``llamafactory-cli train native/llamafactory_train.yaml`` (LlamaFactory's own ``run_exp``, same config,
no torchrun on one device) plus what a run directory needs:

- the config is first checked by LlamaFactory's parser (``get_train_args``); a rejection becomes one line
  (``llfarm: LlamaFactory rejected ...``) and exit code 2;
- llfarm's metrics callback writes metrics.jsonl while training; for rm, the pairwise accuracy and reward
  margin of the batches since the last log are added to each row (LlamaFactory logs only the loss);
- for rm, the accuracy on the training pairs after training (value head at the last token, as LlamaFactory
  scores) goes to ``--final`` as train_pair_accuracy;
- the final adapter/model and every checkpoint get the tokenizer with the llfarm template's chat_template
  and end-of-turn eos, as the pytorch backend saves them;
- early stopping is LlamaFactory's own (``early_stopping_steps``); when training ends, whether it stopped early
  and the best evaluation go to ``native/outcome.json`` (``llfarm.stopping``);
- an out-of-memory error during training is reported to the runner (``native/oom.json``, exit code 75), which
  backs off to a smaller batch and continues (``llfarm.oom``);
- every checkpoint is marked complete once fully written (``llfarm.checkpoints``), the process dies with the
  llfarm process that started it (``llfarm.lifeline``), and secret-named options arrive through the environment
  (``LLFARM_SECRET_OPTIONS``), never through the config file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from llfarm.redact import SECRET_OPTIONS_ENV


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llfarm.backends.llamafactory.entry")
    ap.add_argument("config", help="LlamaFactory training YAML")
    ap.add_argument("--metrics", required=True, help="metrics.jsonl to write while training")
    ap.add_argument("--final", required=True, help="JSON file for metrics computed after training")
    ap.add_argument("--template", required=True, help="llfarm template name or YAML path")
    opts = ap.parse_args(argv)
    from llfarm import lifeline
    lifeline.guard()                    # die with the llfarm process that started us (and take our group along)
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

    args = read_config(opts.config)
    os.environ.pop(SECRET_OPTIONS_ENV, None)    # LlamaFactory's own subprocesses need not see it

    from llamafactory.hparams import get_train_args
    try:
        _, _, training_args, finetuning_args, _ = get_train_args(dict(args))
    except (ValueError, TypeError) as exc:  # HfArgumentParser and LlamaFactory's own checks raise these
        msg = " ".join(str(exc).split())
        print(f"llfarm: LlamaFactory rejected {opts.config}: {msg}", flush=True)
        return 2

    from llfarm import oom
    from llfarm.checkpoints import completeness_callback, instrument_saves
    from llfarm.metrics import trainer_callback
    from llfarm.stopping import outcome_callback, outcome_path
    from llfarm.templates import load_template

    instrument_saves()                  # a failed save names its file and disk (+ tests' fault injection)

    template = load_template(opts.template)
    stage = finetuning_args.stage
    rm_stats = RMStats() if stage == "rm" else None
    if rm_stats is not None:
        track_rm_batches(rm_stats)
    tokenizer_saver = TemplateTokenizer(template)
    callbacks = [tokenizer_saver, trainer_callback(opts.metrics)]
    if args.get("tokenized_path"):
        callbacks.append(TokenizedComplete(guard_tokenized_path(args["tokenized_path"])))
    if rm_stats is not None:
        callbacks.insert(0, RMLogs(rm_stats))
        callbacks.append(RMTrainAccuracy(rm_stats))
    callbacks.append(oom.watch(Path(opts.final).parent))     # out of memory → the runner backs off
    # when training ends: early stopping (LlamaFactory appends its EarlyStoppingCallback to this list) and the best
    callbacks.append(outcome_callback(outcome_path(opts.final), callbacks))
    callbacks.append(completeness_callback())   # last: after the tokenizer is written into each checkpoint

    from llamafactory.train.tuner import run_exp
    try:
        run_exp(args, callbacks=callbacks)
    except Exception as exc:  # noqa: BLE001 - the traceback goes to the log, one line ends it
        if oom.report(exc):
            return oom.EXIT_CODE
        traceback.print_exc()
        msg = " ".join(str(exc).split())[:500]
        print(msg if msg.startswith("llfarm: ") else f"llfarm: LlamaFactory failed: {type(exc).__name__}: {msg}",
              flush=True)
        return 1

    if training_args.should_save:
        tokenizer_saver.save(training_args.output_dir)
        from llfarm.trainer import distributed_final
        final: dict[str, Any] = distributed_final(training_args)
        if rm_stats is not None and rm_stats.train_pair_accuracy is not None:
            final["train_pair_accuracy"] = rm_stats.train_pair_accuracy
        Path(opts.final).write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
    return 0


def read_config(path: str) -> dict[str, Any]:
    """The LlamaFactory config: the YAML file, plus the secret-named options (hf_hub_token, ...) that llfarm passes
    through the environment and never writes into the file."""
    import yaml
    args: dict[str, Any] = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    args.update(json.loads(os.environ.get(SECRET_OPTIONS_ENV, "") or "{}"))
    return args


# ---------------------------------------------------------------- callbacks

def _callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


TOKENIZED_MARKER = "llfarm-complete"


def guard_tokenized_path(path: str) -> tuple[Path, int | None]:
    """LlamaFactory loads ``tokenized_path`` whenever the folder is not empty, and writes it in place: a run killed
    while saving leaves half a dataset, and a second run on the same data that starts while the first is saving
    would load (or remove) a folder being written. So the process that saves (global rank 0) holds an exclusive
    ``flock`` on ``<folder>.lock`` from here until the dataset is complete (marked at train begin, or its death):
    a second run waits for it, then loads. A folder without llfarm's marker found under the lock is a dead run's
    leftover: removed, so LlamaFactory tokenizes again. Returns the folder and the held lock's descriptor."""
    import shutil
    folder = Path(path)
    fd = None
    if os.environ.get("RANK", "0") == "0":
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{folder}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - no flock (Windows): one run at a time is the user's to keep
            pass
        if folder.exists() and not (folder / TOKENIZED_MARKER).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        if (folder / TOKENIZED_MARKER).is_file():
            os.close(fd)                     # complete: nothing to guard
            fd = None
    return folder, fd


class TokenizedComplete(_callback_base()):
    """Marks the tokenized dataset complete once training starts (LlamaFactory has saved it by then), and lets a
    waiting run on the same data go on."""

    def __init__(self, guarded: tuple[Path, int | None]) -> None:
        self.folder, self.lock_fd = guarded

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero and self.folder.is_dir():
            (self.folder / TOKENIZED_MARKER).write_text("complete\n", encoding="utf-8")
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class TemplateTokenizer(_callback_base()):
    """Keeps a copy of LlamaFactory's tokenizer with the llfarm template and writes it next to every saved
    checkpoint and the final output (LlamaFactory saves its own chat template otherwise)."""

    def __init__(self, template) -> None:
        self.template = template
        self.tokenizer = None

    def on_train_begin(self, args, state, control, **kw):
        tok = kw.get("processing_class") or kw.get("tokenizer")
        if tok is not None and self.tokenizer is None:
            from llfarm.train_common import tokenizer_for_template
            self.tokenizer = tokenizer_for_template(copy.deepcopy(tok), self.template)

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                self.save(ckpt)

    def save(self, out: str | Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))


class RMStats:
    """Chosen/rejected scores of the rm training batches since the last log, and the final accuracy."""

    def __init__(self) -> None:
        self.right = 0
        self.n = 0
        self.margin = 0.0
        self.train_pair_accuracy: float | None = None

    def add(self, chosen, rejected) -> None:
        c, r = chosen.detach().float().reshape(-1), rejected.detach().float().reshape(-1)
        self.right += int((c > r).sum().item())
        self.n += int(c.numel())
        self.margin += float((c - r).sum().item())

    def pop(self) -> dict[str, float]:
        if not self.n:
            return {}
        out = {"accuracy": round(self.right / self.n, 4), "reward_margin": self.margin / self.n}
        self.right, self.n, self.margin = 0, 0, 0.0
        return out


def track_rm_batches(stats: RMStats) -> None:
    """Record the scores LlamaFactory's PairwiseTrainer computes for each training batch (it logs only loss)."""
    from llamafactory.train.rm.trainer import PairwiseTrainer

    original = PairwiseTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = original(self, model, inputs, return_outputs=True, **kwargs)
        if model.training:
            stats.add(outputs[1], outputs[2])
        return (loss, outputs) if return_outputs else loss

    PairwiseTrainer.compute_loss = compute_loss


class RMLogs(_callback_base()):
    """Runs before the metrics callback: adds rm accuracy/margin to the training log row it is about to write."""

    def __init__(self, stats: RMStats) -> None:
        self.stats = stats

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs:
            logs.update(self.stats.pop())


class RMTrainAccuracy(_callback_base()):
    """After training: the share of training pairs whose chosen answer scores higher (value head, last token)."""

    def __init__(self, stats: RMStats) -> None:
        self.stats = stats

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kw):
        if model is None or train_dataloader is None:
            return
        import torch
        was_training = model.training
        model.eval()
        right = total = 0
        with torch.no_grad():
            for batch in train_dataloader:
                batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                _, _, values = model(**batch, output_hidden_states=True, return_dict=True, use_cache=False)
                half = batch["input_ids"].size(0) // 2
                masks = torch.split(batch["attention_mask"], half, dim=0)
                scores = [v.gather(dim=-1, index=m.sum(dim=-1, keepdim=True) - 1).reshape(-1)
                          for v, m in zip(torch.split(values, half, dim=0), masks)]
                right += int((scores[0] > scores[1]).sum().item())
                total += half
        if was_training:
            model.train()
        self.stats.train_pair_accuracy = round(right / max(total, 1), 4)


if __name__ == "__main__":
    sys.exit(main())
