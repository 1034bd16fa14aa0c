"""The precision a model computes in: float32 (exact: the reference implementation's figures),
bfloat16, or int8 (the linear layers dynamically quantized).

Whatever the precision, the edge's patch scores are computed in float32 from the last
block's queries and keys, and the logits come back in float32 (vit.py): low precision moves
the answers and the gate a little, the selection as little as the blocks' outputs allow.

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

# the CPU features with which bfloat16 runs natively; a CPU without either emulates it, and
# slower than float32
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bfloat16(device: torch.device) -> bool:
    """bfloat16 runs natively on `device`: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_model() for flag in BF16_CPU_FLAGS)


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError (one line) for a precision that is unknown or cannot run on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU (fbgemm); on {device.type} use bfloat16")


def with_precision(model: torch.nn.Module, precision: str,
                   device: torch.device) -> torch.nn.Module:  # fmt: skip
    """`model` (a float32 ViT in eval mode) computing in `precision`: the same module for
    float32, a converted copy otherwise (`model` stays as it is: a caller may hold it)."""
    check_precision(precision, device)
    if precision == "float32":
        return model
    if precision == "bfloat16":
        return copy.deepcopy(model).to(torch.bfloat16)
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
    return "bfloat16" if model.patch_embed.proj.weight.dtype == torch.bfloat16 else "float32"
