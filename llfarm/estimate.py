"""`llfarm estimate`: parameters, trainable parameters and peak training memory, from the model's config.json.

No weights are read and nothing heavy is imported (no torch, no transformers): the layout of a Llama-family
decoder (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, granite) follows from config.json, and
the memory of one training process on one device is counted from it:

    weights      every parameter at its load dtype; qlora: NF4 4-bit decoder linears (0.516 byte/parameter with
                 double quantization) and the rest in float32 (PEFT's prepare_model_for_kbit_training casts it)
    gradients    one per trainable parameter, in its dtype
    optimizer    by training.optimizer: AdamW (adamw_torch_fused, the default) keeps two states per trainable
                 parameter, 8-bit AdamW 2 bytes, adagrad/rmsprop one state, sgd and adafactor (factored) ~none
    activations  the tensors autograd keeps for backward at the longest batch (counted per operation of the
                 decoder layer, see :func:`layer_activation_elements`), plus the logits and the loss's copies of them
    peak         weights + optimizer + max(gradients, activations + lm_head gradient): gradients are allocated while
                 activations are freed during backward; the optimizer's states exist from the first step on

The longest batch is batch_size sequences (2× for dpo/rm: chosen and rejected) of the longest training example
tokenized as training does (train_common, the run's template), capped at data.max_length; data.max_length itself
when the tokenizer is not on this machine.

What "measured" means (``--measure``, :func:`measure`): a real ``llfarm run`` of the strategy for a few steps, and

    CUDA  the largest ``gpu_peak_mb`` in its metrics.jsonl = torch.cuda.max_memory_allocated() since training began
          (tensors only; the CUDA context and the caching allocator's spare blocks are not in it)
    CPU   the largest ``rss_peak_mb`` (the process's peak RSS since training began) minus a runtime baseline: the
          RSS of a child process that imports the same training stack, loads the same tokenizer and trains a toy
          model for two steps with transformers' Trainer. Both run with glibc's MALLOC_MMAP_THRESHOLD_=131072 so
          that freed tensors go back to the system and RSS follows live tensors, as max_memory_allocated does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, UnsupportedError, one_of

MIB = 2**20
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)     # 4-bit values + 8-bit absmax per 64 + fp32 per 256 absmax blocks
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MEASURE_STEPS = 3
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
QKV = ("q_proj", "k_proj", "v_proj", "qkv_proj")
GATE_UP = ("gate_proj", "up_proj", "gate_up_proj")


# ---------------------------------------------------------------- the model's layout

@dataclass(frozen=True)
class Family:
    """What a model_type's decoder layer holds beyond the Llama layout, and its config defaults."""
    defaults: dict[str, Any]
    qkv_bias: bool = False          # qwen2: q/k/v projections always have a bias
    qk_norm: bool = False           # qwen3, gemma3: RMSNorm over head_dim on q and k
    norms: int = 2                  # gemma2/3: four RMSNorms per layer
    fused: bool = False             # phi3: qkv_proj and gate_up_proj


