"""Link emulation (--rtt, --bandwidth, --loss): the patches a lossy link loses, and the
seconds a link of a given round trip and bandwidth adds to an exchange."""

from __future__ import annotations

import numpy as np

from collabvit.lite.config import LinkConfig
from collabvit.lite.protocol import PatchPayload

LOSS_STREAM = 0x1055  # separates the loss draws from the `random` policy's draws


def lose_patches(payload: PatchPayload, loss: float, seed: int, index: int) -> PatchPayload:
    """The payload without the patches an emulated link loses, each with probability `loss`,
    drawn from (seed, image index) so that reruns lose the same patches.

    Its positions [k] and patches [k, C, P_h, P_w] become [k'] and [k', C, P_h, P_w]: the k'
    patches kept, in their order.
    """
    if loss <= 0 or payload.size == 0:
        return payload
    rng = np.random.default_rng([seed, index, LOSS_STREAM])
    kept = rng.random(payload.size) >= loss
    return PatchPayload(positions=payload.positions[kept], patches=payload.patches[kept])


def transmission_time(link: LinkConfig, request_bytes: int, response_bytes: int) -> float:
    """Seconds the emulated link takes to carry one exchange's bytes (0 without a bandwidth)."""
    if link.bandwidth is None:
        return 0.0
    return 8.0 * (request_bytes + response_bytes) / link.bandwidth


def link_delay(link: LinkConfig, request_bytes: int, response_bytes: int) -> float:
    """Seconds an emulated link adds to one exchange alone: its round trip plus transmission."""
    return link.rtt / 1000.0 + transmission_time(link, request_bytes, response_bytes)
