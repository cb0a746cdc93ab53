"""Export a run: merged HF model, GGUF, GGUF LoRA adapter, Ollama Modelfile.

    export_run(Path("runs/<id>"), ["ollama"], quant="q8_0")
    → [runs/<id>/exports/<name>-q8_0.gguf, runs/<id>/exports/Modelfile]
    export_run(Path("runs/<id>"), ["adapter", "ollama"], ollama_base="llama3.2:1b")
    → [runs/<id>/exports/<name>-lora-f16.gguf, runs/<id>/exports/Modelfile]   # FROM llama3.2:1b + ADAPTER

Everything that can be checked is checked before anything is written (formats, quant, stage, the template's
Ollama form, the architecture and tokenizer the GGUF converter needs, the adapter). Outputs are built in a hidden
staging folder inside the output folder and renamed into place only when all of them succeeded.

This module imports nothing heavy; torch/transformers/peft load only for a merge, gguf only when a GGUF is planned.
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
from .modelfile import OllamaTemplate, from_line, model_name, named_template, ollama_create_command, render_modelfile

__all__ = ["FORMATS", "KQUANTS", "MODEL_TEMPLATE", "QUANTS", "export_name", "export_run", "ollama_create_command"]

FORMATS = ("merged", "gguf", "adapter", "ollama")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # written by gguf-py
KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # written by llama.cpp's quantizer (the llamacpp extra)
QUANTS = GGUF_QUANTS + KQUANTS
ADAPTER_QUANTS = ("f32", "f16", "bf16", "q8_0")
MODEL_TEMPLATE = "model"  # manifest "template": the model's own jinja chat template (its tokenizer's)


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
               name: str | None = None, *, ollama_template: bool = True, ollama_base: str | None = None) -> list[Path]:
    """Export ``run_dir`` in ``formats`` and return the paths written.

    ``formats``: merged, gguf, adapter (a GGUF LoRA adapter; adapter runs only), ollama (a Modelfile: for the merged
    GGUF, or with ``adapter`` for ``FROM <base>`` + ``ADAPTER``; implies gguf unless adapter is asked for).
    ``quant`` applies to model GGUFs; an adapter GGUF uses it when it is f32/f16/bf16/q8_0, else f16.
    ``ollama_template=False`` writes the Modelfile without TEMPLATE (Ollama then uses the GGUF's jinja).
    ``ollama_base``: the Modelfile's FROM for an adapter (an Ollama model name or a base GGUF); by default the base
    model is converted beside the adapter. ``out`` defaults to ``RUN/exports``; ``name`` to the strategy name.
    Raises :class:`ExportError` (nothing written) when the run cannot be exported faithfully.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    return _execute(_plan(run, formats, quant, out, name, ollama_template, ollama_base))


# ---- planning: every check, no writes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    run: RunDir
    formats: tuple[str, ...]
    quant: str
    out: Path
    name: str
    stage: str
    system: str | None
    adapter: Path | None  # set for adapter runs
    model: Path | None  # the full model dir for model runs
    base: str | None  # base model (local dir or hub id) for adapter runs
    chat_template: str | None  # jinja the merged model / GGUF carries
    pin_template: bool  # a named template: write it into the merged tokenizer (a model's own is already there)
    ollama: OllamaTemplate | None  # None: no TEMPLATE
    add_bos: bool
    eot_token: str | None
    ollama_base: str | None  # FROM for an adapter Modelfile; None: convert the base beside it
    adapter_quant: str

    @property
    def gguf_name(self) -> str:
        return f"{self.name}-{self.quant}.gguf"

    @property
    def adapter_name(self) -> str:
        return f"{self.name}-lora-{self.adapter_quant}.gguf"

    @property
    def base_gguf_name(self) -> str:
        return f"{model_name(Path(str(self.base)).name)}-{self.quant}.gguf"

    @property
    def model_ggufs(self) -> bool:
        return "gguf" in self.formats


def _plan(run: RunDir, formats: list[str], quant: str, out: Path | None, name: str | None, ollama_template: bool,
          ollama_base: str | None) -> _Job:
    manifest = run.read_manifest()
    wanted = _check_formats(formats)
    if quant not in QUANTS:
        raise ExportError(f"unknown quantization '{quant}'{did_you_mean(quant, QUANTS)}", where="--quant",
                          hint=one_of(QUANTS))
    stage = str(manifest.get("stage") or "sft")
    if stage == "rm" and set(wanted) - {"merged"}:
        raise ExportError("a reward model (stage rm) is not a causal LM, so it has no GGUF or Ollama form",
                          where=str(run), hint="export it with --format merged")

    kind = manifest.get("output_kind")
    source = run.adapter if kind == "adapter" else run.model if kind == "model" else run.output_dir()
    if not source.is_dir() or not any(source.iterdir()):
        raise ExportError(f"the run has no {source.name}/ to export", where=str(run),
                          hint="check manifest.json's status and logs/ (did training finish?)")
    adapter = source if source == run.adapter else None
    if "adapter" in wanted and adapter is None:
        raise ExportError("this run trained the full model, so it has no LoRA adapter to export", where=str(run),
                          hint="export --format gguf")
    base = _resolve_base(manifest, adapter) if adapter is not None else None
    tokenizer_dir = source if adapter is None or has_tokenizer(adapter) else None
    if ollama_base is not None and not ("adapter" in wanted and "ollama" in wanted):
        raise ExportError("--ollama-base is the FROM of an adapter Modelfile", where="--ollama-base",
                          hint="use it with --format adapter --format ollama")

    template, chat_template = _run_template(manifest, tokenizer_dir, base)
    eos_token = _tokenizer_config(tokenizer_dir, base).get("eos_token")
    eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
    bos_token = _tokenizer_config(tokenizer_dir, base).get("bos_token")
    bos_token = bos_token.get("content") if isinstance(bos_token, dict) else bos_token
    ollama, add_bos, eot = _ollama_template(template, chat_template, "ollama" in wanted and ollama_template,
                                            bos_token, eos_token, manifest)

    adapter_quant = quant if quant in ADAPTER_QUANTS else "f16"
    job = _Job(run=run, formats=wanted, quant=quant, out=Path(out).absolute() if out else run.exports,
               name=export_name(run.root, name), stage=stage, system=manifest.get("system"), adapter=adapter,
               model=None if adapter else source, base=base, chat_template=chat_template,
               pin_template=template is not None, ollama=ollama,
               add_bos=add_bos, eot_token=eot, ollama_base=from_line(ollama_base) if ollama_base else None,
               adapter_quant=adapter_quant)
    if job.model_ggufs or "adapter" in wanted:
        _check_gguf_sources(job, tokenizer_dir)
    if "ollama" in wanted:  # raises when the TEMPLATE or the system prompt cannot be quoted
        render_modelfile("x", template=ollama, system=job.system, model_name="x")
    return job


def _check_formats(formats: list[str]) -> tuple[str, ...]:
    if not formats:
        raise ExportError("no export format given", where="--format", hint=one_of(FORMATS))
    for f in formats:
        if f not in FORMATS:
            raise ExportError(f"unknown export format '{f}'{did_you_mean(f, FORMATS)}", where="--format",
                              hint=one_of(FORMATS))
    wanted = set(formats) | ({"gguf"} if "ollama" in formats and "adapter" not in formats else set())
    return tuple(f for f in FORMATS if f in wanted)


def _run_template(manifest: dict[str, Any], tokenizer_dir: Path | None,
                  base: str | None) -> tuple[ChatTemplate | None, str | None]:
    """(named template or None, the jinja the exports carry)."""
    ref = manifest.get("template")
    if not ref:
        return None, None
    if ref != MODEL_TEMPLATE:
        template = load_template(str(ref))
        return template, template.jinja
    from .vocab import chat_template_text

    tok = tokenizer_dir or _model_dir(base)
    jinja = chat_template_text(tok) if tok is not None else None
    if not jinja:
        raise ExportError("the run was trained with template: model, but its tokenizer has no chat template",
                          where=str(tok or base), hint="add chat_template.jinja beside the tokenizer")
    return None, jinja


def _ollama_template(template: ChatTemplate | None, jinja: str | None, wanted: bool, bos: str | None,
                     eos: str | None, manifest: dict[str, Any]) -> tuple[OllamaTemplate | None, bool, str | None]:
    """(the Modelfile's TEMPLATE or None, whether the GGUF must add BOS, the end-of-turn token)."""
    if template is not None:
        marker = "\x00bos\x00"
        adds_bos = template.render([{"role": "user", "content": "x"}], bos_token=marker).startswith(marker)
        return (named_template(template, eos) if wanted else None), adds_bos, template.eos
    if jinja is None:
        if wanted:
            raise ExportError("the run names no chat template, so a Modelfile TEMPLATE cannot match training",
                              where="manifest.json", hint="export --format gguf or merged, or --no-template")
        return None, False, None
    from .chat_format import ollama_form

    try:
        form = ollama_form(jinja, bos_token=bos, eos_token=eos)
    except ExportError:
        if wanted:
            raise
        return None, False, None  # a GGUF alone carries the jinja; llama.cpp runs it itself
    if wanted and form.system == "none" and manifest.get("system"):
        raise ExportError("the model's chat template has no system role, but the run has a system prompt",
                          where="chat template", hint="export --no-template, or train without data.system")
    recognised = f"TEMPLATE recognised as {form.family} by rendering the model's own chat template"
    ollama = OllamaTemplate(form.template, form.stops, (recognised, *form.notes))
    return (ollama if wanted else None), form.adds_bos, form.end_of_turn


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


def _model_dir(base: str | None, weights: bool = False) -> Path | None:
    """A local folder for ``base``: itself, or its hub cache snapshot (HF_HUB_OFFLINE is respected)."""
    if base is None:
        return None
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model", "*.jinja"] + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(base, allow_patterns=patterns))
    except Exception:  # noqa: BLE001 - missing, no network, gated: all mean "not available here"
        return None


def _tokenizer_config(tokenizer_dir: Path | None, base: str | None) -> dict[str, Any]:
    folder = tokenizer_dir or _model_dir(base)
    path = folder / "tokenizer_config.json" if folder else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}


