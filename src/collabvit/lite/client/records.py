"""The records file: one JSON line per answered image (ImageRecord) after a head line naming
the format and the run's identity, written under an exclusive lock, and read back when a
run resumes (the rule for which records a resumed run keeps lives in open_records)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from collabvit.lite.client.errors import ClientError

# Why an image kept the edge's answer although it was not confident: no answer within the
# time-out; connection refused (nothing listens); another network failure; another 5xx;
# 503/429 (the server is full or not ready); another 4xx; an answer that does not decode
# (malformed, over its size cap, or holding a logit that is not finite); the cool-down
# after the server proved unreachable or asked to wait (Retry-After). A TLS verification
# failure, a refused token and an unknown model are not fallbacks: they stop the run.
FALLBACK_CAUSES = ("timeout", "refused", "unreachable", "server_error", "unavailable", "rejected",
                   "bad_response", "server_down")  # fmt: skip
RECORDS_FORMAT = "collabvit-edge-records/4"
RECORDS_SYNC_LINES = 64  # the records are fsynced every this many lines, and at the end


@dataclass(frozen=True)
class ImageRecord:
    """One image's outcome: a line of the records file.

    Attributes:
        index: dataset index. label: its class.
        edge_top, final_top: the edge's and the final answer's best classes, best first.
        confident: answered at the edge by the gate.
        route: "edge" (confident), "server", "fallback" (sent, but the edge answered), or
            "withheld" (the gate would send it, the budget did not: the edge answered).
        cause: for a fallback, one of FALLBACK_CAUSES; for a withheld image "budget" (the
            controller refused the send) or "busy" (every request slot was taken).
        selected: patches selected. delivered: patches that reached the server (loss).
        selection_min, selection_sum: of the selected scores.
        payload_bytes: the wire-format bytes of the image; request_bytes: the whole HTTP
            request (request line, headers, body); response_bytes: the whole response.
        full_bytes: request bytes of sending the full image instead, per codec name.
        attempts: requests made. edge_ms, transfer_ms, server_ms, total_ms: latencies;
            with --images-per-second, total_ms counts from the image's arrival.
        answered_at: when the answer was final (Unix time, seconds), so that the records of
            several clients line up.
        queue_ms: of server_ms, the time the image waited in the server's queue for a batch
            (None where no server answered, or it did not say).
        replica: which of a replicated server's replicas answered (None where no server
            answered, or it is one process).
    """

    index: int
    label: int
    edge_top: list[int]
    final_top: list[int]
    confident: bool
    route: str
    cause: str | None
    selected: int
    delivered: int
    selection_min: float
    selection_sum: float
    payload_bytes: int
    request_bytes: int
    response_bytes: int
    full_bytes: dict[str, int]
    attempts: int
    edge_ms: float
    transfer_ms: float | None
    server_ms: float | None
    total_ms: float
    answered_at: float = 0.0
    queue_ms: float | None = None
    replica: str | None = None

    @property
    def offloaded(self) -> bool:
        """Sent to the server (whether or not it answered)."""
        return self.route in ("server", "fallback")

    @property
    def answered_at_edge(self) -> bool:
        """Not sent: the gate found it confident, or the budget withheld it."""
        return self.confident or self.route == "withheld"


# How the images are read but not what they are: a records file made with another batch
# size, other loading processes or another --limit is continued.
DATA_NOT_DECIDING = ("batch_size", "num_workers", "limit")


def run_identity(edge_model, server_model: str, data: dict, edge: dict, codec: str, seed: int,
                 loss: float, budget: dict, precision: str = "float32") -> dict:  # fmt: skip
    """What must match for a records file to be continued: what decides each image's answer.

    Args:
        edge_model: the edge's spec (a dict) or the export that runs it.
        server_model: the served model's name.
        data: the data spec (asdict); DATA_NOT_DECIDING is left out, and so is an empty
            clutter, so that records of the published canvases keep their identity.
        edge: the policy and operating point (asdict of EdgeConfig).
        codec: the codec's name as Codec prints it (e.g. 'jpeg:75').
        seed, loss, budget: the random policy's seed, the emulated loss, the budget flags.
        precision: what the torch edge computes in (named only when not float32, so that
            the records of float32 runs keep their identity).
    """
    same_answers = {key: value for key, value in data.items()
                    if key not in DATA_NOT_DECIDING and not (key == "clutter" and not value)}
    parts = dict(edge_model=edge_model, data=same_answers, server_model=server_model,
                 edge=edge, codec=codec, seed=seed, loss=loss, budget=budget,
                 **({"precision": precision} if precision != "float32" else {}))  # fmt: skip
    return json.loads(json.dumps(parts, default=str))


def check_resumable(path: Path, resume: bool) -> None:
    """ClientError (one line) when a run is to be resumed from records that do not exist."""
    if resume and not path.is_file():
        raise ClientError(f"--resume: {path} does not exist yet")


def open_records(path: Path, identity: dict, resume: bool,
                 count: int | None = None) -> dict[int, ImageRecord]:  # fmt: skip
    """Prepare the records file; return the images it already answers (when resuming).

    A resumed file must come from a run with the same identity. A last line cut off by
    an interruption is dropped (that image is done again), and so are records of images
    beyond `count` (the dataset of this run, e.g. a smaller --limit) and fallbacks (images
    that did not reach the server are sent again). Without `resume` an existing file is
    refused rather than emptied.
    """
    done: dict[int, ImageRecord] = {}
    if path.exists() and path.stat().st_size and not resume:
        raise ClientError(f"{path} holds the records of an earlier run: pass --resume to "
                          "continue it, or another --records file")  # fmt: skip
    if resume and path.exists():
        lines = path.read_bytes().split(b"\n")
        try:
            head = json.loads(lines[0])
        except ValueError:
            head = None
        if isinstance(head, dict) and str(head.get("format", "")).startswith(
                RECORDS_FORMAT.split("/")[0]) and head.get("format") != RECORDS_FORMAT:
            raise ClientError(f"{path} was written by an older collabvit ({head['format']}); "
                              "start a new run with another --records file")  # fmt: skip
        if not isinstance(head, dict) or head.get("format") != RECORDS_FORMAT:
            raise ClientError(f"{path} is not a collabvit edge records file")
        if head.get("run") != identity:
            changed = sorted(k for k in set(identity) | set(head.get("run") or {})
                             if identity.get(k) != (head.get("run") or {}).get(k))  # fmt: skip
            raise ClientError(f"{path} is from a run with other settings ({', '.join(changed)}); "
                              "use another --records file or drop --resume")  # fmt: skip
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                record = ImageRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue  # an interrupted write
            # an image that kept the edge's answer because the server was not reached is
            # tried again: resuming after the server is back delivers it
            if record.index not in done and record.route != "fallback" and (
                    count is None or record.index < count):  # fmt: skip
                done[record.index] = record
                kept.append(line)
        temporary = path.with_name(path.name + ".tmp")  # a crash here keeps the old file
        with temporary.open("wb") as handle:
            handle.write(b"\n".join(kept) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it replaces the old file
        temporary.replace(path)
        return done
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": RECORDS_FORMAT, "run": identity}) + "\n")
    return done


class RecordsLock:
    """An exclusive lock on a records file for one run (a `.lock` file beside it, since a
    resumed file is replaced): a second run on the same file stops instead of interleaving
    its lines with the first's."""

    def __init__(self, path: Path) -> None:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.with_name(path.name + ".lock").open("a")
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise ClientError(f"{path} is being written by another run; wait for it or use "
                              "another --records file") from None  # fmt: skip

    def release(self) -> None:
        self.handle.close()  # closing releases the lock


class RecordWriter:
    """Appends one JSON line per answered image, flushed at once and fsynced every
    RECORDS_SYNC_LINES lines and on close, so a crash loses at most those."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("a", buffering=1)
        self.unsynced = 0

    def write(self, record: ImageRecord) -> None:
        self.handle.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self.handle.flush()
        self.unsynced += 1
        if self.unsynced >= RECORDS_SYNC_LINES:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.handle.fileno())
        self.unsynced = 0

    def close(self) -> None:
        self.sync()
        self.handle.close()
