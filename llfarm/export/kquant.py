"""K-quants (q4_k_m, q5_k_m, q6_k) through llama.cpp's own quantizer, ``llama_model_quantize`` of
llama-cpp-python (the opt-in ``llamacpp`` extra): gguf-py can only dequantize them. The input is a 16-bit (or f32)
GGUF written by llfarm; llama.cpp picks each tensor's type exactly as ``llama-quantize`` does.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import ExportError

KQUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q5_K_M, _Q6_K
_INTERMEDIATE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def check_available(quant: str) -> None:
    """ExportError naming both ways to get K-quants when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ExportError(f"--quant {quant} needs llama.cpp's quantizer, which is not installed", where="--quant",
                          hint="pip install 'llfarm[llamacpp]' (compiles llama.cpp, ~10 min), or export --quant f16 "
                               f"and let Ollama quantize: ollama create --quantize q{quant[1:].upper()} "
                               "-f Modelfile")


def intermediate_type(tensors: Iterable) -> str:
    """The GGUF type to quantize from: the checkpoint's own matrix dtype, so nothing is rounded twice."""
    counts = Counter(t.dtype for t in tensors if len(t.shape) == 2)
    return _INTERMEDIATE[counts.most_common(1)[0][0]] if counts else "f16"


_silence = None  # the ctypes callback must outlive the call


def quantize_file(src: Path, dst: Path, quant: str) -> Path:
    check_available(quant)
    import llama_cpp

    global _silence
    if _silence is None and hasattr(llama_cpp, "llama_log_set"):
        _silence = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_silence, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = KQUANTS[quant]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed (code {rc}) on {src.name}", where="--quant",
                          hint="export --quant f16 and quantize with llama-quantize or ollama create --quantize")
    return dst
