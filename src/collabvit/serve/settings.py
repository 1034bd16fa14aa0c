"""How the service is set up, apart from its model: `ServiceSettings` (name, batching,
limits, token), drawn from `collabvit serve`'s ServeConfig (`settings_from_config`), the
Host headers it answers (`default_allowed_hosts`), and the settings' JSON form, in which
each `--workers` process receives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collabvit.config import ServeConfig

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServiceSettings:
    """How the service answers (the model comes separately, from a loader)."""

    model_name: str
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_request_bytes: int = 16 * 2**20
    max_request_images: int = 1024
    max_queue_images: int = 4096
    max_queue_bytes: int = 512 * 2**20
    body_timeout: float = 30.0
    decode_threads: int = 2
    parse_processes: int = 1  # for JSON over 64 KiB (guard.ParsePool)
    max_requests_in_flight: int = 256  # probes not counted (guard.RequestLimit)
    allowed_hosts: tuple[str, ...] | None = None  # Host headers answered; None: any
    token: str | None = field(default=None, repr=False)  # never in a log
    replica: str | None = None  # which of several replicas this is; its answers say so


def settings_from_config(config: ServeConfig, model_name: str) -> ServiceSettings:
    """The settings of `collabvit serve` serving `model_name` as `config` says: the Host
    headers answered default to default_allowed_hosts(config.host), and '*' means any."""
    hosts = config.allowed_hosts or default_allowed_hosts(config.host)
    return ServiceSettings(
        model_name=model_name, max_batch=config.max_batch, max_delay_ms=config.max_delay_ms,
        max_request_bytes=config.max_request_bytes,
        max_request_images=config.max_request_images,
        max_queue_images=config.max_queue_images,
        max_queue_bytes=int(config.max_queue_mb * 2**20), body_timeout=config.timeout_body,
        parse_processes=config.parse_processes, max_requests_in_flight=config.limit_concurrency,
        allowed_hosts=None if "*" in hosts else tuple(hosts), token=config.token,
    )  # fmt: skip


def host_header_form(host: str) -> str:
    """A host as a Host header spells it: IPv6 literals in brackets ([::1])."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host headers a server bound to `host` answers by default: that address and the
    loopback names, and, bound to every interface, the machine's names and addresses."""
    import socket

    names = {host, *LOOPBACK_HOSTS}
    if host in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    return tuple(sorted(host_header_form(name) for name in names if name))


def settings_to_json(settings: ServiceSettings) -> dict:
    """The settings as JSON values (settings_from_json reads them back)."""
    values = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    if values["allowed_hosts"] is not None:
        values["allowed_hosts"] = list(values["allowed_hosts"])
    return values


def settings_from_json(values: dict) -> ServiceSettings:
    """The settings settings_to_json wrote."""
    if values.get("allowed_hosts") is not None:
        values = {**values, "allowed_hosts": tuple(values["allowed_hosts"])}
    return ServiceSettings(**values)
