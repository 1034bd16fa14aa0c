"""`collabvit serve`: the application assembled, and served by uvicorn.

`create_app` joins the parts: the model state (model.py), loaded in a thread after start-up,
the data plane (dataplane.py) with its batcher and admission bound (batching.py), the
routes over it (routes.py), and the middleware that guards them (guard.py). `serve` runs it
in this process or, with `--workers N`, in N processes that each build theirs from the
environment (`worker_app`).

Concurrent infer requests are batched dynamically: a batch collects payloads until it
holds `max_batch` images or `max_delay_ms` has passed since its first one, then
`Server.classify` (the same object the in-process evaluation uses) runs it in one worker
thread. The model loads and warms up after the server starts listening, so
/v2/health/ready answers 503 until it can classify.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from collabvit import __version__
from collabvit.config import ModelSpec
from collabvit.models.server import Server
from collabvit.serve.batching import Admission
from collabvit.serve.dataplane import DataPlane
from collabvit.serve.guard import (
    METRICS_STATE,
    CloseUnreadBodies,
    GuardedProtocol,
    RequestLimit,
    guarded_protocol,
)
from collabvit.serve.metrics import Metrics
from collabvit.serve.model import ModelState, load_served_model
from collabvit.serve.routes import Endpoints
from collabvit.serve.settings import (
    ServiceSettings,
    host_header_form,
    settings_from_json,
    settings_to_json,
)

log = logging.getLogger("collabvit.serve")

WORKER_ENV = "COLLABVIT_SERVE_WORKER"  # what each --workers process serves, as JSON


def create_app(settings: ServiceSettings, load_server: Callable[[], Server]) -> FastAPI:
    """The Open Inference Protocol v2 application serving one model.

    Args:
        settings: name, batching, limits and the optional bearer token.
        load_server: builds the Server (model on its device); called in a thread after
            start-up, so health checks answer while it loads; the service warms it up.
    """
    metrics = Metrics()
    state = ModelState()
    admission = Admission(settings.max_queue_images, settings.max_queue_bytes, metrics)
    plane = DataPlane(settings, state, metrics, admission)
    app = FastAPI(title="collabvit", version=__version__,
                  lifespan=_lifespan(plane, load_server), docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.metrics = metrics
    app.state.model = state
    app.state.admission = admission
    _add_middleware(app, settings, metrics)
    Endpoints(plane, settings.token).register(app)
    return app


def _lifespan(plane: DataPlane, load_server: Callable[[], Server]):
    """The application's lifespan: the model loads in a thread while the data plane runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=plane.state.load, args=(load_server,), daemon=True,
                                  name="collabvit-load")  # fmt: skip
        loader.start()
        plane.start()
        app.state.batcher, app.state.decoder, app.state.parser = (plane.batcher, plane.decoder,
                                                                  plane.parser)  # fmt: skip
        # the lifespan state reaches uvicorn's protocol (GuardedProtocol counts connections)
        yield {METRICS_STATE: plane.metrics}
        # uvicorn has drained the in-flight requests before it gets here
        await plane.stop()

    return lifespan


def _add_middleware(app: FastAPI, settings: ServiceSettings, metrics: Metrics) -> None:
    """The request limit, the Host check and the closing of unread bodies, outermost last."""
    app.add_middleware(RequestLimit, limit=settings.max_requests_in_flight,
                       refused=metrics.errors.labels("overloaded").inc)  # fmt: skip
    if settings.allowed_hosts is not None:  # DNS rebinding: answer only the names we serve
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=[
            host_header_form(host) for host in settings.allowed_hosts])
    app.add_middleware(CloseUnreadBodies)  # the outermost: it sees every early answer


def serve(settings: ServiceSettings, load_server: Callable[[], Server], host: str = "127.0.0.1",
          port: int = 8000, ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          access_log: bool = False, graceful_timeout: float = 30.0, max_connections: int = 1024,
          timeout_keep_alive: float = 5.0, timeout_request_head: float = 10.0, workers: int = 1,
          worker: dict | None = None) -> None:  # fmt: skip
    """Serve until SIGINT/SIGTERM; in-flight requests finish before the process exits.

    With `workers` > 1, uvicorn starts that many processes, each loading the model itself
    from `worker` (the model spec, device, threads and precision: worker_app reads them),
    with the same settings; `load_server` is then not used. The requests in progress are
    bounded by the application (settings.max_requests_in_flight, probes exempt), the
    connections by the protocol (GuardedProtocol), never by uvicorn's limit_concurrency,
    which counts idle connections and refuses health checks with them.
    """
    import uvicorn

    max_connections = allow_open_files(max_connections)
    freeze_what_lives_long()
    options = dict(host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                   access_log=access_log, log_level="info",
                   timeout_graceful_shutdown=graceful_timeout, server_header=False,
                   timeout_keep_alive=timeout_keep_alive,
                   # asyncio's loop whatever else is installed (uvloop comes with Ray): the
                   # connection guard and its measurements were made on it
                   loop="asyncio")  # fmt: skip
    if workers > 1:
        os.environ[WORKER_ENV] = json.dumps({**(worker or {}), "head_timeout":
                                             timeout_request_head, "max_connections":
                                             max_connections,
                                             "settings": settings_to_json(settings)})
        uvicorn.run("collabvit.serve.app:worker_app", factory=True, workers=workers,
                    http="collabvit.serve.guard:GuardedProtocol", **options)  # fmt: skip
        return
    config = uvicorn.Config(create_app(settings, load_server),
                            http=guarded_protocol(timeout_request_head, max_connections),
                            **options)  # fmt: skip
    uvicorn.Server(config).run()


def freeze_what_lives_long() -> None:
    """Exempt every object alive now (torch, timm, the model, the application) from the
    cyclic garbage collector's passes, for the life of this server process.

    Each connection leaves a little cyclic garbage, and the collector's full passes walk
    every object of the process: with torch loaded, a pass stalls the event loop for a
    tenth of a second or more, which a flood of connections triggers again and again.
    Frozen objects are not walked (the same use as CPython's documentation gives for
    gc.freeze: objects made before a server starts serving).
    """
    import gc

    gc.collect()
    gc.freeze()


def allow_open_files(max_connections: int, spare: int = 64) -> int:
    """Raise this process's open-file limit to fit `max_connections` sockets and `spare`
    other files, as far as the hard limit allows; the connections that then fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
        if soft < wanted:
            log.warning("the open-file limit (%d) fits %d connections, not %d", soft,
                        max(soft - spare, 1), max_connections)  # fmt: skip
            return max(soft - spare, 1)
    return max_connections


def worker_app() -> FastAPI:
    """The application of one `collabvit serve --workers N` process: what it serves comes
    from the environment (WORKER_ENV), and it loads the model itself."""
    spec = json.loads(os.environ[WORKER_ENV])
    settings = settings_from_json(spec["settings"])
    GuardedProtocol.head_timeout = spec["head_timeout"]
    GuardedProtocol.max_connections = spec["max_connections"]
    freeze_what_lives_long()  # this process's torch and timm (its model loads later)

    def load_server() -> Server:
        # no warning: the parent process loaded the same model first, and gave them
        load, _ = load_served_model(ModelSpec(**spec["model"]), spec.get("device", "cpu"),
                                    spec.get("threads"), spec.get("precision", "float32"),
                                    settings.max_batch)  # fmt: skip
        return load()

    return create_app(settings, load_server)
