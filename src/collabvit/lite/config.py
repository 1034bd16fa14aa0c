"""The configs of the edge command: the server it talks to, the budget it keeps, the
emulated link and the runtime of its decision. Torch-free, like everything in collabvit.lite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collabvit.lite.specs import finite, flag, require


def _valid_port(url: str) -> bool:
    """A URL whose host is given and whose port, if any, is in 1..65535."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return bool(parts.hostname) and (port is None or 1 <= port <= 65535)


def _host(url: str) -> str:
    """The host of a URL as urlsplit gives it (IPv6 without brackets), '' when there is none."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def is_loopback(host: str) -> bool:
    """An address or name of this machine's loopback interface (127.0.0.0/8, ::1,
    localhost): what travels to it never leaves the machine."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"



TOKEN_ENV = "COLLABVIT_TOKEN"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ClientConfig:
    """How `collabvit edge` reaches the server and what it writes."""

    server: str = field(default=DEFAULT_SERVER_URL, metadata=flag(
        "the collabvit server's base URL (default: %(default)s)", metavar="URL"))
    codec: str = field(default="raw", metadata=flag(
        "how patch pixels travel: raw, png (both lossless) or jpeg[:QUALITY] (lossy, quality "
        "1..95, default 75) (default: %(default)s)", metavar="CODEC"))
    concurrency: int = field(default=8, metadata=flag(
        "requests in flight at most (default: %(default)s)", type="positive_int", metavar="N"))
    timeout: float = field(default=10.0, metadata=flag(
        "seconds one request may take (default: %(default)s)", type="positive", metavar="S"))
    retries: int = field(default=2, metadata=flag(
        "retries of a request that failed for a reason that may pass (unreachable, timeout, "
        "5xx) (default: %(default)s)", type="non_negative_int", metavar="N"))
    backoff: float = field(default=0.2, metadata=flag(
        "seconds before the first retry, doubling for each next one (default: %(default)s)",
        type="non_negative", metavar="S"))
    cooldown: float = field(default=5.0, metadata=flag(
        "after an image exhausted its retries on an unreachable or slow server, later images "
        "answer at the edge without trying for this many seconds (default: %(default)s)",
        type="non_negative", metavar="S"))
    token: str | None = field(default=None, repr=False, metadata=flag(
        f"bearer token for the server (default: ${TOKEN_ENV} when set)", metavar="TOKEN"))
    ca_file: str | None = field(default=None, metadata=flag(
        "trust this CA certificate (PEM) for an https:// server with a private certificate",
        metavar="FILE"))
    wait: float = field(default=0.0, metadata=flag(
        "wait up to this many seconds for the server to be ready before starting "
        "(default: %(default)s)", type="non_negative", metavar="S"))
    records: str = field(default="runs/edge/records.jsonl", metadata=flag(
        "per-image results, one JSON line each, written as answers arrive "
        "(default: %(default)s)", metavar="FILE"))
    resume: bool = field(default=False, metadata=flag(
        "continue the run in --records: images already answered there are not repeated"))
    results_file: str | None = field(default=None, metadata=flag(
        "write every figure, bytes and latencies and the resolved configuration as JSON",
        metavar="FILE"))
    images_per_second: float | None = field(default=None, metadata=flag(
        "take the images at this pace, as a camera delivers them (default: as fast as the "
        "edge classifies them)", type="positive", metavar="N"))
    allow_edge_only: bool = field(default=False, metadata=flag(
        "run even when the server cannot be reached at the start or no image reaches it "
        "(every uncertain image then keeps the edge's answer); without it such a run stops "
        "or exits with status 1"))

    def __post_init__(self) -> None:
        require([
            (self.server.startswith(("http://", "https://")),
             f"the server URL must start with http:// or https://, got {self.server!r}"),
            (_valid_port(self.server), f"the server URL {self.server!r} has no valid host "
             "and port"),
            (self.concurrency >= 1, "concurrency must be >= 1"),
            (finite(self.timeout) and self.timeout > 0, "timeout must be > 0 seconds"),
            (self.retries >= 0, "retries must be >= 0"),
            (finite(self.backoff) and self.backoff >= 0, "backoff must be >= 0 seconds"),
            (finite(self.cooldown) and self.cooldown >= 0, "cooldown must be >= 0 seconds"),
            (finite(self.wait) and self.wait >= 0, "wait must be >= 0 seconds"),
            (self.images_per_second is None or (finite(self.images_per_second)
                                                and self.images_per_second > 0),
             "images per second must be > 0"),
            (self.token is None or self.token.strip() != "", "the token must not be empty"),
        ])  # fmt: skip

    @property
    def token_in_clear(self) -> bool:
        """A token that would travel unencrypted to another machine (http://, not loopback)."""
        return bool(self.token) and self.server.startswith("http://") and not is_loopback(
            _host(self.server))  # fmt: skip