FAMILIES = {
    "llama": Family({"tie_word_embeddings": False}),
    "mistral": Family({"tie_word_embeddings": False, "num_key_value_heads": 8}),
    "granite": Family({"tie_word_embeddings": False}),
    "qwen2": Family({"tie_word_embeddings": False, "num_key_value_heads": 32}, qkv_bias=True),
    "qwen3": Family({"tie_word_embeddings": False, "num_key_value_heads": 32, "head_dim": 128}, qk_norm=True),
    "gemma": Family({"tie_word_embeddings": True, "num_key_value_heads": 16, "head_dim": 256}),
    "gemma2": Family({"tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 256}, norms=4),
    "gemma3_text": Family({"tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 256}, norms=4,
                          qk_norm=True),
    "phi3": Family({"tie_word_embeddings": False}, fused=True),
}


@dataclass(frozen=True)
class Shape:
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    family: Family = field(repr=False)
    dtype: str | None = None        # the checkpoint's dtype (config "dtype" / "torch_dtype")
    logit_softcap: bool = False     # gemma2: tanh soft-capping of the logits

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str) -> Shape:
        model_type = cfg.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            arch = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
            raise UnsupportedError(
                f"the estimator does not know model_type {model_type!r} ({arch})", where=where,
                hint=f"it counts dense Llama-family decoders: {one_of(FAMILIES)}")
        values = {**family.defaults, **{k: v for k, v in cfg.items() if v is not None}}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if not isinstance(values.get(k), int)]
        if missing:
            raise ModelError(f"config.json has no integer {', '.join(missing)}", where=where,
                             hint="is this a causal language model's config.json?")
        heads = values["num_attention_heads"]
        return cls(model_type=model_type, vocab=values["vocab_size"], hidden=values["hidden_size"],
                   intermediate=values["intermediate_size"], layers=values["num_hidden_layers"], heads=heads,
                   kv_heads=values.get("num_key_value_heads") or heads,
                   head_dim=values.get("head_dim") or values["hidden_size"] // heads,
                   tied=bool(values.get("tie_word_embeddings", False)),
                   attention_bias=bool(values.get("attention_bias", False)),
                   mlp_bias=bool(values.get("mlp_bias", False)), family=family,
                   dtype=values.get("dtype") or values.get("torch_dtype"),
                   logit_softcap=bool(values.get("final_logit_softcapping")))

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, bias) of one decoder layer's linear layers, named as in transformers."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv_bias = self.attention_bias or self.family.qkv_bias
        if self.family.fused:
            return [("qkv_proj", h, q + 2 * kv, self.attention_bias), ("o_proj", q, h, self.attention_bias),
                    ("gate_up_proj", h, 2 * i, self.mlp_bias), ("down_proj", i, h, self.mlp_bias)]
        return [("q_proj", h, q, qkv_bias), ("k_proj", h, kv, qkv_bias), ("v_proj", h, kv, qkv_bias),
                ("o_proj", q, h, self.attention_bias), ("gate_proj", h, i, self.mlp_bias),
                ("up_proj", h, i, self.mlp_bias), ("down_proj", i, h, self.mlp_bias)]

    def layer_norm_params(self) -> int:
        qk = (2 * self.head_dim) if self.family.qk_norm else 0
        return self.family.norms * self.hidden + qk

    def layer_params(self) -> int:
        return sum(n_in * n_out + (n_out if bias else 0) for _, n_in, n_out, bias in self.linears()) + \
            self.layer_norm_params()


@dataclass
class Params:
    total: int
    embeddings: int
    layers: int                     # all decoder layers together
    head: int                       # lm_head (0 when tied) or the reward model's score head
    norm: int                       # the final norm
    linear: int                     # decoder linear weights (what qlora quantizes)
    trainable: int
    trainable_what: str


def count_params(shape: Shape, stage: str, method: Any) -> Params:
    """Parameters of the model transformers builds from this config (AutoModelForCausalLM, or
    AutoModelForSequenceClassification with one label for rm), and how many ``method`` trains."""
    emb = shape.vocab * shape.hidden
    head = shape.hidden if stage == "rm" else (0 if shape.tied else emb)
    layers = shape.layers * shape.layer_params()
    linear = shape.layers * sum(n_in * n_out for _, n_in, n_out, _ in shape.linears())
    total = emb + layers + head + shape.hidden
    kind = method.type
    if kind == "full":
        trainable, what = total, "every parameter"
    elif kind == "freeze":
        n = min(method.trainable_layers, shape.layers)
        trainable, what = n * shape.layer_params(), f"the last {n} of {shape.layers} decoder layers"
    else:
        targets = lora_targets(shape, method.target_modules)
        per_layer = sum(method.r * (n_in + n_out) for name, n_in, n_out, _ in shape.linears() if name in targets)
        trainable = shape.layers * per_layer
        what = f"LoRA r={method.r} on {', '.join(sorted(targets, key=_linear_order(shape)))}"
        if stage == "rm":
            trainable += head
            what += " + the score head"
        total += trainable          # the adapter's weights sit beside the base model's
    return Params(total=total, embeddings=emb, layers=layers, head=head, norm=shape.hidden, linear=linear,
                  trainable=trainable, trainable_what=what)


def _linear_order(shape: Shape):
    names = [n for n, *_ in shape.linears()]
    return lambda n: names.index(n) if n in names else len(names)


