"""What the service counts and how it refuses: its Prometheus metrics, in a registry of the
application's own, and `ServiceError`, the one exception a refusal travels as (its kind is
the label under which `collabvit_errors` counts it; routes.py turns it into an answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ERROR_KINDS = ("bad_request", "unauthorized", "too_large", "not_ready", "not_found",
               "unsupported_media_type", "overloaded", "body_timeout", "disconnected",
               "internal")  # fmt: skip
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceError(Exception):
    """A request the service refuses: an HTTP status, a metrics kind and a one-line reason."""

    def __init__(self, status: int, kind: str, message: str,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


@dataclass
class Metrics:
    """The service's Prometheus metrics, in a registry of its own (no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("collabvit_infer_requests", "Infer requests received",
                                registry=r)  # fmt: skip
        self.images = Counter("collabvit_infer_images", "Images classified", registry=r)
        self.errors = Counter("collabvit_errors", "Refused or failed requests by kind",
                              ["kind"], registry=r)  # fmt: skip
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.bytes_in = Counter("collabvit_request_body_bytes",
                                "Bytes of infer request bodies received", registry=r)  # fmt: skip
        self.batch_size = Histogram("collabvit_batch_images", "Images per dynamic batch",
                                    buckets=_BATCH_BUCKETS, registry=r)  # fmt: skip
        self.queue_time = Histogram("collabvit_queue_seconds",
                                    "Time an image waits for its batch to start",
                                    buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("collabvit_infer_latency_seconds",
                                 "Infer request latency, body read to answer",
                                 buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.dropped = Counter("collabvit_dropped_images",
                               "Images of requests whose client had gone, dropped before "
                               "the model computed them", registry=r)  # fmt: skip
        self.admitted_images = Gauge("collabvit_admitted_images",
                                     "Images admitted and not yet answered (queued or "
                                     "computing)", registry=r)  # fmt: skip
        self.admitted_bytes = Gauge("collabvit_admitted_bytes",
                                    "Decoded pixel bytes of the admitted images", registry=r)
        self.receiving_bytes = Gauge("collabvit_receiving_bytes",
                                     "Bytes of request bodies read and not yet decoded (they "
                                     "count against the same bound)", registry=r)  # fmt: skip
        self.open_connections = Gauge("collabvit_open_connections", "Open connections",
                                      registry=r)  # fmt: skip
        self.closed_connections = Counter("collabvit_closed_connections",
                                          "Connections the server closed by reason",
                                          ["reason"], registry=r)  # fmt: skip
        for reason in ("head_timeout", "evicted", "refused"):
            self.closed_connections.labels(reason)
        self.parsed_in_process = Counter("collabvit_parsed_in_process",
                                         "Request bodies whose JSON was parsed in the parser "
                                         "process (larger than 64 KiB)", registry=r)  # fmt: skip