@dataclass(frozen=True)
class BudgetConfig:
    """An operating point held online by `collabvit edge`: a budget and the frontier it
    moves along (controller.py)."""

    budget_bps: float | None = field(default=None, metadata=flag(
        "hold this many bytes per second on the wire (requests and responses, HTTP and codec "
        "included), choosing the frontier's point and eta online; uncertain images beyond it "
        "are answered at the edge", type="positive", metavar="B"))
    budget_cost: float | None = field(default=None, metadata=flag(
        "hold this communication cost (the paper's measure, 0..1), choosing the frontier's "
        "point and eta online", type="cost", metavar="C"))
    frontier: str | None = field(default=None, metadata=flag(
        "the frontier a budget moves along: frontier.json of `collabvit sweep` for this pair "
        "(default: the one shipped with the edge model or carried by the export)",
        metavar="FILE"))
    latency_target: float = field(default=0.2, metadata=flag(
        "with a budget: seconds a send's time on the wire may rise above its least before "
        "the link counts as congested and the client sends less (default: %(default)s)",
        type="positive", metavar="S"))

    def __post_init__(self) -> None:
        require([
            (self.budget_bps is None or self.budget_cost is None,
             "give one budget: --budget-bps or --budget-cost"),
            (self.budget_bps is None or (finite(self.budget_bps) and self.budget_bps > 0),
             "the bytes/s budget must be > 0"),
            (self.budget_cost is None or (finite(self.budget_cost)
                                          and 0 <= self.budget_cost <= 1),
             "the cost budget must lie in [0, 1]"),
            (finite(self.latency_target) and self.latency_target > 0,
             "the latency target must be > 0 seconds"),
        ])  # fmt: skip

    @property
    def held(self) -> bool:
        return self.budget_bps is not None or self.budget_cost is not None


@dataclass(frozen=True)
class LinkConfig:
    """An emulated link between edge and server, for what-if studies."""

    bandwidth: float | None = field(default=None, metadata=flag(
        "emulate a link of this many bit/s: each request waits its bytes' transmission time",
        type="positive", metavar="BIT/S"))
    rtt: float = field(default=0.0, metadata=flag(
        "emulated round-trip time in milliseconds added to each request (default: %(default)s)",
        type="non_negative", metavar="MS"))
    loss: float = field(default=0.0, metadata=flag(
        "probability that a patch is lost on the way: the server classifies without it "
        "(drawn per image from --seed) (default: %(default)s)", type="probability",
        metavar="P"))

    def __post_init__(self) -> None:
        require([
            (self.bandwidth is None or (finite(self.bandwidth) and self.bandwidth > 0),
             "bandwidth must be > 0 bit/s"),
            (finite(self.rtt) and self.rtt >= 0, "rtt must be >= 0 ms"),
            (finite(self.loss) and 0.0 <= self.loss < 1.0, "loss must lie in [0, 1)"),
        ])  # fmt: skip

    @property
    def emulated(self) -> bool:
        return self.bandwidth is not None or self.rtt > 0 or self.loss > 0


@dataclass(frozen=True)
class EdgeRuntime:
    """Which runtime computes the edge's decision in `collabvit edge`."""

    onnx: str | None = field(default=None, metadata=flag(
        "run the edge exported by `collabvit export` in DIR with ONNX Runtime, without torch "
        "(the edge model flags do not apply; the export fixes the policy, attention mode and "
        "measure, while --masking-th and --uncer-th still move the operating point)",
        metavar="DIR"))
    threads: int | None = field(default=None, metadata=flag(
        "ONNX Runtime threads (default: its own choice)", type="positive_int", metavar="N"))
    int8: bool = field(default=False, metadata=flag(
        "run the export's int8 graph (written by `collabvit export --int8`)"))