def lora_targets(shape: Shape, target_modules: str | list[str]) -> set[str]:
    """Decoder-layer linear names LoRA wraps: 'all' is PEFT's all-linear (every linear layer but the output head)."""
    names = {n for n, *_ in shape.linears()}
    if target_modules == "all":
        return names
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        raise UnsupportedError(f"method.target_modules names {', '.join(map(repr, unknown))}, which a "
                               f"{shape.model_type} decoder layer does not have", where="method.target_modules",
                               hint=f"its linear layers: {', '.join(n for n, *_ in shape.linears())}")
    return set(target_modules)


# ---------------------------------------------------------------- activations

def layer_activation_elements(shape: Shape, method: Any, *, trained_weights: bool, input_grad: bool,
                              padded: bool = True, dropout_mask: float = 1.0) -> float:
    """Elements per token that autograd keeps for backward in one decoder layer (eager transformers code, SDPA
    attention). ``trained_weights``: the layer's own weights train (full, freeze); ``input_grad``: its input needs a
    gradient (false for the first layer when embeddings are frozen). With LoRA, each wrapped linear keeps its input
    and its r-wide lora_A output (with dropout: its own dropped-out copy of the input, and the dropout mask when the
    input needs a gradient: ``dropout_mask`` elements per input element, 1 on CPU where the mask is a float tensor,
    1/element size on CUDA where it is bool). ``padded``: batches with padding pass a mask to SDPA, which then gets
    k and v repeated to every query head."""
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * d, shape.kv_heads * d
    lora = method.type in ("lora", "qlora")
    targets = lora_targets(shape, method.target_modules) if lora else set()
    dropout = lora and method.dropout > 0

    def keeps_input(name: str) -> bool:      # does this linear's own input stay alive for backward?
        return trained_weights or (name in targets and not dropout)

    def norm(width: int, grad_in: bool, group: int = h) -> float:  # RMSNorm over ``group``-wide slices: its input
        kept = width + width / group if grad_in else 0                # and 1/rms for the input's gradient, and the
        return kept + (width if trained_weights else 0)               # normed input for its weight's gradient

    linears = {name: n_in for name, n_in, _, _ in shape.linears()}
    n = norm(h, input_grad)
    if any(keeps_input(x) for x in linears if x in QKV):
        n += h                               # the normed input of q/k/v
    n += q + 2 * (q if padded else kv) + q + shape.heads   # SDPA keeps q, k, v, its output (o_proj's input), lse
    if shape.family.qk_norm:
        n += norm(q, True, d) + norm(kv, True, d)
    if shape.family.norms == 4:
        n += norm(h, True)                   # gemma2/3: the attention output's own norm
    n += norm(h, True)                       # post-attention (pre-MLP) norm
    if any(keeps_input(x) for x in linears if x in GATE_UP):
        n += h
    n += 3 * i                               # gate (for SiLU), SiLU(gate) and up (for their product)
    if keeps_input("down_proj"):
        n += i                               # the product, down_proj's input
    if shape.family.norms == 4:
        n += norm(h, True)
    for name, n_in in linears.items():
        if name in targets:
            n += method.r                    # lora_A's output, lora_B's input
            if dropout:                      # its own dropped-out input, and the mask when the input needs grad
                n += n_in if (name in QKV and not input_grad) else n_in * (1 + dropout_mask)
    return n


@dataclass
class Activations:
    tokens: int                     # in the largest micro-batch
    sequence: int                   # its sequence length
    per_token_layers: float         # elements per token kept by all decoder layers
    per_token_final: float          # final norm, lm_head input and the loss's kept log-probabilities
    per_token_logits: float         # the logits and the loss's gradients of them, alive at the start of backward
    mask: int                       # SDPA's attention mask (batches with padding), elements
    element_bytes: int

    @property
    def saved_elements(self) -> float:
        """What autograd keeps at the end of the forward pass (checked against torch in tests/test_estimate.py)."""
        return self.tokens * (self.per_token_layers + self.per_token_final) + self.mask

    @property
    def bytes(self) -> int:
        return int((self.saved_elements + self.tokens * self.per_token_logits) * self.element_bytes)


