"""Secrets: one redaction pass for everything llfarm writes.

What counts as a secret:

- the value of every environment variable that names one (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``,
  ``WANDB_API_KEY``, ``OPENAI_API_KEY``, ``AWS_SECRET_ACCESS_KEY``, ... — see :func:`is_secret_name`), when it is
  at least 8 characters long;
- anything shaped like a Hugging Face token (``hf_`` followed by 20+ letters and digits), anywhere in a string;
- the value of every mapping key that names a token or secret (``hf_hub_token``, ``swanlab_api_key``, ...).

:func:`redact_text` and :func:`redact` replace them by ``***``. ``rundir.atomic_write_text`` applies the text pass to
every file llfarm writes into a run (manifest, strategy.yaml, native configs, command.txt), the runner to every log
line, ``strategy.dump`` the key pass to the resolved strategy. Where a secret would become a *name* (the strategy
``name``, ``--run-id``, ``export.name``) or *training text* (``data.system``), it is refused instead
(:func:`find_secret`): a redacted name or system prompt would no longer be what the user asked for. Training data is
the user's and is copied as is.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
SECRET_OPTIONS_ENV = "LLFARM_SECRET_OPTIONS"   # secret-named backend options, JSON, for the training child only
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
MIN_SECRET_LEN = 8
# The ones llfarm's users meet most; any other variable whose name says "secret" is covered by is_secret_name.
KNOWN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY",
             "OPENAI_API_KEY", "COMET_API_KEY", "NEPTUNE_API_TOKEN", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_PASSWORD", "SWANLAB_API_KEY", "MODELSCOPE_API_TOKEN", "AWS_SECRET_ACCESS_KEY",
             "GITHUB_TOKEN")
_LAST_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}
_KEY_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
# "...pad_token", "eos_token": tokenizer vocabulary, not credentials
_TOKENIZER_WORDS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop", "image",
                    "video", "audio"}


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))        # camelCase → camel_Case
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a key or variable name names a credential: it ends with token, secret, password, api_key, ...
    (``hf_hub_token``, ``WANDB_API_KEY``; not ``pad_token``, ``max_new_tokens`` or ``TOKENIZERS_PARALLELISM``)."""
    words = _words(name)
    if not words:
        return False
    if words[-1] == "token":
        return len(words) == 1 or words[-2] not in _TOKENIZER_WORDS
    return words[-1] in _LAST_WORDS or tuple(words[-2:]) in _KEY_PAIRS


def secret_env() -> dict[str, str]:
    """The environment variables that hold a secret (by name; a path to a key file is not one), with values."""
    return {k: v for k, v in os.environ.items()
            if (k in KNOWN_ENV or is_secret_name(k)) and not k.endswith(("_FILE", "_PATH", "_DIR"))
            and len(v.strip()) >= MIN_SECRET_LEN}


def secret_values() -> list[str]:
    """The secret values in the environment, longest first (so a value that contains another is masked whole)."""
    return sorted(set(secret_env().values()), key=len, reverse=True)


def redact_text(text: str, values: list[str] | None = None) -> str:
    """``text`` with every secret value from the environment (or ``values``, from :func:`secret_values`) and every
    ``hf_…`` token replaced by ``***``."""
    for value in secret_values() if values is None else values:
        if value in text:
            text = text.replace(value, MASK)
    return HF_TOKEN_RE.sub(MASK, text)


def redact(obj: Any) -> Any:
    """A copy of a JSON-like value with secret-named keys' values and secrets inside strings masked."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_name(str(k)) and isinstance(v, str) and v else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def find_secret(text: str | None) -> str | None:
    """What secret ``text`` holds ('an hf_… token', "the value of HF_TOKEN"), or None."""
    if not text:
        return None
    if HF_TOKEN_RE.search(text):
        return "a Hugging Face token (hf_…)"
    for name, value in secret_env().items():
        if value in text:
            return f"the value of ${name}"
    return None


def split_secret_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options to write into a native file, secret-named options to pass through the environment instead)."""
    plain = {k: v for k, v in options.items() if not is_secret_name(k)}
    secret = {k: v for k, v in options.items() if is_secret_name(k)}
    return plain, secret
