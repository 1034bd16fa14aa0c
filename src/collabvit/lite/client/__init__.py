"""`collabvit edge`: the edge half of a deployment, talking to `collabvit serve` over HTTP.

The edge model classifies each batch; confident images keep its answer, the
others send their selected patches (wire format of protocol.py) to the server,
at most `concurrency` requests at a time. A request that fails for a reason
that may pass (unreachable, timeout, 5xx) is retried with doubling back-off;
when it still fails, or the server refuses it, the image keeps the edge's
answer and the cause is counted: every image gets exactly one answer.

Each answer is appended to a JSON Lines file as soon as it is known, so an
interrupted run resumes without repeating or losing an image. The summary is
computed from that file, with the same RunningSummary as `collabvit eval`.

The modules, each holding one part: `run` the run loop (run_edge), `link` the connection
to a served model and the checks before a run, `wire` the bytes on the wire, `errors` what
stops a run, `records` the records file, `reporting` a run's figures, `emulation` the
emulated link. The names below are the package's public face.
"""

from collabvit.lite.client.emulation import LOSS_STREAM, link_delay, lose_patches, transmission_time
from collabvit.lite.client.errors import ClientError, ServerUnavailable
from collabvit.lite.client.link import (
    ServerAnswer,
    ServerLink,
    backoff_seconds,
    check_server,
    check_server_geometry,
    reach_server,
    retry_after,
    served_geometry,
    served_precision,
    tls_verification,
    wait_until_served,
)
from collabvit.lite.client.records import (
    FALLBACK_CAUSES,
    RECORDS_FORMAT,
    RECORDS_SYNC_LINES,
    ImageRecord,
    RecordsLock,
    RecordWriter,
    check_resumable,
    open_records,
    run_identity,
)
from collabvit.lite.client.reporting import (
    EdgeReport,
    fallback_text,
    format_report,
    percentiles,
    report,
    summarize,
)
from collabvit.lite.client.run import EdgeRunner, run_edge
from collabvit.lite.client.wire import (
    ANSWER_CAP,
    ANSWER_CAP_PER_CLASS,
    METADATA_CAP,
    answer_cap,
    infer_request,
    offload_bytes,
    request_wire_bytes,
    response_wire_bytes,
)

__all__ = [
    "ANSWER_CAP", "ANSWER_CAP_PER_CLASS", "FALLBACK_CAUSES", "LOSS_STREAM", "METADATA_CAP",
    "RECORDS_FORMAT", "RECORDS_SYNC_LINES", "ClientError", "EdgeReport", "EdgeRunner",
    "ImageRecord", "RecordWriter", "RecordsLock", "ServerAnswer", "ServerLink",
    "ServerUnavailable", "answer_cap", "backoff_seconds", "check_resumable", "check_server",
    "check_server_geometry", "fallback_text", "format_report", "infer_request", "link_delay",
    "lose_patches", "offload_bytes", "open_records", "percentiles", "reach_server", "report",
    "request_wire_bytes", "response_wire_bytes", "retry_after", "run_edge", "run_identity",
    "served_geometry", "served_precision", "summarize", "tls_verification", "transmission_time",
    "wait_until_served",
]  # fmt: skip
