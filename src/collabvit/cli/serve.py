"""`collabvit serve`: the server model over HTTP (Open Inference Protocol v2); what it serves
and how it listens are checked here, before the model loads."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

from collabvit.cli.common import UsageError, check_input_file, fail, token, warn
from collabvit.cli.flags import SERVER_FLAGS, add_config_arguments, given_values
from collabvit.config import ModelSpec, ReplicaConfig, ServeConfig

SUMMARY = "serve the server model over HTTP (Open Inference Protocol v2)"
DESCRIPTION = (
    "Serve the server model with the Open Inference Protocol v2 (REST, binary tensor "
    "extension): health, metadata, infer with dynamic batching, Prometheus /metrics; "
    "optional bearer token and HTTPS. Without arguments it serves the shipped "
    "Fashion-MNIST server on 127.0.0.1:8000; with --data-set fmnist-cluttered, the shipped "
    "cluttered one.")  # fmt: skip

# the connection guard of the one-process server (guard.py), which Ray's proxy replaces
GUARD_OPTIONS = ("max_connections", "timeout_request_head", "timeout_keep_alive", "access_log")
# ServeConfig's fields but --data-set, which names the served model
SERVICE_FIELDS = tuple(f.name for f in fields(ServeConfig) if f.name != "data_set")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("served model")
    add_config_arguments(model, ModelSpec, SERVER_FLAGS)
    add_config_arguments(model, ServeConfig, exclude=SERVICE_FIELDS)
    add_config_arguments(parser.add_argument_group("service"), ServeConfig,
                         exclude=("data_set",))  # fmt: skip
    add_config_arguments(parser.add_argument_group("replicas on Ray Serve (pip install "
                                                   "'collabvit[ray]')"), ReplicaConfig)


def run(args: argparse.Namespace) -> int:
    try:
        values = given_values(ServeConfig, args)
        config = ServeConfig(**{**values, "token": token(values.get("token"))})
        given = given_values(ModelSpec, args, SERVER_FLAGS)
        spec = ModelSpec(**{**given, "name": config.served_model(given.get("name"))})
        replicas = ReplicaConfig(**given_values(ReplicaConfig, args))
        if replicas.replicated and config.workers > 1:
            raise UsageError("--workers shares a port between processes on one machine; "
                             "replicas on Ray Serve take --replicas alone")  # fmt: skip
        guarding = [name for name in GUARD_OPTIONS if name in values]
        if replicas.replicated and guarding:
            raise UsageError(f"--{guarding[0].replace('_', '-')} guards the one-process server's "
                             "connections; behind --replicas, Ray's proxy holds them")
        check_input_file(config.ssl_certfile, "certificate")
        check_input_file(config.ssl_keyfile, "key file")
        if config.ssl_certfile:
            _check_certificate(config.ssl_certfile, config.ssl_keyfile)
        if replicas.ray_address is None:  # a cluster's proxy may hold the port already
            _check_port_free(config.host, config.port)
        from collabvit.serve.model import load_served_model

        # a user mistake stops here, before listening
        load_server, precision = load_served_model(spec, config.device, config.threads,
                                                   config.asked_precision, config.max_batch,
                                                   lambda text: warn("serve", text))
    except (UsageError, ValueError, OSError) as error:
        return fail("serve", error)
    from collabvit.lite.config import is_loopback
    from collabvit.serve.app import serve
    from collabvit.serve.settings import settings_from_config

    settings = settings_from_config(config, spec.name)
    hosts = settings.allowed_hosts  # None: any
    scheme = "https" if config.ssl_certfile else "http"
    if config.token and scheme == "http":
        warn("serve", "the token travels in clear text over HTTP: serve HTTPS "
             "(--ssl-certfile, --ssl-keyfile) or put a TLS proxy in front")  # fmt: skip
    if not config.token and not is_loopback(config.host):
        warn("serve", f"listening on {config.host} without a token: anyone who reaches this "
             "port can use the model (--token or $COLLABVIT_TOKEN)")  # fmt: skip
    url = f"{scheme}://{config.host}:{config.port}/v2/models/{spec.name}"
    if replicas.replicated and config.asked_precision == "auto":
        precision = "precision auto (each replica's)"  # decided on each replica's machine
    shown = (f"{precision}, auth {'on' if config.token else 'off'}, max batch "
             f"{config.max_batch}, max "
             f"delay {config.max_delay_ms} ms, hosts "
             f"{'any' if settings.allowed_hosts is None else ' '.join(hosts)}")  # fmt: skip
    if replicas.replicated:
        del load_server  # it only checked the model here: each replica loads its own
        return _replicated(settings, spec, config, replicas, url, shown)
    print(f"collabvit serve: {spec.name} at {url} ({shown})", file=sys.stderr, flush=True)
    worker = {"model": asdict(spec), "device": config.device, "threads": config.threads,
              "precision": precision}  # what each of --workers processes loads itself
    serve(settings, load_server, config.host, config.port, config.ssl_certfile,
          config.ssl_keyfile, config.access_log, max_connections=config.max_connections,
          timeout_keep_alive=config.timeout_keep_alive,
          timeout_request_head=config.timeout_request_head, workers=config.workers,
          worker=worker)  # fmt: skip
    return 0


def _replicated(settings, spec: ModelSpec, config: ServeConfig, replicas: ReplicaConfig,
                url: str, shown: str) -> int:  # fmt: skip
    """Serve from replicas on Ray Serve until stopped; Ray's failures in one line."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    from collabvit.serve.replicas import serve_replicas

    count = (f"{replicas.replicas} to {replicas.max_replicas}" if replicas.max_replicas
             else str(replicas.replicas))  # fmt: skip
    # a replica or proxy on another machine opens these files there, by the same path
    absolute = {name: str(Path(value).resolve()) if value else None for name, value in
                (("weights", spec.weights), ("certfile", config.ssl_certfile),
                 ("keyfile", config.ssl_keyfile))}  # fmt: skip
    try:
        serve_replicas(settings, replace(spec, weights=absolute["weights"]), config.device,
                       config.threads, config.asked_precision, replicas, config.host,
                       config.port, absolute["certfile"], absolute["keyfile"],
                       ready=lambda: print(f"collabvit serve: {spec.name} at {url} ({count} "
                                           f"replicas on Ray Serve, {shown})", file=sys.stderr,
                                           flush=True),
                       warn=lambda text: warn("serve", text))  # fmt: skip
    except KeyboardInterrupt:
        print("collabvit serve: interrupted before the replicas were ready", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError, RayError, RayServeException) as error:
        return fail("serve", str(error).strip().splitlines()[0] if str(error).strip()
                    else type(error).__name__)  # fmt: skip
    return 0


def _check_certificate(certfile: str, keyfile: str | None) -> None:
    """The certificate and its key, loaded once: ssl.SSLError is an OSError, and OpenSSL's
    "PEM lib" says nothing to a user, so it becomes one line before the model loads."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as error:
        detail = f" ({error.reason})" if error.reason and "PEM" not in error.reason else ""
        raise UsageError(f"cannot use {certfile} with the key {keyfile}{detail}: give the "
                         "certificate to --ssl-certfile and its private key to --ssl-keyfile, "
                         "both PEM") from None  # fmt: skip


def _check_port_free(host: str, port: int) -> None:
    """A clear error for a port in use, before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UsageError(f"cannot listen on {host}: {error.strerror}") from error
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}") from error