def activations(shape: Shape, stage: str, method: Any, *, batch: int, sequence: int, element_bytes: int,
                gradient_checkpointing: bool = False, padded: bool = True, cpu: bool = True) -> Activations:
    """Activation memory of the largest micro-batch: ``batch`` sequences of ``sequence`` tokens."""
    kind = method.type
    full = kind == "full"
    kw = {"padded": padded, "dropout_mask": 1.0 if cpu else 1 / element_bytes}
    if kind == "freeze":
        n_trained = min(method.trainable_layers, shape.layers)
        per_layer = [layer_activation_elements(shape, method, trained_weights=True, input_grad=j > 0, **kw)
                     for j in range(n_trained)]
    else:
        per_layer = [layer_activation_elements(shape, method, trained_weights=full, input_grad=full or j > 0, **kw)
                     for j in range(shape.layers)]
    if gradient_checkpointing:      # each layer keeps its input; one layer at a time is recomputed in backward
        layers = len(per_layer) * shape.hidden + max(per_layer, default=0)
    else:
        layers = sum(per_layer)
    h = shape.hidden
    final = h + 1 + (2 * h if full else 0)          # final norm's input and 1/rms (+ normed x, lm_head's input)
    logits = 0.0
    if stage != "rm":
        # log_softmax's float32 output is kept; the logits (model dtype) are alive too, and backward adds the
        # loss's float32 gradient of both before they are freed
        final += shape.vocab * 4 / element_bytes
        if shape.logit_softcap:
            final += shape.vocab                    # gemma2: tanh keeps its output
        logits = shape.vocab * (1 + 2 * 4 / element_bytes)
    tokens = batch * sequence
    return Activations(tokens=tokens, sequence=sequence, per_token_layers=layers, per_token_final=final,
                       per_token_logits=logits, mask=batch * sequence * sequence if padded else 0,
                       element_bytes=element_bytes)


# ---------------------------------------------------------------- config.json and the tokenizer, without torch

def read_config(model_path: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it was read) for a local model directory or a hub id. A hub id reads only
    config.json: from the Hugging Face cache, or downloaded when online."""
    local = Path(model_path)
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ModelError(f"no config.json in {model_path}", where="model.path",
                             hint="point model.path at the folder that holds the model's config.json")
    else:
        path = Path(_hub_file(model_path, "config.json", revision, required=True))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read config.json: {exc}", where=str(path)) from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"config.json is not valid JSON: {exc.msg} (line {exc.lineno})", where=str(path),
                         hint="the file is damaged; download the model's config.json again") from None
    if not isinstance(data, dict):
        raise ModelError("config.json is not a JSON object", where=str(path))
    if "text_config" in data and "hidden_size" not in data:     # multimodal wrapper around a text decoder
        raise UnsupportedError(f"the estimator does not know model_type {data.get('model_type')!r} (a multimodal "
                               f"model with a text_config)", where=str(path),
                               hint=f"it counts dense Llama-family decoders: {one_of(FAMILIES)}")
    return data, str(path)


def _hub_file(repo: str, filename: str, revision: str | None, *, required: bool) -> str | None:
    """A file of a hub repository: from the cache, else downloaded (unless offline). Only ``required`` files are
    downloaded; the others are used when they happen to be cached."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    cached = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(cached, str):
        return cached
    if not required:
        return None
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"'{repo}' has no cached {filename} and HF_HUB_OFFLINE is set, so it cannot be downloaded",
                         where="model.path", hint=f"unset HF_HUB_OFFLINE to fetch only {filename}, or point "
                                                  "model.path at a local model directory")
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one line whatever it is
        msg = " ".join(str(exc).split())[:300]
        raise ModelError(f"cannot fetch {filename} of '{repo}': {type(exc).__name__}: {msg}",
                         where="model.path", hint="check the hub id, your network and HF_TOKEN") from None


