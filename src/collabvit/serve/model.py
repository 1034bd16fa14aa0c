"""The served model: how `collabvit serve` and each of its `--workers` processes load it
(`load_served_model`: threads, weights, precision), and its state in the service: loaded
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
from collabvit.lite.specs import AUTO_PRECISIONS
from collabvit.models import zoo
from collabvit.models.precision import (
    check_precision,
    emulation_warning,
    runs_natively,
    with_precision,
)
from collabvit.models.server import Server

log = logging.getLogger("collabvit.serve")
# the largest change in collaborative accuracy (points, on the shipped pair's test images)
# that a model card may record for a lower precision for `--precision auto` to serve in it
AUTO_PRECISION_BOUND = 0.1


def served_precision(asked: str, spec: ModelSpec, device: torch.device) -> str:
    """What `collabvit serve` computes in: `asked`, or for 'auto' the first of bfloat16 and
    float16 that runs natively on `device` and for which the shipped model's card records a
    change of at most AUTO_PRECISION_BOUND points (measured by scripts/precision_report.py),
    float32 otherwise (other weights, another model, an emulating CPU)."""
    if asked != "auto":
        return asked
    if spec.weights is not None:
        return "float32"
    for precision in AUTO_PRECISIONS:
        change = zoo.precision_change(spec.name.split(".")[0], precision)
        if runs_natively(precision, device) and change is not None \
                and change <= AUTO_PRECISION_BOUND:  # fmt: skip
            return precision
    return "float32"


def load_served_model(spec: ModelSpec, device: str, threads: int | None, precision: str,
                      max_batch: int, warn: Callable[[str], None] | None = None,
                      ) -> tuple[Callable[[], Server], str]:  # fmt: skip
    """Load the server model `spec` names, now; the loader create_app takes, and the
    precision it computes in.

    A user's mistake (an unknown model, a device this machine lacks, int8 on a GPU) raises
    here, as ValueError or OSError. `threads` (None: torch's choice) sets the process's
    torch threads first; `precision` is one of PRECISIONS or 'auto' (served_precision), and
    `warn` (if given) hears of a half precision asked for on a CPU that only emulates it. The
    returned loader puts the model in a Server on `device` that batches at most
    `max_batch` images.
    """
    from collabvit.models.pair import load_model, resolve_device

    resolved = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    chosen = served_precision(precision, spec, resolved)
    check_precision(chosen, resolved)
    model = load_model(spec, server=True)
    emulated = emulation_warning(chosen, resolved)
    if emulated and warn is not None:
        warn(emulated)
    model = with_precision(model, chosen, resolved)
    classes = zoo.recorded_classes(spec.weights)

    def load() -> Server:
        server = Server(model, resolved, max_batch=max_batch)
        server.class_names = classes
        return server

    return load, chosen


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
