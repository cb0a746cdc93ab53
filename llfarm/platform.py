"""What this machine can run, found cheaply (no torch import): used by plan, backends and `--backend auto`.

``LLFARM_PLATFORM=cpu|cuda|mps`` overrides detection (useful for planning a GPU job on a laptop).
"""

from __future__ import annotations

import os
import platform as _platform
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Platform:
    name: str            # cpu | cuda | mps
    accelerator: str     # human-readable, e.g. "NVIDIA GPU (nvidia-smi)" or "none"
    bf16: bool           # whether bf16 compute is expected to be fast here


@lru_cache(maxsize=1)
def detect() -> Platform:
    forced = os.environ.get("LLFARM_PLATFORM", "").strip().lower()
    if forced in ("cpu", "cuda", "mps"):
        return Platform(forced, f"{forced} (LLFARM_PLATFORM)", bf16=forced == "cuda")
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir():
        return Platform("cuda", "NVIDIA GPU", bf16=True)
    if shutil.which("nvidia-smi") and Path("/dev/nvidiactl").exists():
        return Platform("cuda", "NVIDIA GPU", bf16=True)
    if Path("/dev/kfd").exists():
        return Platform("cuda", "AMD GPU (ROCm)", bf16=True)
    if _platform.system() == "Darwin" and _platform.machine() == "arm64":
        return Platform("mps", "Apple Silicon (MPS)", bf16=False)
    return Platform("cpu", "none (no CUDA, ROCm, XPU or MPS device seen)", bf16=False)


def resolve_precision(requested: str, plat: Platform) -> str:
    """'auto' → bf16 on a GPU that has it, else fp32. Explicit values pass through."""
    if requested != "auto":
        return requested
    return "bf16" if plat.bf16 else "fp32"
