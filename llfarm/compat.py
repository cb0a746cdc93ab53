"""Work-arounds for known incompatibilities inside the pinned stack, applied in training processes only.

trl 0.24 computes its optional-package flags with ``transformers.utils.import_utils._is_package_available``,
which in transformers 5.x returns a ``(bool, version)`` tuple. A non-empty tuple is always truthy, so
``is_mergekit_available()`` and friends say True for packages that are not installed, and
``from trl import DPOTrainer`` dies with "No module named 'mergekit'". We coerce those flags to booleans
before any trainer module is imported.
"""

from __future__ import annotations


def fix_trl_availability_flags() -> list[str]:
    """Turn trl's tuple-valued ``_<pkg>_available`` flags into plain booleans. Returns the names fixed."""
    import trl.import_utils as iu

    fixed = []
    for name, value in list(vars(iu).items()):
        if name.startswith("_") and name.endswith("_available") and isinstance(value, tuple):
            setattr(iu, name, bool(value[0]))
            fixed.append(name)
    return fixed


def ensure_warnings_issued(model) -> None:
    """trl 0.24's DPO/KTO/CPO trainers write ``model.warnings_issued[...]``, an attribute transformers 5
    removed from PreTrainedModel; give the model an empty dict so they can."""
    if not hasattr(model, "warnings_issued"):
        model.warnings_issued = {}


def quiet_libraries() -> None:
    """For in-process work (generate, export): no weight-loading progress bars, and no bitsandbytes warning
    about its optional CPU kernel package (which would fetch code from the hub if it were installed)."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
