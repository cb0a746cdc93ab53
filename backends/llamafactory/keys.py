"""What LlamaFactory 0.9.5 accepts, as data: ``keys.json`` beside this file holds every config key its parser
(``get_train_args``) takes and, for every registered chat template, what it renders (see ``parity.lf_render``).

llfarm reads it to check ``backend_options.llamafactory`` and templates before launch, without importing
LlamaFactory. A test checks it against the installed package; regenerate it after an upgrade with

    python -m llfarm.backends.llamafactory.keys --write
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

KEYS_FILE = Path(__file__).with_name("keys.json")


@lru_cache(maxsize=1)
def known() -> dict[str, Any]:
    """{'llamafactory': version, 'keys': [names], 'templates': {name: spec}} from keys.json."""
    return json.loads(KEYS_FILE.read_text(encoding="utf-8"))


def installed() -> dict[str, Any]:
    """The same, read from the installed LlamaFactory (imports it: tests and --write only)."""
    import dataclasses
    from importlib.metadata import version

    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import (
        DataArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )
    keys: set[str] = set()
    # The same classes, and the same rule (init fields), as HfArgumentParser.parse_dict in get_train_args.
    for cls in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments):
        keys |= {f.name for f in dataclasses.fields(cls) if f.init}
    return {"llamafactory": version("llamafactory"), "regenerate": "python -m llfarm.backends.llamafactory.keys --write",
            "keys": sorted(keys), "templates": {name: template_spec(TEMPLATES[name]) for name in sorted(TEMPLATES)}}


def _slots(formatter) -> list[Any]:
    out: list[Any] = []
    for slot in formatter.slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, set):
            out.append({"special": min(slot)})
        else:
            out.append({"token": slot.get("token")})
    return out


def template_spec(t) -> dict[str, Any]:
    """What LlamaFactory's Template does with system/user/assistant text: enough to render it as a string
    (``parity.lf_render``) without importing LlamaFactory. 'class' other than Template means not simulated."""
    return {"class": type(t).__name__, "prefix": _slots(t.format_prefix), "system": _slots(t.format_system),
            "user": _slots(t.format_user), "assistant": _slots(t.format_assistant),
            "default_system": t.default_system, "stop_words": list(t.stop_words), "replace_eos": t.replace_eos,
            "efficient_eos": t.efficient_eos}


if __name__ == "__main__":  # python -m llfarm.backends.llamafactory.keys --write | --print
    found = installed()
    if "--write" in sys.argv:
        KEYS_FILE.write_text(json.dumps(found, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {KEYS_FILE} ({len(found['keys'])} keys, {len(found['templates'])} templates)")
    else:
        print(json.dumps(found))
