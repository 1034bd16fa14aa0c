"""collabvit: attention-aware collaborative inference between an edge ViT and a server ViT.

The method of Im et al., "Attention-aware Semantic Communications for
Collaborative Inference", IEEE Internet of Things Journal, 2024.
"""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """The software that made a result, recorded beside it."""
    import platform

    import timm
    import torch

    return {
        "collabvit": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


from collabvit.edge import EdgeConfig, EdgeDevice, EdgeResult  # noqa: E402
from collabvit.evaluate import evaluate  # noqa: E402
from collabvit.protocol import PatchPayload  # noqa: E402
from collabvit.server import Server  # noqa: E402
from collabvit.vit import Normalization, create_vit  # noqa: E402

__all__ = [
    "EdgeConfig",
    "EdgeDevice",
    "EdgeResult",
    "Normalization",
    "PatchPayload",
    "Server",
    "__version__",
    "create_vit",
    "evaluate",
    "versions",
]