class _TokenizerFile:
    """Just enough of a transformers tokenizer for train_common's rendering and tokenization: tokenizer.json through
    the `tokenizers` library (what transformers' fast tokenizers run), the special tokens from tokenizer_config.json."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer
        self._tk = Tokenizer.from_file(tokenizer_json)

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token, self.eos_token, self.pad_token = token("bos_token"), token("eos_token"), token("pad_token")
        self.chat_template = None

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab()

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> dict[str, list]:
        if isinstance(text, list):
            return {"input_ids": [e.ids for e in self._tk.encode_batch(text, add_special_tokens=add_special_tokens)]}
        return {"input_ids": self._tk.encode(text, add_special_tokens=add_special_tokens).ids}


def load_tokenizer_file(model_path: str, revision: str | None = None) -> _TokenizerFile | None:
    """The model's fast tokenizer when tokenizer.json is on this machine (a local directory or the hub cache)."""
    local = Path(model_path)
    if local.is_dir():
        tj, tc = local / "tokenizer.json", local / "tokenizer_config.json"
        tj_path = str(tj) if tj.is_file() else None
        tc_path = str(tc) if tc.is_file() else None
    else:
        tj_path = _hub_file(model_path, "tokenizer.json", revision, required=False)
        tc_path = _hub_file(model_path, "tokenizer_config.json", revision, required=False)
    if tj_path is None:
        return None
    try:
        config = json.loads(Path(tc_path).read_text(encoding="utf-8")) if tc_path else {}
        return _TokenizerFile(tj_path, config if isinstance(config, dict) else {})
    except Exception:  # noqa: BLE001 - a tokenizer we cannot read only costs the data-aware sequence length
        return None


def longest_example(rows: list[dict[str, Any]], kind: str, template_name: str, tokenizer, max_length: int) -> int:
    """Tokens in the longest training example, tokenized as training does (train_common), capped at max_length."""
    from .templates import load_template
    from .train_common import tokenize_pairs, tokenize_sft, tokenizer_for_template

    template = load_template(template_name)
    tokenizer = tokenizer_for_template(tokenizer, template)
    if kind != "preference":
        examples, _ = tokenize_sft(rows, template, tokenizer, max_length)
        return max((len(e["input_ids"]) for e in examples), default=max_length)
    pairs = tokenize_pairs(rows, template, tokenizer, max_length)
    return max((len(p[k]) for p in pairs for k in ("chosen_input_ids", "rejected_input_ids")), default=max_length)


# ---------------------------------------------------------------- the estimate

# Optimizer state per trainable parameter, by training.optimizer (transformers' names): (multiple of the
# parameter's own size, fixed bytes). Factored Adafactor keeps rows + columns per matrix: counted as none.
OPTIMIZER_STATE: dict[str, tuple[float, float]] = {
    "adamw_torch_fused": (2, 0), "adamw_torch": (2, 0), "paged_adamw_32bit": (2, 0), "ademamix": (3, 0),
    "adamw_8bit": (0, 2), "paged_adamw_8bit": (0, 2), "lion_8bit": (0, 1), "paged_lion_8bit": (0, 1),
    "adagrad": (1, 0), "rmsprop": (1, 0), "sgd": (0, 0), "adafactor": (0, 0)}


@dataclass
class Estimate:
    model: str
    config: str
    model_type: str
    stage: str
    method: str
    platform: str
    precision: str
    weights_dtype: str
    params: int
    trainable_params: int
    trainable_what: str
    batch: int
    sequence: int
    sequence_source: str
    optimizer: str
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    head_gradient_bytes: int        # full fine-tuning: lm_head's gradient, allocated while activations are alive
    peak_bytes: int
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["predicted_peak_bytes"] = self.peak_bytes
        return out


def optimizer_state_bytes(optim: str, param_bytes: int) -> tuple[float, str]:
    """(bytes of optimizer state per trainable parameter, the optimizer's name as shown)."""
    if optim in OPTIMIZER_STATE:
        times, fixed = OPTIMIZER_STATE[optim]
        return times * param_bytes + fixed, optim
    return 2.0 * param_bytes, f"{optim} (counted as AdamW: two states per parameter)"


