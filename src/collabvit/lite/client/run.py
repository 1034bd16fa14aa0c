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
    codec = Codec.parse(config.codec)
    g = edge.geometry
    geometry = WireGeometry.of(g)
    codec.check(geometry.channels)  # before any image is sent
    records_path = Path(config.records)
    jpeg = Codec("jpeg", codec.quality if codec.name == "jpeg" else Codec().quality)
    full_codecs = {str(c): c for c in (Codec("raw"), Codec("png"), jpeg)
                   if c.carries(geometry.channels)}  # fmt: skip
    slots = asyncio.Semaphore(config.concurrency)
    tasks: set[asyncio.Task] = set()
    began, began_counter = clock(), time.perf_counter()

    def now() -> float:
        """Seconds since the run began, on the run's clock."""
        return clock() - began

    def finish(record: ImageRecord) -> None:
        records.append(record)
        writer.write(record)

    async def offload(row: dict, payload: PatchPayload, blob: bytes, request: httpx.Request,
                      started: float) -> None:  # fmt: skip
        try:
            row["payload_bytes"] = len(blob)
            counted = None
            if link_config.loss > 0:  # the edge sent it all; the server gets what survives
                counted = request_wire_bytes(request)
                delivered = lose_patches(payload, link_config.loss, seed, row["index"])
                row["delivered"] = delivered.size
                blob, request = encode_payload(delivered, geometry, codec), None
            answer = await link.classify(blob, counted, request)
        finally:
            slots.release()
        if answer.logits is not None:
            final_top = ranked_classes(answer.logits[None])[0].tolist()
            route = "server"
        else:
            final_top, route = row["edge_top"], "fallback"
        if controller is not None:
            tell_controller(answer)
        finish(ImageRecord(**{**row, "final_top": final_top, "route": route,
                              "cause": answer.cause, "request_bytes": answer.request_bytes,
                              "response_bytes": answer.response_bytes,
                              "attempts": answer.attempts, "transfer_ms": answer.transfer_ms,
                              "server_ms": answer.server_ms,
                              "total_ms": 1000.0 * (time.perf_counter() - started),
                              "answered_at": time.time()}))

    def tell_controller(answer: ServerAnswer) -> None:
        nonlocal response_bytes
        if answer.logits is not None:
            response_bytes = answer.response_bytes / max(answer.attempts, 1)
            controller.answered(answer.request_bytes + answer.response_bytes,
                                None if answer.transfer_ms is None else answer.transfer_ms / 1000,
                                answer.load)  # fmt: skip
        elif answer.retry_after is not None:
            controller.pause(now() + answer.retry_after)
        elif answer.cause == "timeout":
            controller.timed_out()
        else:
            controller.failed()

    response_bytes = 0.0  # the last answer's response bytes, counted in each admission

    async with ServerLink(config, model_name, link_config, g.num_classes, seed,
                          shed=controller is not None) as link:  # fmt: skip
        try:  # no server, another server, a wrong model, token or geometry: stop here
            check_server_geometry(metadata or await link.metadata(), geometry, g.num_classes)
        except ServerUnavailable as error:
            if not config.allow_edge_only:
                raise
            log_warning(f"{str(error).split('; ')[0]}; answering at the edge "
                        "(--allow-edge-only)")  # fmt: skip
        lock = RecordsLock(records_path)
        try:
            done = open_records(records_path, identity, config.resume, count)
        except BaseException:
            lock.release()
            raise
        records = list(done.values())
        writer = RecordWriter(records_path)
        taken = 0
        try:
            for images, targets, indices in batches:
                todo = [row for row, i in enumerate(indices.tolist()) if int(i) not in done]
                if not todo:
                    continue
                if len(todo) < len(indices):
                    images, targets, indices = images[todo], targets[todo], indices[todo]
                # a camera: the images arrive at their pace, each at its own time (those of
                # the run's clock); a batch waits for its last one
                arrived, times = time.perf_counter(), None
                if config.images_per_second:
                    times = [(taken + row + 1) / config.images_per_second
                             for row in range(images.shape[0])]  # fmt: skip
                    taken += images.shape[0]
                    await sleep(max(0.0, times[-1] - now()))
                    arrived = min(time.perf_counter(), began_counter + times[-1])  # late: waited
                if controller is not None:
                    edge.set_operating_point(*controller.operating_point())
                started = time.perf_counter()
                result = await asyncio.to_thread(edge.process, images, indices, seed)
                edge_ms = 1000.0 * (time.perf_counter() - started) / images.shape[0]
                if controller is not None:  # paced, it sees each image at its arrival
                    uncertainties = as_array(result.uncertainty)
                    controller.observe(uncertainties, times[0] if times else now())
                full = await asyncio.to_thread(full_image_bytes, link, images, geometry,
                                               full_codecs)  # fmt: skip
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
                        blob = encode_payload(payload, geometry, codec)
                        request = link.build_request(blob)
                        if controller is not None and config.images_per_second \
                                and slots.locked():  # fmt: skip
                            withheld = "busy"  # a budget never lets a camera wait
                        elif controller is not None and not controller.admit(
                                times[row_index] if times else now(),
                                request_wire_bytes(request) + response_bytes,
                                float(uncertainties[row_index])):  # fmt: skip
                            withheld = "budget"
                    if confident or withheld:
                        waited = 1000.0 * (started - arrived)
                        finish(ImageRecord(**row, final_top=row["edge_top"],
                                           route="withheld" if withheld else "edge",
                                           cause=withheld, request_bytes=0, response_bytes=0,
                                           attempts=0, transfer_ms=None, server_ms=None,
                                           total_ms=waited + edge_ms,
                                           answered_at=time.time()))  # fmt: skip
                        continue
                    await slots.acquire()
                    settle(tasks)
                    if controller is not None:
                        controller.sent(now())
                    tasks.add(asyncio.create_task(offload(row, payload, blob, request,
                                                          arrived)))  # fmt: skip
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            lock.release()
    return report(records, g.num_patches, codec)
