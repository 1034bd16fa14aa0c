"""The served model's state: loaded and warmed up in a thread after the server starts
listening (`ModelState.load`), so the health checks answer, and say "not ready", while
it loads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from collabvit.lite.protocol import PatchPayload, WireGeometry
from collabvit.models.server import Server

log = logging.getLogger("collabvit.serve")


class ModelState:
    """The server model once loaded and warmed; None before."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.geometry: WireGeometry | None = None
        self.error: str | None = None
        self.ready = threading.Event()

    def load(self, load_server: Callable[[], Server]) -> None:
        """Load and warm up the Server `load_server` builds; ready, or failed with a reason."""
        try:
            server = load_server()
            geometry = WireGeometry.of(server.geometry)
            warm_up(server)
        except Exception as error:  # noqa: BLE001 - reported by /v2/health/ready and the log
            self.error = f"{type(error).__name__}: {error}"
            log.error("the model failed to load: %s", self.error)
            return
        self.server, self.geometry = server, geometry
        self.ready.set()
        log.info("model ready: %s", server.geometry.describe())


def warm_up(server: Server) -> None:
    """One forward with every patch and one with none, so the first request is not slow."""
    g = server.geometry
    full = PatchPayload(np.arange(g.num_patches),
                        np.zeros((g.num_patches, g.in_chans, *g.patch_size), dtype=np.uint8))
    empty = PatchPayload(np.zeros(0, dtype=np.int64),
                         np.zeros((0, g.in_chans, *g.patch_size), dtype=np.uint8))  # fmt: skip
    server.classify([full, empty])
