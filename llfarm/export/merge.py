"""The merged Hugging Face model: base + LoRA adapter folded together by PEFT, or the run's full model copied.

Heavy imports (torch, transformers, peft) happen inside the functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def merge_adapter(base: str, adapter_dir: Path, out_dir: Path, *, sequence_classification: bool,
                  chat_template: str | None, spm_source: Path | None = None) -> Path:
    """PEFT ``merge_and_unload`` of ``adapter_dir`` onto ``base``, saved as safetensors with its tokenizer.
    A SentencePiece ``tokenizer.model`` (which transformers 5 no longer saves) is copied from the adapter or
    ``spm_source`` (the base's folder), so llama.cpp's converter and ours read the real SentencePiece model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if sequence_classification:  # a reward model: the score head comes back from the adapter's modules_to_save
        model = AutoModelForSequenceClassification.from_pretrained(base, dtype="auto", num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    del merged, model
    save_tokenizer(adapter_dir if has_tokenizer(adapter_dir) else base, out_dir, chat_template)
    for folder in (adapter_dir, spm_source):
        if folder is not None and (folder / "tokenizer.model").is_file() and not (out_dir / "tokenizer.model").exists():
            shutil.copy(folder / "tokenizer.model", out_dir / "tokenizer.model")
    return out_dir


def copy_model(model_dir: Path, out_dir: Path, *, chat_template: str | None) -> Path:
    """A run that trained the full model: copy it (weights untouched) and pin the chat template."""
    shutil.copytree(model_dir, out_dir)
    if chat_template is not None:
        save_tokenizer(model_dir, out_dir, chat_template)
    return out_dir


def save_tokenizer(source: str | Path, out_dir: Path, chat_template: str | None) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source))
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
