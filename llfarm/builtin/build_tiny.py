"""Build ``builtin:tiny-llama`` deterministically (run from a dev environment; the output is shipped).

A byte-level BPE tokenizer is trained on the shipped sample data, then a 2-layer Llama with
random weights (seed 0) is saved in Hugging Face format. Every chat template in ``templates/``
has its special tokens in the vocabulary, so the model can be trained with any of them.

    python -m llfarm.builtin.build_tiny [--out DIR] [--arch llama|qwen2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>",
            "<|im_start|>", "<|im_end|>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
VOCAB_SIZE = 768
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def corpus() -> list[str]:
    texts = []
    for path in sorted((HERE / "data").glob("*.jsonl")):
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    texts += ["### Instruction:\n", "### Response:\n", "system\n", "user\n", "assistant\n",
              "You are a helpful assistant."]
    return texts


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build(out: Path, arch: str = "llama") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0,
                  # Wide init: with the default 0.02 a frozen 64-wide lm_head caps logits near 1, and LoRA
                  # could not make any prediction confident.
                  initializer_range=0.3, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False, attention_bias=False)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text(
        f"# tiny-{arch}\n\nRandom-initialised {arch} model built by `llfarm.builtin.build_tiny` for tests "
        "and the quickstart. It knows nothing until trained.\n", encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=HERE / "tiny-llama")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    args = ap.parse_args()
    path = build(args.out, args.arch)
    print(json.dumps({"out": str(path), "files": sorted(p.name for p in path.iterdir())}))


if __name__ == "__main__":
    main()
