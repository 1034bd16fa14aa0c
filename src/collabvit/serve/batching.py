"""How work enters the model: the dynamic `Batcher` that gathers the images of concurrent
requests into one batch, and the `Admission` bound (with each body's `BodyHold`) on the
images and bytes the service holds, refusing with Retry-After (`retry_after_seconds`)
rather than queueing without bound. Nothing here knows HTTP: refusals are ServiceErrors.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from collabvit.lite.protocol import PatchPayload
from collabvit.serve.metrics import Metrics, ServiceError


@dataclass
class _Pending:
    """One request's payloads waiting for a batch, and the future its answer goes to."""

    payloads: list[PatchPayload]
    future: asyncio.Future
    queued_at: float


class Batcher:
    """Dynamic batching of payloads from concurrent requests.

    A batch starts with the oldest waiting request and takes further requests
    until it holds `max_batch` images, or until `max_delay` seconds have passed
    since it started and the model is free. While one batch computes (in a
    worker thread, so the event loop keeps serving HTTP), the next one fills
    up and starts the moment the model is free: request handling overlaps with
    computing. A single request larger than `max_batch` forms a batch alone.
    """

    def __init__(self, classify: Callable[[list[PatchPayload]], torch.Tensor], max_batch: int,
                 max_delay: float, metrics: Metrics) -> None:  # fmt: skip
        self.classify = classify
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.metrics = metrics
        self.pending: deque[_Pending] = deque()
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collabvit-batch")
        self.task: asyncio.Task | None = None
        self.running: asyncio.Task | None = None
        self.images_per_second: float | None = None  # the model's recent rate (Retry-After)

    def start(self) -> None:
        """Start forming batches (on the running event loop)."""
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop forming batches, let the running one finish, and end the worker thread."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.running is not None:
            await asyncio.gather(self.running, return_exceptions=True)
        self.executor.shutdown(wait=True)

    def enqueue(self, payloads: list[PatchPayload]) -> asyncio.Future:
        """Queue payloads; the future gives (logits [len(payloads), classes] float32, seconds
        spent queued). Cancelling it before its batch starts drops the payloads uncomputed."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(payloads, future, time.perf_counter()))
        self.arrived.set()
        return future

    def _drop_cancelled(self) -> None:
        """Forget queued requests whose future was cancelled (their client went away)."""
        while self.pending and self.pending[0].future.done():
            self.metrics.dropped.inc(len(self.pending.popleft().payloads))
        if any(item.future.done() for item in self.pending):
            kept = deque()
            for item in self.pending:
                if item.future.done():
                    self.metrics.dropped.inc(len(item.payloads))
                else:
                    kept.append(item)
            self.pending = kept

    def _busy(self) -> bool:
        return self.running is not None and not self.running.done()

    async def _wait(self, timeout: float | None) -> None:
        """Until a request arrives, the running batch finishes, or `timeout` passes."""
        self.arrived.clear()
        arrival = asyncio.ensure_future(self.arrived.wait())
        waiters = {arrival, self.running} if self._busy() else {arrival}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrival.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            while not self.pending:
                await self._wait(None)
                self._drop_cancelled()
            batch, images = [], 0
            deadline = time.perf_counter() + self.max_delay
            while True:
                self._drop_cancelled()
                while self.pending and (not batch or images + len(self.pending[0].payloads)
                                        <= self.max_batch):  # fmt: skip
                    item = self.pending.popleft()
                    batch.append(item)
                    images += len(item.payloads)
                if images >= self.max_batch or self.pending:  # full
                    break
                remaining = deadline - time.perf_counter()
                if not self._busy() and remaining <= 0:
                    break
                await self._wait(None if self._busy() else remaining)
            if self._busy():  # full before the model was free
                await asyncio.wait({self.running})
            live = [item for item in batch if not item.future.done()]
            for item in batch:
                if item.future.done():
                    self.metrics.dropped.inc(len(item.payloads))
            if not live:
                continue
            images = sum(len(item.payloads) for item in live)
            self.running = loop.create_task(self._run_batch(loop, live, images))

    async def _run_batch(self, loop, batch: list[_Pending], images: int) -> None:
        started = time.perf_counter()
        payloads = [p for item in batch for p in item.payloads]
        self.metrics.batch_size.observe(images)
        for item in batch:
            self.metrics.queue_time.observe(started - item.queued_at)
        try:
            logits = await loop.run_in_executor(self.executor, self._classify, payloads)
            rate = images / max(time.perf_counter() - started, 1e-6)
            self.images_per_second = rate if self.images_per_second is None else \
                0.8 * self.images_per_second + 0.2 * rate  # fmt: skip
        except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        offset = 0
        for item in batch:
            count = len(item.payloads)
            if not item.future.done():  # the client may have gone away
                item.future.set_result((logits[offset : offset + count],
                                        started - item.queued_at))  # fmt: skip
            offset += count

    def _classify(self, payloads: list[PatchPayload]) -> np.ndarray:
        return self.classify(payloads).cpu().numpy().astype(np.float32, copy=False)


class Admission:
    """Bounds the work admitted and not yet answered, in images, and the memory requests
    hold, in bytes: the bodies being read or parsed and the decoded pixels of the admitted
    images, against one bound.

    A body chunk that would cross the bytes bound is refused (503 with Retry-After, and the
    connection closes), so bodies that arrive slowly or stall cannot hold more memory than
    the bound, whatever the number of connections. A request that would cross a bound is
    refused the same way before its pixels are decoded, so neither the queue nor the
    server's memory grows without bound under overload. Used from the event loop only
    (no lock needed).
    """

    def __init__(self, max_images: int, max_bytes: int, metrics: Metrics) -> None:
        self.max_images, self.max_bytes, self.metrics = max_images, max_bytes, metrics
        self.images = self.bytes = self.receiving = 0

    def reserve(self, images: int, nbytes: int, retry_after: int, own_body: int = 0) -> None:
        """Count a request's images and decoded bytes in, or raise ServiceError 503 (413 if
        it could never fit). `own_body`: the bytes of its body held meanwhile (counted by
        `hold_body` already)."""
        if images > self.max_images or nbytes + own_body > self.max_bytes:
            raise ServiceError(413, "too_large", f"the request's {images} images decode to "
                               f"{nbytes:,} bytes; this server admits at most {self.max_images}"
                               f" images and {self.max_bytes:,} bytes at a time")  # fmt: skip
        if self.images + images > self.max_images or self.held + nbytes > self.max_bytes:
            raise ServiceError(503, "overloaded", f"the server is busy ({self.images} images "
                               f"queued); retry after {retry_after} s",
                               {"Retry-After": str(retry_after)})  # fmt: skip
        self._move(images, nbytes)

    def release(self, images: int, nbytes: int) -> None:
        """Count an answered request's images and decoded bytes out."""
        self._move(-images, -nbytes)

    def hold_body(self, nbytes: int, retry_after: int) -> None:
        """Count `nbytes` more of a body being read, or raise ServiceError 503 (the request
        ends, and its connection: the caller releases what it held)."""
        if self.held + nbytes > self.max_bytes:
            raise ServiceError(503, "overloaded", f"the server holds {self.held:,} bytes of "
                               f"requests (at most {self.max_bytes:,}); retry after "
                               f"{retry_after} s", {"Retry-After": str(retry_after)})
        self.receiving += nbytes
        self.metrics.receiving_bytes.set(self.receiving)

    def release_body(self, nbytes: int) -> None:
        """Count `nbytes` of bodies out (decoded, or their request ended)."""
        self.receiving -= nbytes
        self.metrics.receiving_bytes.set(self.receiving)

    @property
    def held(self) -> int:
        """Bytes counted against the bound: bodies not yet decoded and decoded pixels."""
        return self.bytes + self.receiving

    @property
    def load(self) -> float:
        """The share of the tighter bound in use (0..1): the load hint each answer carries,
        from which adaptive clients lower their share before the server has to refuse."""
        return max(self.images / self.max_images, self.held / self.max_bytes)

    def _move(self, images: int, nbytes: int) -> None:
        self.images += images
        self.bytes += nbytes
        self.metrics.admitted_images.set(self.images)
        self.metrics.admitted_bytes.set(self.bytes)


class BodyHold:
    """The bytes one request's body holds against the admission bound, released at once
    when the request ends (use as a context manager).

    A body being read also holds the buffers that carry it (asyncio reads up to 256 KiB at
    a time, and h11 and uvicorn each keep what the application has not taken yet, with
    the allocator's slack around them): the first chunk counts `BUFFERS` more, so that
    many stalled uploads stay within the bound in resident memory (measured by
    bench_overload), not only in the bytes the application holds.
    """

    BUFFERS = 2**20

    def __init__(self, admission: Admission, retry_after: Callable[[], int]) -> None:
        self.admission, self.retry_after, self.bytes = admission, retry_after, 0

    def add(self, nbytes: int) -> None:
        """Hold `nbytes` more of the body, or raise ServiceError 503 (Admission.hold_body)."""
        if not self.bytes:
            nbytes += self.BUFFERS
        self.admission.hold_body(nbytes, self.retry_after())
        self.bytes += nbytes

    def release(self) -> None:
        """Give back what the body holds (its images' decoded bytes now stand for it)."""
        self.admission.release_body(self.bytes)
        self.bytes = 0

    def __enter__(self) -> BodyHold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def retry_after_seconds(queued_images: int, images_per_second: float | None) -> int:
    """Seconds until the admitted work has probably drained: 1 to 30."""
    if not images_per_second:
        return 1
    return max(1, min(30, math.ceil(queued_images / images_per_second)))