def estimate(strategy, *, model_path: str, platform: str, precision: str,
             train_rows: list[dict[str, Any]] | None = None, data_kind: str = "sft") -> Estimate:
    """Predict parameters and peak memory for ``strategy`` (a validated Strategy) on ``platform``."""
    s = strategy
    config, config_where = read_config(model_path, s.model.revision)
    shape = Shape.from_config(config, config_where)
    method = s.method
    params = count_params(shape, s.stage, method)
    notes: list[str] = []

    from .training import model_dtype
    wdtype = model_dtype(s, precision)              # what the trainer loads the weights in
    wbytes = DTYPE_BYTES[wdtype]
    if method.type == "qlora" or s.model.quantization == "4bit":
        quantized = params.linear
        weights = quantized * NF4_BYTES + (params.total - quantized) * 4
        notes.append("qlora: decoder linears in NF4 4-bit, everything else in float32")
    elif s.model.quantization == "8bit":
        quantized = params.linear
        weights = quantized * 1.0 + (params.total - quantized) * 4
        notes.append("8-bit: decoder linears in int8, everything else in float32")
    else:
        weights = params.total * wbytes
    # LoRA adapters are float32 whatever the base (PEFT's autocast_adapter_dtype); other methods train in place
    train_bytes = 4 if s.is_peft else wbytes
    if s.is_peft and wbytes != 4 and s.model.quantization == "none":
        weights += params.trainable * (4 - wbytes)
    gradients = params.trainable * train_bytes
    per_param, optim_name = optimizer_state_bytes(s.training.optimizer, train_bytes)
    optimizer = params.trainable * per_param
    if s.stage == "dpo" and not s.is_peft:
        weights += (params.total) * wbytes      # TRL keeps a frozen copy of the model as the reference
        notes.append("dpo without LoRA: a second, frozen copy of the model is the reference")

    if train_rows:
        tokenizer = load_tokenizer_file(model_path, s.model.revision)
        if tokenizer is not None:
            sequence = longest_example(train_rows, data_kind, s.template, tokenizer, s.data.max_length)
            source = f"longest training example; data.max_length {s.data.max_length}"
        else:
            sequence, source = s.data.max_length, "data.max_length; no tokenizer on this machine"
    else:
        sequence, source = s.data.max_length, "data.max_length"
    batch = s.training.batch_size * (2 if s.stage in ("dpo", "rm") else 1)
    element = 2 if precision in ("bf16", "fp16") or method.type == "qlora" else 4
    acts = activations(shape, s.stage, method, batch=batch, sequence=sequence, element_bytes=element,
                       gradient_checkpointing=s.training.gradient_checkpointing, cpu=platform == "cpu")
    head_grad = 0
    if method.type == "full" and s.stage != "rm":
        head_grad = shape.vocab * shape.hidden * train_bytes   # allocated first in backward, with activations alive
    peak = weights + optimizer + max(gradients, acts.bytes + head_grad)
    if shape.family.norms == 4 or shape.family.fused:
        notes.append(f"{shape.model_type}: activations counted within ~7% (checked against torch on small models)")
    if s.distributed.deepspeed:
        notes.append("DeepSpeed sharding is not modelled: figures are for one unsharded process")
    return Estimate(
        model=s.model.path, config=config_where, model_type=shape.model_type, stage=s.stage, method=method.type,
        platform=platform, precision=precision, weights_dtype="nf4" if method.type == "qlora" else wdtype,
        params=params.total, trainable_params=params.trainable, trainable_what=params.trainable_what,
        batch=batch, sequence=sequence, sequence_source=source, optimizer=optim_name,
        weights_bytes=int(weights), gradients_bytes=int(gradients), optimizer_bytes=int(optimizer),
        activations_bytes=acts.bytes, head_gradient_bytes=head_grad, peak_bytes=int(peak), notes=notes)


def predict(resolved, backend: str | None = None) -> Estimate:
    """The estimate for a resolved strategy: plan's checks first (capabilities, model path, data), then the count.
    Planning, so a strategy for a GPU is estimated for one on any machine."""
    from .runner import prepare_run
    prep = prepare_run(resolved, backend, plan=True)
    return estimate(resolved.strategy, model_path=prep.model_path, platform=prep.platform.name,
                    precision=prep.precision, train_rows=list(prep.data.rows("train")),
                    data_kind=prep.data.kind)


# ---------------------------------------------------------------- measuring

@dataclass
class Measured:
    platform: str
    backend: str
    steps: int
    peak_bytes: int                 # what the prediction predicts (see the module docstring)
    definition: str
    process_peak_bytes: int | None = None     # CPU: the training process's peak RSS since training began
    baseline_bytes: int | None = None         # CPU: the runtime baseline's RSS
    gpu_reserved_peak_bytes: int | None = None


