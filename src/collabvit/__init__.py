"""collabvit: attention-aware collaborative inference between an edge ViT and a server ViT.

The method of Im et al., "Attention-aware Semantic Communications for
Collaborative Inference", IEEE Internet of Things Journal, 2024.
"""

__version__ = "0.1.0"

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
]