def _check_gguf_sources(job: _Job, tokenizer_dir: Path | None) -> None:
    """What the GGUF converter and the adapter converter will need, checked now (cheap: no weights read)."""
    try:
        from .gguf_convert import inspect_model
    except ImportError as exc:
        raise ExportError(f"the GGUF export needs the gguf package ({exc})", where="--format",
                          hint="pip install 'llfarm[export]'") from None
    if job.quant in KQUANTS and (job.model_ggufs or (job.adapter and not job.ollama_base and
                                                     "ollama" in job.formats)):
        from .kquant import check_available

        check_available(job.quant)
    model_dir = job.model or _model_dir(job.base)
    config = model_dir / "config.json" if model_dir else None
    if config is None or not config.is_file():
        raise ExportError("cannot read the model's config.json", where=str(job.model or job.base),
                          hint="for a hub model, download it once (or set HF_HUB_OFFLINE=0)")
    cfg = json.loads(config.read_text(encoding="utf-8"))
    tok = tokenizer_dir or model_dir
    inspect_model(cfg, tok, str(tok), spm_model=model_dir / "tokenizer.model")
    if "adapter" in job.formats:
        from .lora import inspect_adapter

        inspect_adapter(job.adapter, cfg, str(job.adapter))


# ---- execution: build in staging, then rename into place -----------------------------------------------------------