def measure(strategy: str, overrides: tuple[str, ...] | list[str], backend: str | None = None, *,
            steps: int = MEASURE_STEPS, verbose: bool = False) -> Measured:
    """Train ``steps`` real steps with llfarm's runner (prepare → create → execute → finish, into a temporary
    output folder, no checkpoints, no eval, no export) and read the peaks that run recorded."""
    import tempfile

    from .errors import TrainingFailed
    from .runner import create_run, execute, finish, prepare_run, tail
    from .strategy import resolve

    measure_set = [f"training.max_steps={steps}", "training.logging_steps=1", "training.save_every=null",
                   "training.eval_every=null", "data.eval=null", "data.eval_split=0", "export.formats=[]"]
    resolved = resolve(strategy, [*overrides, *measure_set])
    prep = prepare_run(resolved, backend)
    if prep.platform.name not in ("cpu", "cuda"):
        raise UnsupportedError(f"--measure reads CPU or CUDA memory; this machine is {prep.platform.name}",
                               hint="run `llfarm estimate` without --measure here")
    with tempfile.TemporaryDirectory(prefix="llfarm-measure-") as tmp:
        ctx, native = create_run(prep, Path(tmp), run_id="measure")
        native.env.update(MALLOC_ENV)
        code = execute(ctx, native, verbose=verbose)
        if code >= 128:
            raise KeyboardInterrupt
        if code != 0:
            raise TrainingFailed(f"the measuring run failed (exit {code}): "
                                 + " | ".join(tail(ctx.run.logs / "train.log", 3).splitlines()),
                                 where="estimate --measure", hint="run the strategy with `llfarm run -v` to see why")
        finish(ctx, prep.backend)
        memory = ctx.run.read_manifest().get("memory", {})
        env = {**native.env}
    if prep.platform.name == "cuda":
        if "gpu_peak_mb" not in memory:
            raise TrainingFailed("the measuring run recorded no gpu_peak_mb", where="estimate --measure")
        return Measured(platform="cuda", backend=prep.backend.name, steps=steps,
                        peak_bytes=int(memory["gpu_peak_mb"] * MIB),
                        definition="torch.cuda.max_memory_allocated() since training began (CUDA context excluded)",
                        gpu_reserved_peak_bytes=int(memory["gpu_reserved_peak_mb"] * MIB)
                        if "gpu_reserved_peak_mb" in memory else None)
    if "rss_peak_mb" not in memory:
        raise TrainingFailed("the measuring run recorded no rss_peak_mb", where="estimate --measure")
    process = int(memory["rss_peak_mb"] * MIB)
    baseline = runtime_baseline(prep, env)
    return Measured(platform="cpu", backend=prep.backend.name, steps=steps, peak_bytes=process - baseline,
                    definition="peak RSS of the training process since training began, minus the runtime "
                               "baseline (both with MALLOC_MMAP_THRESHOLD_=131072)",
                    process_peak_bytes=process, baseline_bytes=baseline)


def runtime_baseline(prep, env: dict[str, str]) -> int:
    """RSS of a process that holds what a training process holds apart from the model: the backend's packages and
    the training stack imported, the strategy's tokenizer loaded, a toy model (one 8-wide layer; wrapped in LoRA
    when the strategy trains LoRA) trained two steps by transformers' Trainer."""
    import os
    import subprocess
    import sys

    s = prep.resolved.strategy
    argv = [sys.executable, "-m", "llfarm.estimate", "baseline", prep.model_path, s.stage,
            "--peft" if s.is_peft else "--no-peft", *prep.backend.packages]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600,
                          env={**os.environ, **env, **MALLOC_ENV})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        from .errors import TrainingFailed
        raise TrainingFailed(f"the runtime-baseline process failed: {' | '.join(proc.stderr.splitlines()[-3:])}",
                             where="estimate --measure")
    return int(json.loads(lines[-1])["rss_bytes"])


