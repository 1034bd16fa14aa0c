"""The precision a model computes in: float32 (exact: the reference implementation's figures),
bfloat16, float16, or int8 (the linear layers dynamically quantized).

Whatever the precision, the edge's patch scores are computed in float32 from the last
block's queries and keys, and the logits come back in float32 (vit.py): low precision moves
the answers and the gate a little, the selection as little as the blocks' outputs allow.

bfloat16 and float16 convert the model's weights, on a CPU and on a GPU alike, rather than
run a float32 model under torch.autocast: autocast would cast every weight again on every
forward, a copy that inference (whose weights never change) need not pay; vit.py computes
the scores and returns the logits in float32 either way, and still honours an enclosing
autocast region for a caller who wants one. float16 is a GPU's precision: a CPU without
AVX512-FP16 or AMX-FP16 emulates it, several times slower than float32.

int8 uses torch's own dynamic quantization of `nn.Linear` (fbgemm kernels on x86: int8
weights, activations quantized per batch), the one int8 path of torch that needs no
calibration data and keeps the model a torch module that every path here runs. The
attention's query/key/value projections stay in float32: vit.py reads their weights to
compute the class token's attention, and a dequantized copy of them would cost what int8
saves. The MLPs, the attention's output projection and the head (about 70 % of a ViT's
multiply-adds) run in int8.
"""

from __future__ import annotations

import copy
import warnings

import torch

from collabvit import cpu_model
from collabvit.lite.specs import PRECISIONS

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# the CPU features with which each half precision runs natively; a CPU without any of them
# emulates it, and slower than float32
NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"),
                    "float16": ("avx512_fp16", "amx_fp16")}  # fmt: skip
CPU_FEATURE_NAMES = {"bfloat16": "AVX512-BF16 or AMX", "float16": "AVX512-FP16 or AMX-FP16"}


def runs_natively(precision: str, device: torch.device) -> bool:
    """`precision` runs at its full speed on `device`: float32 and int8 on a CPU; bfloat16 on
    a CPU with AVX512-BF16 or AMX and on a GPU that supports it; float16 on a CPU with
    AVX512-FP16 or AMX-FP16 and on any CUDA GPU."""
    if precision == "float32":
        return True
    if precision == "int8":
        return device.type == "cpu"
    if device.type == "cuda":
        return precision == "float16" or torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(f in cpu_model() for f in NATIVE_CPU_FLAGS[precision])


def emulation_warning(precision: str, device: torch.device) -> str | None:
    """One line for a half precision asked for on a CPU that only emulates it; None else."""
    if device.type != "cpu" or precision not in NATIVE_CPU_FLAGS \
            or runs_natively(precision, device):  # fmt: skip
        return None
    return (f"{precision} on a CPU without {CPU_FEATURE_NAMES[precision]} ({cpu_model()}) is "
            "emulated and slower than float32")


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError (one line) for a precision that is unknown or cannot run on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU (fbgemm); on {device.type} use bfloat16 or float16")


def with_precision(model: torch.nn.Module, precision: str,
                   device: torch.device) -> torch.nn.Module:  # fmt: skip
    """`model` (a float32 ViT in eval mode) computing in `precision`: the same module for
    float32, a converted copy otherwise (`model` stays as it is: a caller may hold it)."""
    check_precision(precision, device)
    if precision == "float32":
        return model
    if precision in HALF:
        return copy.deepcopy(model).to(HALF[precision])
    linear = {name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.endswith("attn.qkv")}
    with warnings.catch_warnings():  # torch marks eager quantization for a move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # ... and its quantized tensors
        return torch.ao.quantization.quantize_dynamic(model, linear, dtype=torch.qint8)


def precision_of(model: torch.nn.Module) -> str:
    """The precision a model computes in (with_precision's name for it)."""
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        return "int8"
    dtype = model.patch_embed.proj.weight.dtype
    return next((name for name, half in HALF.items() if half == dtype), "float32")