def _execute(job: _Job) -> list[Path]:
    job.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llfarm-export-", dir=job.out))
    try:
        staged: list[tuple[Path, Path]] = []  # (staged path, final path)
        hf_dir = job.model
        pinned = job.chat_template if job.pin_template else None
        if job.adapter is not None and ("merged" in job.formats or job.model_ggufs):
            hf_dir = merge_adapter(job.base, job.adapter, staging / "merged", chat_template=pinned,
                                   sequence_classification=job.stage == "rm", spm_source=_model_dir(job.base))
        elif "merged" in job.formats:
            copy_model(job.model, staging / "merged", chat_template=pinned)
        if "merged" in job.formats:
            staged.append((staging / "merged", job.out / "merged"))

        from_source = f"./{job.gguf_name}"
        if job.model_ggufs:
            _convert(hf_dir, staging / job.gguf_name, job)
            staged.append((staging / job.gguf_name, job.out / job.gguf_name))
        if "adapter" in job.formats:
            from .lora import convert_adapter

            base_dir = _model_dir(job.base)
            config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
            convert_adapter(job.adapter, config, staging / job.adapter_name, quant=job.adapter_quant, name=job.name)
            staged.append((staging / job.adapter_name, job.out / job.adapter_name))
            if "ollama" in job.formats and job.ollama_base is None:  # the unmerged base, beside the adapter
                base_dir = _model_dir(job.base, weights=True)
                _convert(base_dir, staging / job.base_gguf_name, job, name=Path(str(job.base)).name)
                staged.append((staging / job.base_gguf_name, job.out / job.base_gguf_name))
            from_source = job.ollama_base or f"./{job.base_gguf_name}"

        if "ollama" in job.formats:
            text = render_modelfile(from_source, template=job.ollama, system=job.system, model_name=job.name,
                                    adapter=job.adapter_name if "adapter" in job.formats else None)
            (staging / "Modelfile").write_text(text, encoding="utf-8")
            staged.append((staging / "Modelfile", job.out / "Modelfile"))

        for src, dst in staged:
            if dst.is_dir() and not dst.is_symlink():
                os.replace(dst, staging / f"replaced-{dst.name}")
            os.replace(src, dst)
        return [dst for _, dst in staged]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert(hf_dir: Path, out_path: Path, job: _Job, name: str | None = None) -> None:
    from .gguf_convert import convert

    convert(hf_dir, out_path, quant=job.quant, name=name or job.name, chat_template=job.chat_template,
            add_bos=job.add_bos, eot_token=job.eot_token)