def _baseline_child(model_path: str, stage: str, peft: bool, packages: list[str]) -> dict[str, int]:
    import importlib
    import tempfile

    import torch  # noqa: F401
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from .compat import fix_trl_availability_flags
    from .metrics import _rss_bytes, reset_memory_peaks
    fix_trl_availability_flags()
    for name in ("datasets", "accelerate", "peft", "trl", *packages):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a package that cannot load here could not be in the run either
            pass
    import trl
    from datasets import Dataset, load_from_disk
    getattr(trl, {"dpo": "DPOTrainer", "rm": "RewardTrainer"}.get(stage, "SFTTrainer"))  # what a run imports

    AutoTokenizer.from_pretrained(model_path)
    toy = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, num_key_value_heads=1))
    if peft:
        from peft import LoraConfig, get_peft_model
        toy = get_peft_model(toy, LoraConfig(r=2, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as out:
        # the data path of a trainer child: datasets.map, save_to_disk, load_from_disk (llfarm.trainer.tokenized)
        raw = Dataset.from_list([{"text": "a b c"}] * 4)
        raw.map(lambda b: {"input_ids": [[1, 2, 3]] * len(b["text"]), "labels": [[1, 2, 3]] * len(b["text"])},
                batched=True, remove_columns=["text"]).save_to_disk(f"{out}/data")
        data = load_from_disk(f"{out}/data")
        reset_memory_peaks()
        args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                                 report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
        Trainer(model=toy, args=args, train_dataset=data).train()
    from .metrics import _rss_peak_bytes
    return {"rss_bytes": max(_rss_peak_bytes() or 0, _rss_bytes() or 0)}


if __name__ == "__main__":  # python -m llfarm.estimate baseline MODEL STAGE --peft|--no-peft [PACKAGE ...]
    import sys
    if len(sys.argv) < 5 or sys.argv[1] != "baseline":
        sys.exit("usage: python -m llfarm.estimate baseline MODEL_PATH STAGE --peft|--no-peft [PACKAGE ...]")
    print(json.dumps(_baseline_child(sys.argv[2], sys.argv[3], sys.argv[4] == "--peft", sys.argv[5:])))


# ---------------------------------------------------------------- showing it

def human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / MIB:.1f} MiB"


def render(est: Estimate, measured: Measured | None = None) -> list[str]:
    share = 100 * est.trainable_params / est.params if est.params else 0.0
    lines = [
        f"model       {est.model} ({est.model_type}; {est.config})",
        (f"parameters  {est.params:,} ({est.params / 1e6:.2f} M); trainable {est.trainable_params:,} ({share:.2f}%): "
         f"{est.trainable_what}"),
        (f"training    {est.stage}, {est.method}, {est.precision} on {est.platform}, weights {est.weights_dtype}; "
         f"micro-batch {est.batch} × {est.sequence} tokens ({est.sequence_source}); optimizer {est.optimizer}"),
        "predicted peak memory of the training process:",
        f"  weights      {human(est.weights_bytes):>12}",
        f"  gradients    {human(est.gradients_bytes):>12}",
        f"  optimizer    {human(est.optimizer_bytes):>12}",
        f"  activations  {human(est.activations_bytes):>12}",
        f"  peak         {human(est.peak_bytes):>12}   weights + optimizer + max(gradients, activations"
        + (" + lm_head gradient)" if est.head_gradient_bytes else ")"),
    ]
    if est.platform == "cpu":
        lines.append("  (plus the runtime: Python, torch, transformers — about 0.8 GiB of RSS on CPU; --measure "
                     "measures it)")
    elif est.platform == "cuda":
        lines.append("  (plus the CUDA context, a few hundred MiB, and the caching allocator's spare blocks)")
    lines += [f"note        {n}" for n in est.notes]
    if measured is not None:
        if measured.platform == "cpu":
            how = (f"peak RSS {human(measured.process_peak_bytes or 0)} − runtime baseline "
                   f"{human(measured.baseline_bytes or 0)} = {human(measured.peak_bytes)}")
        else:
            how = f"torch.cuda.max_memory_allocated {human(measured.peak_bytes)}"
        lines.append(f"measured    {measured.steps} steps of `llfarm run` ({measured.backend}, {measured.platform}): "
                     f"{how}")
        lines.append(f"predicted   {human(est.peak_bytes)} vs measured {human(measured.peak_bytes)}: "
                     f"{error_pct(est.peak_bytes, measured.peak_bytes):+.1f}%")
    return lines


def error_pct(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured if measured else float("inf")


def as_json(est: Estimate, measured: Measured | None = None) -> dict[str, Any]:
    out = est.as_json()
    if measured is not None:
        out["measured_peak_bytes"] = measured.peak_bytes
        out["measured"] = asdict(measured)
        out["error_pct"] = round(error_pct(est.peak_bytes, measured.peak_bytes), 2)
    return out
