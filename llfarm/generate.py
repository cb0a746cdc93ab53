"""Generate text from a run: base + adapter (PEFT) or the full model, prompted with the run's template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError
from .rundir import RunDir
from .templates import ChatTemplate, load_template


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    template: ChatTemplate
    system: str | None = None

    @classmethod
    def from_run(cls, run_dir: Path) -> Generator:
        run = RunDir(Path(run_dir))
        manifest = run.read_manifest()
        if manifest.get("stage") == "rm":
            raise RunError("this run trained a reward model, which scores text rather than generating it",
                           where=str(run), hint="generate from an sft or dpo run")
        out = run.output_dir()
        template = load_template(manifest.get("template", "chatml"))
        model, tokenizer = load_for_inference(manifest["model_path"], out, manifest.get("output_kind", "adapter"))
        return cls(model, tokenizer, template, manifest.get("system"))

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        messages = []
        if system or self.system:
            messages.append({"role": "system", "content": system or self.system})
        messages.append({"role": "user", "content": prompt})
        return self.messages_ids(messages)

    def messages_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation (ending with a user turn) rendered with the template's generation prompt, as token ids."""
        text = self.template.render(messages, add_generation_prompt=True, bos_token=self.tokenizer.bos_token or "",
                                    eos_token=self.tokenizer.eos_token or "")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()
        for tok in (self.template.eos, *self.template.ollama_stop):
            if tok and tok in vocab:
                ids.add(vocab[tok])
        return sorted(i for i in ids if i is not None)

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 system: str | None = None) -> str:
        return self.complete(self.prompt_ids(prompt, system), max_new_tokens=max_new_tokens, temperature=temperature)

    def complete(self, prompt_ids: list[int], *, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        """The model's answer to a rendered prompt, up to the template's end of turn; greedy at temperature 0."""
        import torch
        ids = torch.tensor([prompt_ids], device=self.model.device)
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs["temperature"] = temperature
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids(),
                                      pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def load_for_inference(base: str, output_dir: Path, kind: str):
    """(model, tokenizer) in eval mode. ``kind``: adapter (loaded on top of ``base``), model (the full model in
    ``output_dir``) or base (``base`` alone). The tokenizer is always the run's; nothing is downloaded for local
    paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    if kind == "base":                  # the run's starting point, with the run's tokenizer (eval --baseline)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    elif kind == "adapter":
        from peft import PeftModel
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, output_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer
