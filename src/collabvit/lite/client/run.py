"""The run loop of `collabvit edge`: the edge classifies each batch, confident images keep
its answer, the others go to the server at most `concurrency` at a time (under a budget's
controller when one is given), and every answer is recorded as soon as it is known."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from collabvit.lite.arrays import as_array
from collabvit.lite.client.emulation import lose_patches
from collabvit.lite.client.errors import ServerUnavailable
from collabvit.lite.client.link import ServerAnswer, ServerLink, check_server_geometry
from collabvit.lite.client.records import ImageRecord, RecordsLock, RecordWriter, open_records
from collabvit.lite.client.reporting import EdgeReport, report
from collabvit.lite.client.wire import request_wire_bytes
from collabvit.lite.config import ClientConfig, LinkConfig
from collabvit.lite.pacing import Pacing
from collabvit.lite.protocol import (
    Codec,
    PatchPayload,
    WireGeometry,
    build_payloads,
    encode_payload,
)
from collabvit.lite.summary import ranked_classes


class EdgeRunner(Protocol):
    """What `run_edge` needs of an edge: `EdgeDevice` (torch) and `OnnxEdge` (ONNX Runtime).

    `geometry` has in_chans, patch_size, grid_size, num_patches and num_classes;
    `process(images [B, C, H, W], image_ids [B], seed)` returns a result with `logits`
    [B, classes], `uncertainty` [B], `confident` [B], `payloads` (one per image not
    confident, in order) and `selection_statistics()` -> (size, minimum, sum) [B] each;
    `set_operating_point(masking_th, uncer_th)` moves its (δ or k, η), None keeping one.
    """

    geometry: Any

    def process(self, images: Any, image_ids: Any, seed: int = 0) -> Any: ...

    def set_operating_point(self, masking_th: float | None = None,
                            uncer_th: float | None = None) -> None: ...  # fmt: skip


def log_warning(message: str) -> None:
    """A one-line warning on stderr, as the command line prints them."""
    print(f"collabvit edge: warning: {message}", file=sys.stderr)


def settle(tasks: set[asyncio.Task]) -> None:
    """Forget the finished tasks, raising the first error among them: an image whose
    offloading failed must stop the run, not vanish from it."""
    for task in [t for t in tasks if t.done()]:
        tasks.discard(task)
        task.result()


def full_image_bytes(link: ServerLink, images: Any, geometry: WireGeometry,
                     codecs: dict[str, Codec]) -> list[dict[str, int]]:  # fmt: skip
    """Request bytes of sending each whole image instead, per codec: [B] dicts."""
    everything = np.ones((images.shape[0], geometry.num_patches), dtype=bool)
    payloads = build_payloads(images, everything, list(range(images.shape[0])),
                              geometry.patch_size)  # fmt: skip
    return [{name: request_wire_bytes(link.build_request(encode_payload(p, geometry, codec)))
             for name, codec in codecs.items()} for p in payloads]  # fmt: skip


class EdgeRun:
    """One run of the edge over batches (what run_edge does), a step a method.

    Per batch: the images arrive (`arrive`), the edge classifies them at the controller's
    operating point (`edge_step`); a confident image is answered at once, an uncertain one
    is admitted or withheld (`admission`) and, admitted, offloaded in a task of its own
    (`send`, `offload`) that tells the controller how it went; every answer is recorded as
    soon as it is known (`record`).
    """

    def __init__(self, edge: EdgeRunner, config: ClientConfig, link_config: LinkConfig,
                 model_name: str, seed: int = 0, controller: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:  # fmt: skip
        self.edge, self.config, self.link_config = edge, config, link_config
        self.model_name, self.seed, self.controller = model_name, seed, controller
        self.clock, self.sleep = clock, sleep
        self.codec = Codec.parse(config.codec)
        self.geometry = WireGeometry.of(edge.geometry)
        self.codec.check(self.geometry.channels)  # before any image is sent
        jpeg = Codec("jpeg", self.codec.quality if self.codec.name == "jpeg"
                     else Codec().quality)  # fmt: skip
        self.full_codecs = {str(c): c for c in (Codec("raw"), Codec("png"), jpeg)
                            if c.carries(self.geometry.channels)}  # fmt: skip
        self.slots = asyncio.Semaphore(config.concurrency)
        self.tasks: set[asyncio.Task] = set()
        self.records: list[ImageRecord] = []
        self.writer: RecordWriter | None = None
        self.link: ServerLink | None = None
        # first=1: the first image comes a frame after the run began, so a batch of B
        # images waits B frames (the pacing the edge always had)
        self.pacing = Pacing(controller, config.images_per_second, first=1, now=self.now)
        self.response_bytes = 0.0  # the last answer's response bytes, counted in each admission
        self.began, self.began_counter = clock(), time.perf_counter()

    def now(self) -> float:
        """Seconds since the run began, on the run's clock."""
        return self.clock() - self.began

    async def run(self, batches: Iterable[tuple[Any, Any, Any]], identity: dict,
                  count: int | None = None,
                  metadata: dict | None = None) -> EdgeReport:  # fmt: skip
        """Every image of `batches` answered and recorded (those the records file answers
        already skipped); the report of the whole records file."""
        records_path = Path(self.config.records)
        async with ServerLink(self.config, self.model_name, self.link_config,
                              self.edge.geometry.num_classes, self.seed,
                              shed=self.controller is not None) as self.link:  # fmt: skip
            await self.check_server(metadata)
            lock = RecordsLock(records_path)
            try:
                done = open_records(records_path, identity, self.config.resume, count)
            except BaseException:
                lock.release()
                raise
            self.records = list(done.values())
            self.writer = RecordWriter(records_path)
            try:
                for images, targets, indices in batches:
                    todo = [row for row, i in enumerate(indices.tolist()) if int(i) not in done]
                    if not todo:
                        continue
                    if len(todo) < len(indices):
                        images, targets, indices = images[todo], targets[todo], indices[todo]
                    await self.batch(images, targets, indices)
                await asyncio.gather(*self.tasks)
            finally:
                for task in self.tasks:
                    task.cancel()
                self.writer.close()
                lock.release()
        return report(self.records, self.edge.geometry.num_patches, self.codec)

    async def check_server(self, metadata: dict | None) -> None:
        """No server, another server, a wrong model, token or geometry: stop here (with
        --allow-edge-only a missing server only warns)."""
        try:
            check_server_geometry(metadata or await self.link.metadata(), self.geometry,
                                  self.edge.geometry.num_classes)  # fmt: skip
        except ServerUnavailable as error:
            if not self.config.allow_edge_only:
                raise
            log_warning(f"{str(error).split('; ')[0]}; answering at the edge "
                        "(--allow-edge-only)")  # fmt: skip

    async def batch(self, images: Any, targets: Any, indices: Any) -> None:
        """One batch: each image answered at the edge, withheld, or sent."""
        arrived = await self.arrive(images.shape[0])
        result, started, edge_ms, uncertainties = await self.edge_step(images, indices)
        full = await asyncio.to_thread(full_image_bytes, self.link, images, self.geometry,
                                       self.full_codecs)  # fmt: skip
        size, minimum, total = result.selection_statistics()
        edge_top = ranked_classes(result.logits).tolist()
        payloads = iter(result.payloads)
        for row_index, index in enumerate(indices.tolist()):
            confident = bool(result.confident[row_index])
            row = {"index": int(index), "label": int(targets[row_index]),
                   "edge_top": edge_top[row_index], "confident": confident,
                   "selected": int(size[row_index]), "delivered": int(size[row_index]),
                   "selection_min": float(minimum[row_index]),
                   "selection_sum": float(total[row_index]), "payload_bytes": 0,
                   "full_bytes": full[row_index], "edge_ms": edge_ms}  # fmt: skip
            withheld = None
            if not confident:
                payload = next(payloads)
                blob = encode_payload(payload, self.geometry, self.codec)
                request = self.link.build_request(blob)
                withheld = self.admission(row_index, request, uncertainties)
            if confident or withheld:
                self.record(ImageRecord(**row, final_top=row["edge_top"],
                                        route="withheld" if withheld else "edge",
                                        cause=withheld, request_bytes=0, response_bytes=0,
                                        attempts=0, transfer_ms=None, server_ms=None,
                                        total_ms=1000.0 * (started - arrived) + edge_ms,
                                        answered_at=time.time(), queue_ms=None,
                                        replica=None))  # fmt: skip
                continue
            await self.send(row, payload, blob, request, arrived)

    async def arrive(self, count: int) -> float:
        """Arrival pacing: with --images-per-second a camera's images arrive at its pace,
        each at its own time on the run's clock (self.pacing), and a batch waits for its
        last one. When (perf_counter) the batch's last image was there."""
        times = self.pacing.arrive(count)
        if times is None:  # not paced: they are all there at once
            return time.perf_counter()
        await self.sleep(max(0.0, times[-1] - self.now()))
        return min(time.perf_counter(), self.began_counter + times[-1])  # late: waited

    async def edge_step(self, images: Any, indices: Any) -> tuple[Any, float, float, Any]:
        """The edge's answers for a batch at the controller's operating point; the
        controller then sees every image's uncertainty (paced, at the first arrival).

        Returns the edge's result, when (perf_counter) it started, its milliseconds per
        image, and the uncertainties [B] the controller saw (None without one).
        """
        self.pacing.steer(self.edge)
        started = time.perf_counter()
        result = await asyncio.to_thread(self.edge.process, images, indices, self.seed)
        edge_ms = 1000.0 * (time.perf_counter() - started) / images.shape[0]
        uncertainties = None
        if self.controller is not None:
            uncertainties = as_array(result.uncertainty)
            self.pacing.observe(uncertainties)
        return result, started, edge_ms, uncertainties

    def admission(self, row: int, request: httpx.Request, uncertainties: Any) -> str | None:
        """Why the batch's image `row`, which the gate sends, is withheld: "busy" (paced,
        every request slot is taken: a budget never lets a camera wait), "budget" (the
        controller refuses its bytes at its arrival, or now unpaced), or None: it goes out.
        `uncertainties` [B] are the batch's."""
        if self.controller is None:
            return None
        if self.config.images_per_second and self.slots.locked():
            return "busy"
        if not self.pacing.admit(row, request_wire_bytes(request) + self.response_bytes,
                                 float(uncertainties[row])):  # fmt: skip
            return "budget"
        return None

    async def send(self, row: dict, payload: PatchPayload, blob: bytes,
                   request: httpx.Request, arrived: float) -> None:  # fmt: skip
        """Offload an admitted image in a task of its own once a request slot is free."""
        await self.slots.acquire()
        settle(self.tasks)
        if self.controller is not None:
            self.controller.sent(self.now())
        self.tasks.add(asyncio.create_task(self.offload(row, payload, blob, request, arrived)))

    async def offload(self, row: dict, payload: PatchPayload, blob: bytes,
                      request: httpx.Request, started: float) -> None:  # fmt: skip
        """The server's answer for one image (or the edge's, when it fails), recorded."""
        try:
            row["payload_bytes"] = len(blob)
            counted = None
            if self.link_config.loss > 0:  # the edge sent it all; the server gets what survives
                counted = request_wire_bytes(request)
                delivered = lose_patches(payload, self.link_config.loss, self.seed, row["index"])
                row["delivered"] = delivered.size
                blob, request = encode_payload(delivered, self.geometry, self.codec), None
            answer = await self.link.classify(blob, counted, request)
        finally:
            self.slots.release()
        if answer.logits is not None:
            final_top = ranked_classes(answer.logits[None])[0].tolist()
            route = "server"
        else:
            final_top, route = row["edge_top"], "fallback"
        if self.controller is not None:
            self.tell_controller(answer)
        self.record(ImageRecord(**{**row, "final_top": final_top, "route": route,
                                   "cause": answer.cause, "request_bytes": answer.request_bytes,
                                   "response_bytes": answer.response_bytes,
                                   "attempts": answer.attempts,
                                   "transfer_ms": answer.transfer_ms,
                                   "server_ms": answer.server_ms,
                                   "total_ms": 1000.0 * (time.perf_counter() - started),
                                   "answered_at": time.time(),
                                   "queue_ms": answer.queue_ms,
                                   "replica": answer.replica}))  # fmt: skip

    def tell_controller(self, answer: ServerAnswer) -> None:
        """What the budget learns of an answer: its bytes and time on the wire, or that the
        server asked to wait, timed out or failed."""
        if answer.logits is not None:
            self.response_bytes = answer.response_bytes / max(answer.attempts, 1)
            self.controller.answered(answer.request_bytes + answer.response_bytes,
                                     None if answer.transfer_ms is None
                                     else answer.transfer_ms / 1000, answer.load)  # fmt: skip
        elif answer.retry_after is not None:
            self.controller.pause(self.now() + answer.retry_after)
        elif answer.cause == "timeout":
            self.controller.timed_out()
        else:
            self.controller.failed()

    def record(self, record: ImageRecord) -> None:
        """An image's final answer, kept for the report and appended to the records file."""
        self.records.append(record)
        self.writer.write(record)


async def run_edge(
    edge: EdgeRunner,
    batches: Iterable[tuple[Any, Any, Any]],
    config: ClientConfig,
    link_config: LinkConfig,
    model_name: str,
    identity: dict,
    seed: int = 0,
    count: int | None = None,
    metadata: dict | None = None,
    controller: Any = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> EdgeReport:
    """Run the edge over batches, offloading uncertain images to the server.

    Args:
        edge: the edge (model, gate, selection): an EdgeDevice or an OnnxEdge.
        batches: (unnormalised images [B, C, H, W] uint8, targets [B], dataset indices [B]),
            torch tensors or numpy arrays as the edge takes them.
        config: server URL, codec, concurrency, retries, records file.
        link_config: the emulated link (none by default).
        model_name: the served model's name.
        identity: the run's settings, stored with the records (see run_identity).
        seed: seeds the `random` policy and the emulated loss.
        count: the dataset's size (records of other images are not resumed).
        metadata: the served model's metadata when the caller already read it (check_server
            before loading the edge); else it is read here.
        controller: a controller.CostController or BytesController holding a budget: each
            batch runs at the (δ, η) it gives, it sees every image's uncertainty, admits or
            withholds each send, and hears back each answer's bytes, time on the wire and
            the server's load; a 503 or 429 then pauses the sends for the Retry-After
            asked instead of being retried.
        clock, sleep: the run's clock (seconds) and how it waits for a camera's next images
            (images_per_second); the images' arrival times and the controller's times are on
            this clock. Simulated ones run a paced run without waiting for it.
    """
    return await EdgeRun(edge, config, link_config, model_name, seed, controller, clock,
                         sleep).run(batches, identity, count, metadata)  # fmt: skip
