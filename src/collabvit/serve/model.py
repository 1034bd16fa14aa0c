"""The served model: how `collabvit serve` and each of its `--workers` processes load it
(`load_served_model`: threads, weights, bfloat16), and its state in the service: loaded
and warmed up in a thread after the server starts listening (`ModelState.load`), so the
health checks answer, and say "not ready", while it loads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from collabvit.config import ModelSpec
from collabvit.lite.protocol import PatchPayload, WireGeometry
from collabvit.models.server import Server

log = logging.getLogger("collabvit.serve")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # a CPU without either emulates bfloat16


def load_served_model(spec: ModelSpec, device: str, threads: int | None, bf16: bool,
                      max_batch: int, warn: Callable[[str], None] | None = None,
                      ) -> Callable[[], Server]:  # fmt: skip
    """Load the server model `spec` names, now, and return the loader create_app takes.

    A user's mistake (an unknown model, a device this machine lacks) raises here, as
    ValueError or OSError. `threads` (None: torch's choice) sets the process's torch
    threads first; with `bf16` the model is converted to bfloat16, and `warn` (if given)
    hears of it on a CPU that only emulates bfloat16. The returned loader puts the model
    in a Server on `device` that batches at most `max_batch` images.
    """
    from collabvit import cpu_model
    from collabvit.models.pair import load_model, resolve_device

    resolved = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    model = load_model(spec, server=True)
    if bf16:
        if warn is not None and resolved.type == "cpu" and not any(
                flag in cpu_model() for flag in BF16_CPU_FLAGS):  # fmt: skip
            warn(f"--bf16 on a CPU without AVX512-BF16 or AMX ({cpu_model()}) is emulated "
                 "and slower than float32")
        model = model.to(torch.bfloat16)
    return lambda: Server(model, resolved, max_batch=max_batch)


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
