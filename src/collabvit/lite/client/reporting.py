"""A run's figures from its records: the paper's summary (the same RunningSummary as
`collabvit eval`), bytes per image, fallbacks by cause and latency percentiles, and the
lines `collabvit edge` prints of them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from collabvit.lite.client.records import FALLBACK_CAUSES, ImageRecord
from collabvit.lite.protocol import Codec
from collabvit.lite.summary import RunningSummary, Summary


@dataclass
class EdgeReport:
    """A run's figures: the paper's summary, bytes, fallbacks and latencies."""

    summary: Summary
    records: list[ImageRecord]
    fallbacks: dict[str, int]
    bytes: dict[str, dict[str, float]]
    latency_ms: dict[str, dict[str, float]]
    codec: str
    attempted: Summary  # as if every image the gate sent had reached the server
    withheld: int = 0  # images the gate would send that the budget answered at the edge
    seconds: float = 0.0  # from the first answer to the last

    def as_dict(self) -> dict:
        return {"summary": self.summary.as_dict(), "codec": self.codec,
                "fallbacks": self.fallbacks, "bytes_per_image": self.bytes,
                "latency_ms": self.latency_ms,
                "attempted": {"sent_images": self.attempted.sent_images,
                              "sent_tokens": self.attempted.sent_tokens,
                              "comm_cost": self.attempted.comm_cost},
                "withheld": self.withheld, "seconds": self.seconds,
                "wire_bytes_per_second": self.wire_bytes_per_second,
                "replicas": self.replicas}  # fmt: skip

    @property
    def replicas(self) -> dict[str, int]:
        """The images each replica of a replicated server answered, most first (empty for
        a server of one process)."""
        answered = Counter(r.replica for r in self.records if r.replica is not None)
        return dict(answered.most_common())

    @property
    def wire_bytes_per_second(self) -> float:
        """Requests and responses on the wire per second of the run (0 for an instant)."""
        total = self.bytes["collaborative"]
        wire = total["total_request_bytes"] + total["total_response_bytes"]
        return wire / self.seconds if self.seconds > 0 else 0.0

    @property
    def none_delivered(self) -> bool:
        """The gate sent images, and not one of them reached the server."""
        return self.attempted.sent_images > 0 and self.summary.sent_images == 0


def summarize(records: Iterable[ImageRecord], num_patches: int,
              delivered_only: bool = True) -> Summary:  # fmt: skip
    """The paper's figures of answered images, through the same RunningSummary as eval:
    sends that never reached the server count as undelivered (or, with `delivered_only`
    False, as sent: what the run attempted)."""
    records = list(records)
    running = RunningSummary(num_patches=num_patches)
    if records:
        running.update_ranked(
            np.array([r.label for r in records]),
            np.array([r.edge_top for r in records]),
            np.array([r.final_top for r in records]),
            np.array([r.answered_at_edge for r in records]),
            np.array([r.selected for r in records]),
            np.array([r.selection_min for r in records], dtype=np.float32),
            np.array([r.selection_sum for r in records], dtype=np.float32),
            delivered=np.array([r.route != "fallback" or not delivered_only
                                for r in records]),
        )
    return running.summary()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean of `values` in their unit (empty when there are none)."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(array.mean())}


def report(records: list[ImageRecord], num_patches: int, codec: Codec) -> EdgeReport:
    """Summary, fallbacks by cause, bytes per image and latency percentiles of a run."""
    sent = [r for r in records if r.offloaded]
    delivered = [r for r in sent if r.route == "server"]  # "per sent image": those that arrived
    count = max(len(records), 1)
    full_names = list(dict.fromkeys(name for r in records for name in r.full_bytes))
    bytes_table = {
        "collaborative": {"all_images": sum(r.request_bytes for r in records) / count,
                          "sent_images": (sum(r.request_bytes for r in delivered)
                                          / len(delivered) if delivered else 0.0),
                          "payload_all_images": sum(r.payload_bytes for r in records) / count,
                          "response_all_images": sum(r.response_bytes for r in records) / count,
                          "total_request_bytes": sum(r.request_bytes for r in records),
                          "total_response_bytes": sum(r.response_bytes for r in records)},
        **{f"full_{name}": {"all_images": sum(r.full_bytes[name] for r in records) / count}
           for name in full_names},
    }  # fmt: skip
    causes = Counter(r.cause for r in records if r.route == "fallback")
    latency = {
        "edge": percentiles([r.edge_ms for r in records]),
        "transfer": percentiles([r.transfer_ms for r in sent if r.transfer_ms is not None]),
        "server": percentiles([r.server_ms for r in sent if r.server_ms is not None]),
        "queue": percentiles([r.queue_ms for r in sent if r.queue_ms is not None]),
        "end_to_end_sent": percentiles([r.total_ms for r in sent]),
        "end_to_end_all": percentiles([r.total_ms for r in records]),
    }
    times = [r.answered_at for r in records]
    return EdgeReport(summarize(records, num_patches), records,
                      {cause: causes.get(cause, 0) for cause in FALLBACK_CAUSES}, bytes_table,
                      latency, str(codec), summarize(records, num_patches, False),
                      withheld=sum(r.route == "withheld" for r in records),
                      seconds=max(times) - min(times) if times else 0.0)  # fmt: skip


def fallback_text(report: EdgeReport) -> str:
    """The fallbacks by cause, e.g. 'refused 300, timeout 20' ('' when there were none)."""
    return ", ".join(f"{cause} {n}" for cause, n in report.fallbacks.items() if n)


def format_report(report: EdgeReport) -> str:
    """Bytes per image, fallbacks and latency percentiles, for people."""
    b = report.bytes
    collab = b["collaborative"]
    lines = [
        f"Bytes per image (HTTP request incl. headers, codec {report.codec}): "
        f"{collab['all_images']:.1f} over all images, {collab['sent_images']:.1f} per sent "
        f"image (wire payload {collab['payload_all_images']:.1f} over all images); in total "
        f"{collab['total_request_bytes']:,} bytes sent, {collab['total_response_bytes']:,} "
        "received",
        "Sending every full image instead: " + " / ".join(
            f"{name[5:]} {values['all_images']:.1f}" for name, values in b.items()
            if name.startswith("full_")),
    ]  # fmt: skip
    lines.append("Fallbacks to the edge's answer: " + (fallback_text(report) or "none"))
    if report.replicas:
        lines.append(f"Answered by {len(report.replicas)} replicas: " + ", ".join(
            f"{name} {count}" for name, count in report.replicas.items()))
    if report.summary.undelivered_images:
        attempted = report.attempted
        lines.append(f"Not delivered: {report.summary.undelivered_images} of "
                     f"{attempted.sent_images} sent images kept the edge's answer; the figures "
                     f"above count delivered images (attempted: communication cost "
                     f"{attempted.comm_cost:.4f}, sent token number "
                     f"{attempted.sent_tokens:.4f})")  # fmt: skip
    names = {"edge": "edge compute", "transfer": "transfer", "server": "server",
             "queue": "server queue", "end_to_end_sent": "end to end (sent)",
             "end_to_end_all": "end to end (all)"}
    lines.append(f"Latency (ms)        {'p50':>9}{'p90':>9}{'p99':>9}")
    for key, label in names.items():
        values = report.latency_ms.get(key)
        if values:
            lines.append(f"  {label:<18}" + "".join(f"{values[p]:>9.2f}"
                                                    for p in ("p50", "p90", "p99")))
    return "\n".join(lines)
