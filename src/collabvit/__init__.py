"""collabvit: attention-aware collaborative inference between an edge ViT and a server ViT.

The method of Im et al., "Attention-aware Semantic Communications for
Collaborative Inference", IEEE Internet of Things Journal, 2024.

The names below load on first use, so ``import collabvit`` (and the command
line's help) does not pay for torch and timm until they are needed.
Submodules keep their own names: ``collabvit.research.evaluate.evaluate(...)``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "DataSpec": "config",
    "EdgeConfig": "lite.specs",
    "ModelSpec": "config",
    "SweepConfig": "config",
    "EdgeDevice": "models.edge",
    "EdgeResult": "models.edge",
    "PatchPayload": "lite.protocol",
    "Server": "models.server",
    "Normalization": "models.vit",
    "create_vit": "models.vit",
    "Pair": "models.pair",
    "load_pair": "models.pair",
}

__all__ = ["__version__", "versions", "cpu_model", *_EXPORTS]


def cpu_model() -> str:
    """The CPU's name and the vector extensions that decide float32 and bfloat16 speed,
    e.g. "AMD EPYC (avx2, avx512f, avx512_bf16)"."""
    import platform
    from pathlib import Path

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name, flags = platform.machine(), set()
    for line in info.splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no avx2/avx512/amx'})"


def versions() -> dict[str, str]:
    """The software that made a result, recorded beside it: collabvit, Python, and those of
    torch, timm and onnxruntime that this process has loaded (the ones that computed)."""
    import platform
    import sys

    found = {"collabvit": __version__}
    for name in ("torch", "timm", "onnxruntime"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = module.__version__
    return {**found, "python": platform.python_version()}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"collabvit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'collabvit' has no attribute {name!r}")
