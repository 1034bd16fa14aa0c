"""`collabvit serve --replicas N`: the same Open Inference Protocol application on Ray Serve,
as N replicas behind Ray's proxy, on this machine or across a Ray cluster.

Each replica builds the application `create_app` builds for one process (routes, token,
limits, metrics, dynamic batching, admission) around its own model, and names itself in its
answers (the `replica` response parameter). Ray's proxy spreads the requests over the
replicas, holds at most `max_queued_requests` waiting ones and answers 503 with Retry-After
beyond them; a replica that dies is replaced, and the requests it held fail with a 5xx that
the edge retries. Ray's proxy stands where uvicorn's connection guard stands in one process:
the head time-out and connection cap of guard.py do not apply behind it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, fields

import ray
from ray import serve

from collabvit.config import ModelSpec, ReplicaConfig, ServeConfig
from collabvit.lite.config import TOKEN_ENV
from collabvit.serve.app import create_app
from collabvit.serve.model import load_served_model
from collabvit.serve.settings import (
    ServiceSettings,
    settings_from_config,
    settings_from_json,
    settings_to_json,
)

APPLICATION = "collabvit"  # the Ray Serve application (and deployment) name
# `collabvit serve`'s options for the listening process, which Ray's proxy is behind replicas:
# where it listens (Ray's http_options), and uvicorn's connection guard and workers
PROXY_OPTIONS = ("host", "port", "ssl_certfile", "ssl_keyfile", "workers", "access_log",
                 "max_connections", "timeout_request_head", "timeout_keep_alive")
# seconds a client is asked to wait when a proxy's queue is full: about what a replica needs
# to work off a full batch queue on a small machine
PROXY_RETRY_AFTER = 1


@serve.deployment(name=APPLICATION)
@serve.ingress()
class ServedReplica:
    """One replica: the served model and its application, built when Ray starts it.

    Args:
        served: what every replica serves, as JSON values: `model` (a ModelSpec's fields),
            `device`, `threads`, `precision`, and `settings` (settings_to_json).
    """

    def __init__(self, served: dict) -> None:
        self.served = served

    def __serve_build_asgi_app__(self):
        name = serve.get_replica_context().replica_id.unique_id
        settings = settings_from_json({**self.served["settings"], "replica": name})
        load_server, _ = load_served_model(ModelSpec(**self.served["model"]),
                                           self.served["device"], self.served["threads"],
                                           self.served["precision"],
                                           settings.max_batch)  # fmt: skip
        return create_app(settings, load_server)


def deployment_options(config: ReplicaConfig, device: str = "cpu") -> dict:
    """Ray Serve's options for the deployment `config` asks for: a fixed number of replicas
    or an autoscaled range, the CPUs each reserves (and a GPU each, on a CUDA `device`, so
    that Ray places them where one is free), and the proxy's queue bound."""
    gpus = {"num_gpus": 1} if device.startswith("cuda") else {}
    options = {
        "ray_actor_options": {"num_cpus": config.replica_cpus, **gpus},
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": PROXY_RETRY_AFTER},
    }
    if config.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.replicas, "initial_replicas": config.replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests}  # fmt: skip
    else:
        options["num_replicas"] = config.replicas
    return options


def application(settings: ServiceSettings, model: ModelSpec, device: str, threads: int | None,
                precision: str, config: ReplicaConfig):  # fmt: skip
    """The Ray Serve application of `config`'s replicas, each serving `model` as `settings`
    say, on `device` with `threads` torch threads, in `precision` (or 'auto', decided on
    each replica's own machine)."""
    served = {"model": asdict(model), "device": device, "threads": threads,
              "precision": precision,
              "settings": settings_to_json(settings)}  # fmt: skip
    return ServedReplica.options(**deployment_options(config, device)).bind(served)


def build(args: dict):
    """Ray Serve's application builder, for a `serve deploy` config or a KubeRay RayService
    (`import_path: collabvit.serve.replicas:build`): `args` are `collabvit serve`'s options by
    field name (server_model, server_weights, data_set, max_batch, ..., replicas,
    max_replicas, replica_cpus, threads, ...), the token from $COLLABVIT_TOKEN where `token`
    is not given, and any Host header answered where `allowed_hosts` is not given. There
    Ray's own config places the proxy (host, port, TLS): PROXY_OPTIONS and `ray_address` do
    not apply. ValueError (one line) for an unknown option."""
    serve_names = {f.name for f in fields(ServeConfig)}
    replica_names = {f.name for f in fields(ReplicaConfig)} - {"ray_address"}
    known = (serve_names - set(PROXY_OPTIONS)) | replica_names | {"server_model", "server_weights"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"collabvit's Ray Serve application takes no option {unknown[0]!r} "
                         "(where the proxy listens is Ray's http_options)")  # fmt: skip
    # the Service or ingress in front decides who reaches the proxy: any Host by default
    values = {"allowed_hosts": ("*",), **{name: args[name] for name in serve_names & set(args)}}
    if isinstance(values.get("allowed_hosts"), list):
        values["allowed_hosts"] = tuple(values["allowed_hosts"])
    config = ServeConfig(**{"token": os.environ.get(TOKEN_ENV) or None, **values})
    replicas = ReplicaConfig(**{"replicas": 1, **{name: args[name]
                                                 for name in replica_names & set(args)}})
    model = ModelSpec(name=config.served_model(args.get("server_model")),
                      weights=args.get("server_weights"))  # fmt: skip
    return application(settings_from_config(config, model.name), model, config.device,
                       config.threads, config.asked_precision, replicas)  # fmt: skip


def serve_replicas(settings: ServiceSettings, model: ModelSpec, device: str,
                   threads: int | None, precision: str, config: ReplicaConfig, host: str,
                   port: int, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                   ready: Callable[[], None] | None = None,
                   warn: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Deploy the replicas and serve until SIGINT or SIGTERM, then take them down.

    Without `config.ray_address` a Ray instance of this process's own is started and ended
    with it (never a cluster `ray start` runs here); with one, the application is deployed
    to that cluster and deleted from it at the end (the cluster stays). `ready` is called
    once every replica has started (each answers ready once warm); `warn` hears of a
    cluster with fewer CPUs than the replicas ask for (Ray then waits for more).
    """
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines are Ray's own
    ray.init(address=config.ray_address or "local", include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
    try:
        asked = config.replicas * config.replica_cpus
        held = ray.cluster_resources().get("CPU", 0.0)
        if asked > held and warn is not None:
            warn(f"the replicas ask for {asked:g} CPUs and the cluster has {held:g}: Ray "
                 "waits for more (fewer --replicas, or a smaller --replica-cpus)")
        serve.start(http_options={"host": host, "port": port, "ssl_certfile": ssl_certfile,
                                  "ssl_keyfile": ssl_keyfile},
                    logging_config={"log_level": "WARNING"})  # fmt: skip
        serve.run(application(settings, model, device, threads, precision, config),
                  name=APPLICATION, route_prefix="/")  # fmt: skip
        if ready is not None:
            ready()
        _wait_for_a_stop_signal()
    finally:
        try:
            if config.ray_address is None:
                serve.shutdown()
            else:
                serve.delete(APPLICATION)
        finally:  # whatever Serve says, this process's Ray goes
            ray.shutdown()


def _wait_for_a_stop_signal() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM (a process manager's stop)."""
    stop = threading.Event()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: stop.set())
    stop.wait()
