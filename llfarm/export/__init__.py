"""Export a run: merged HF model, GGUF, Ollama Modelfile.

    export_run(Path("runs/<id>"), ["ollama"], quant="q8_0")
    → [runs/<id>/exports/<name>-q8_0.gguf, runs/<id>/exports/Modelfile]

Everything that can be checked is checked before anything is written (formats, quant, stage, the template's
Ollama form, the architecture and tokenizer the GGUF converter needs). Outputs are built in a hidden staging
folder inside the output folder and renamed into place only when all of them succeeded.

This module imports nothing heavy; torch/transformers/peft and gguf load only when an export runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, LlfarmError, did_you_mean, one_of
from ..rundir import RunDir
from ..templates import ChatTemplate, load_template
from .merge import copy_model, has_tokenizer, merge_adapter
from .modelfile import model_name, ollama_create_command, render_modelfile

__all__ = ["FORMATS", "QUANTS", "export_name", "export_run", "ollama_create_command"]

FORMATS = ("merged", "gguf", "ollama")
QUANTS = ("f32", "f16", "q8_0")


def export_name(run_dir: Path, name: str | None = None) -> str:
    """The model name used for file names and ``ollama create``: ``name``, else the strategy name, else the run id,
    made into a name Ollama accepts (see :func:`~llfarm.export.modelfile.model_name`)."""
    if name is None:
        try:
            name = RunDir(Path(run_dir)).read_manifest().get("strategy_name")
        except LlfarmError:  # no readable manifest: the run dir's own name is a fine fallback
            name = None
    return model_name(name or Path(run_dir).resolve().name)


def export_run(run_dir: Path | RunDir, formats: list[str], quant: str = "q8_0", out: Path | None = None,
               name: str | None = None) -> list[Path]:
    """Export ``run_dir`` in ``formats`` (merged, gguf, ollama; ollama implies gguf) and return the paths written.

    ``quant`` (f32, f16, q8_0) applies to the GGUF; ``out`` defaults to ``RUN/exports``; ``name`` to the strategy name.
    Raises :class:`ExportError` (nothing written) when the run cannot be exported faithfully.
    """
    job = _plan(run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir)), formats, quant, out, name)
    return _execute(job)


# ---- planning: every check, no writes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    run: RunDir
    formats: tuple[str, ...]
    quant: str
    out: Path
    name: str
    stage: str
    template: ChatTemplate | None
    system: str | None
    adapter: Path | None  # set for adapter runs
    model: Path | None  # the full model dir for model runs
    base: str | None  # base model (local dir or hub id) for adapter runs
    eos_token: str | None

    @property
    def gguf_name(self) -> str:
        return f"{self.name}-{self.quant}.gguf"


def _plan(run: RunDir, formats: list[str], quant: str, out: Path | None, name: str | None) -> _Job:
    manifest = run.read_manifest()
    wanted = _check_formats(formats)
    if quant not in QUANTS:
        raise ExportError(f"unknown quantization '{quant}'{did_you_mean(quant, QUANTS)}", where="--quant",
                          hint=one_of(QUANTS))
    stage = str(manifest.get("stage") or "sft")
    needs_gguf = "gguf" in wanted
    if stage == "rm" and needs_gguf:
        raise ExportError("a reward model (stage rm) is not a causal LM, so it has no GGUF or Ollama form",
                          where=str(run), hint="export it with --format merged")

    template = _load_run_template(manifest)
    if "ollama" in wanted and template is None:
        raise ExportError("the run names no chat template, so a Modelfile TEMPLATE cannot match training",
                          where=run.show(run.manifest_path), hint="export --format gguf or merged")

    kind = manifest.get("output_kind")
    source = run.adapter if kind == "adapter" else run.model if kind == "model" else run.output_dir()
    if not source.is_dir() or not any(source.iterdir()):
        raise ExportError(f"the run has no {source.name}/ to export", where=str(run),
                          hint="check manifest.json's status and logs/ (did training finish?)")
    adapter = source if source == run.adapter else None
    base = None
    if adapter is not None:
        base = _resolve_base(manifest, adapter)

    tokenizer_dir = source if adapter is None or has_tokenizer(adapter) else None
    eos_token = _eos_token(tokenizer_dir, base)
    if "ollama" in wanted:  # raises when the template has no Ollama form or the system prompt cannot be quoted
        render_modelfile("x.gguf", template, eos_token=eos_token, system=manifest.get("system"), model_name="x")
    if needs_gguf:
        _check_gguf_source(source if adapter is None else None, base, tokenizer_dir)
    return _Job(run=run, formats=wanted, quant=quant, out=Path(out).absolute() if out else run.exports,
                name=export_name(run.root, name), stage=stage, template=template, system=manifest.get("system"),
                adapter=adapter, model=None if adapter else source, base=base, eos_token=eos_token)


def _check_formats(formats: list[str]) -> tuple[str, ...]:
    if not formats:
        raise ExportError("no export format given", where="--format", hint=one_of(FORMATS))
    for f in formats:
        if f not in FORMATS:
            raise ExportError(f"unknown export format '{f}'{did_you_mean(f, FORMATS)}", where="--format",
                              hint=one_of(FORMATS))
    wanted = set(formats) | ({"gguf"} if "ollama" in formats else set())
    return tuple(f for f in FORMATS if f in wanted)


def _load_run_template(manifest: dict[str, Any]) -> ChatTemplate | None:
    ref = manifest.get("template")
    return load_template(str(ref)) if ref else None


def _resolve_base(manifest: dict[str, Any], adapter: Path) -> str:
    from ..models import resolve_model

    ref = manifest.get("model_path")
    if not ref:
        cfg = adapter / "adapter_config.json"
        ref = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") if cfg.is_file() else None
    if not ref:
        raise ExportError("neither manifest.json nor adapter_config.json names the base model", where=str(adapter),
                          hint="add model_path to manifest.json")
    return resolve_model(str(ref))


def _model_file(local_dir: Path | None, base: str | None, filename: str) -> Path | None:
    """``filename`` from a local model dir, or from the hub cache for a hub id (HF_HUB_OFFLINE is respected)."""
    if local_dir is not None:
        path = local_dir / filename
        return path if path.is_file() else None
    if base is None:
        return None
    if Path(base).is_dir():
        path = Path(base) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(base, filename))
    except Exception:  # noqa: BLE001 - missing file, no network, gated repo: all mean "not available here"
        return None


def _eos_token(tokenizer_dir: Path | None, base: str | None) -> str | None:
    path = _model_file(tokenizer_dir, base, "tokenizer_config.json")
    if path is None:
        return None
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _check_gguf_source(model_dir: Path | None, base: str | None, tokenizer_dir: Path | None) -> None:
    try:
        from .gguf_convert import inspect_model
    except ImportError as exc:
        raise ExportError(f"the GGUF export needs the gguf package ({exc})", where="--format",
                          hint="pip install 'llfarm[export]'") from None

    config = _model_file(model_dir, base, "config.json")
    if config is None:
        raise ExportError("cannot read the model's config.json", where=str(model_dir or base),
                          hint="for a hub model, download it once (or set HF_HUB_OFFLINE=0)")
    tokenizer = _model_file(tokenizer_dir, base, "tokenizer.json")
    if tokenizer is None:
        raise ExportError("no tokenizer.json (a fast tokenizer) for the model", where=str(tokenizer_dir or base),
                          hint="save the tokenizer with save_pretrained from a fast tokenizer")
    inspect_model(json.loads(config.read_text(encoding="utf-8")), json.loads(tokenizer.read_text(encoding="utf-8")),
                  str(model_dir or base))


# ---- execution: build in staging, then rename into place -----------------------------------------------------------

def _execute(job: _Job) -> list[Path]:
    job.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llfarm-export-", dir=job.out))
    chat_template = job.template.jinja if job.template else None
    try:
        staged: list[tuple[Path, Path]] = []  # (staged path, final path)
        hf_dir = job.model
        if job.adapter is not None and ("merged" in job.formats or "gguf" in job.formats):
            hf_dir = merge_adapter(job.base, job.adapter, staging / "merged", chat_template=chat_template,
                                         sequence_classification=job.stage == "rm")
        elif "merged" in job.formats:
            copy_model(job.model, staging / "merged", chat_template=chat_template)
        if "merged" in job.formats:
            staged.append((staging / "merged", job.out / "merged"))

        if "gguf" in job.formats:
            from .gguf_convert import convert

            convert(hf_dir, staging / job.gguf_name, quant=job.quant, name=job.name, chat_template=chat_template,
                    add_bos=_template_adds_bos(job.template), eot_token=job.template.eos if job.template else None)
            staged.append((staging / job.gguf_name, job.out / job.gguf_name))

        if "ollama" in job.formats:
            text = render_modelfile(job.gguf_name, job.template, eos_token=job.eos_token, system=job.system,
                                    model_name=job.name)
            (staging / "Modelfile").write_text(text, encoding="utf-8")
            staged.append((staging / "Modelfile", job.out / "Modelfile"))

        for src, dst in staged:
            if dst.is_dir() and not dst.is_symlink():
                os.replace(dst, staging / f"replaced-{dst.name}")
            os.replace(src, dst)
        return [dst for _, dst in staged]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _template_adds_bos(template: ChatTemplate | None) -> bool:
    """Whether the chat template starts the text with BOS (llama3 does): the GGUF must then add it."""
    if template is None:
        return False
    marker = "\x00bos\x00"
    return template.render([{"role": "user", "content": "x"}], bos_token=marker).startswith(marker)
