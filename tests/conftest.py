"""Shared fixtures: the golden reference outputs and tiny ViTs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from collabvit.models import vit

REPO = Path(__file__).resolve().parents[1]
# The reference's outputs on a tiny ViT pair (tests/golden/README.md); COLLABVIT_GOLDEN
# points the tests at another copy.
GOLDEN_DIR = Path(os.environ.get("COLLABVIT_GOLDEN") or REPO / "tests" / "golden")
GOLDEN_FILES = (
    "expected.json",
    "inputs.safetensors",
    "tiny_edge.safetensors",
    "tiny_server.safetensors",
)


class Golden:
    """The paper's reference outputs on a tiny ViT pair (see tests/golden/README.md)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.expected = json.loads((root / "expected.json").read_text())
        inputs = load_file(str(root / "inputs.safetensors"))
        self.images, self.targets = inputs["images"], inputs["targets"]
        self.edge_weights = root / "tiny_edge.safetensors"
        self.server_weights = root / "tiny_server.safetensors"

    def edge_model(self):
        return vit.create_vit(
            "vit_tiny_patch16_224", self.edge_weights, self.expected["edge_config"]
        )

    def server_model(self):
        return vit.create_vit(
            "vit_tiny_patch16_224", self.server_weights, self.expected["server_config"], server=True
        )

    def cli_model_args(self) -> list[str]:
        """The `collabvit eval` flags that load the golden pair and inputs."""
        return [
            "--data-set", "tensors", "--data-path", str(self.root / "inputs.safetensors"),
            "--inputs-normalized", "--batch-size", "8",
            "--model", "vit_tiny_patch16_224", "--model-weights", str(self.edge_weights),
            "--model-kwargs", json.dumps(self.expected["edge_config"]),
            "--server-model", "vit_tiny_patch16_224", "--server-weights", str(self.server_weights),
            "--server-kwargs", json.dumps(self.expected["server_config"]),
        ]  # fmt: skip


@pytest.fixture(scope="session")
def golden() -> Golden:
    """The golden reference outputs; a missing folder or file is an error, never a skip."""
    missing = [name for name in GOLDEN_FILES if not (GOLDEN_DIR / name).is_file()]
    if missing:
        pytest.fail(
            f"golden reference outputs missing in {GOLDEN_DIR}: {', '.join(missing)} "
            "(they ship in tests/golden; COLLABVIT_GOLDEN overrides the folder)",
            pytrace=False,
        )
    return Golden(GOLDEN_DIR)


@pytest.fixture
def run_cli(capsys):
    """`collabvit ARGS` in this process: (status, stdout, stderr), argparse exits included."""
    from collabvit.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            status = main(list(args))
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 2
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, captured.out, captured.err)

    return run


def tiny_vit(**overrides) -> torch.nn.Module:
    """A random tiny timm ViT (pretrained=False) in eval mode; overrides go to timm."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    kwargs.update(overrides)
    name = kwargs.pop("name", "vit_tiny_patch16_224")
    torch.manual_seed(0)
    return vit.create_vit(name, model_kwargs=kwargs, pretrained=False)


class LiveServer:
    """A uvicorn server in a background thread on a free port of 127.0.0.1."""

    def __init__(self, app, **uvicorn_options) -> None:
        import threading

        import uvicorn

        # as `collabvit serve`: no server header (the bytes tests count every header)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                **{"server_header": False, **uvicorn_options})  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class OneConnection:
    """A socket on 127.0.0.1 that takes one connection, reads its request and hands the
    connection to `speak(connection, stop)` in a thread; `stop` is set on leaving, and a
    connection the client closed ends it quietly."""

    def __init__(self, speak) -> None:
        import socket
        import threading

        self.speak, self.stop = speak, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
            with connection:
                connection.recv(65536)
                self.speak(connection, self.stop)
        except OSError:
            pass

    def __enter__(self) -> OneConnection:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.listener.close()


SHIPPED_SERVER = "collabvit_fmnist_server"


@pytest.fixture(scope="session")
def shipped_server():
    """The shipped Fashion-MNIST server model in a Server."""
    from collabvit.config import ModelSpec
    from collabvit.models.pair import load_model
    from collabvit.models.server import Server

    return Server(load_model(ModelSpec(name=SHIPPED_SERVER), server=True))


def shipped_app(server, **options):
    """The service app for the shipped server (options: ServiceSettings fields)."""
    from collabvit.serve.app import create_app
    from collabvit.serve.settings import ServiceSettings

    return create_app(ServiceSettings(model_name=SHIPPED_SERVER, **options), lambda: server)


def wait_ready(url: str, timeout: float = 60.0, **client_options) -> None:
    """Poll /v2/health/ready until it answers 200."""
    from collabvit.lite.client import wait_until_served

    wait_until_served(url, timeout, **client_options)


# what the tests' servers compute in: float32, so that answers over HTTP equal eval's on any
# CPU (`--precision auto` would pick bfloat16 on one with native bfloat16)
EXACT = ("--precision", "float32")


class ServeProcess:
    """`collabvit serve` with the shipped Fashion-MNIST server (and `flags`), as its own
    process on a free port of 127.0.0.1 (`url`, `port`), in float32 unless `flags` say
    otherwise; its output goes to `log`."""

    def __init__(self, log: Path, *flags: str) -> None:
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with log.open("w") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "collabvit", "serve", "--port", str(self.port), *EXACT,
                 *flags],
                stdout=output, stderr=subprocess.STDOUT)  # fmt: skip

    def wait_ready(self) -> bool:
        """Poll its readiness; False when the process stopped first (e.g. the free port was
        taken between choosing and binding it)."""
        from collabvit.lite.client import ClientError

        try:
            wait_ready(self.url, 120, alive=lambda: self.process.poll() is None)
        except ClientError:
            if self.process.poll() is None:
                raise
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


SERVE = pytest.StashKey[ServeProcess]()


def start_serve() -> ServeProcess:
    return ServeProcess(Path(tempfile.mkdtemp(prefix="collabvit-serve-")) / "serve.log")


def pytest_collection_finish(session) -> None:
    """Start `collabvit serve` as soon as the run knows a test needs it: its start-up
    (torch, the model, the warm-up) overlaps the tests that come before."""
    if session.config.option.collectonly:
        return
    if any("shipped_live" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[SERVE] = start_serve()


def pytest_sessionfinish(session) -> None:
    running = session.config.stash.get(SERVE, None)
    if running is not None:
        running.stop()
        shutil.rmtree(running.log.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def shipped_live(request):
    """The real `collabvit serve` process of the shipped Fashion-MNIST server, one for the
    whole session (a process of its own: the edge under test does not share its
    interpreter with the server, as on two machines)."""
    running = request.config.stash.get(SERVE, None)
    for _ in range(3):
        if running is None:
            running = request.config.stash[SERVE] = start_serve()
        if running.wait_ready():
            return running
        failed, running = running, None
    pytest.fail(f"collabvit serve did not start:\n{failed.log.read_text()}", pytrace=False)


SHIPPED_IMAGES = 200  # test images on which runs of the shipped pair are compared with eval


@pytest.fixture(scope="session")
def shipped_eval(tmp_path_factory):
    """`collabvit eval` of the shipped pair on the first SHIPPED_IMAGES test images, in this
    process: (its stdout lines, its results file's summary)."""
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    status, lines = cli_in_process("eval", "--limit", str(SHIPPED_IMAGES), "--quiet",
                                   "--results-file", str(out))  # fmt: skip
    assert status == 0
    return lines, json.loads(out.read_text())["summary"]


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def models_built_once():
    """Each model spec becomes a model once in the module that asks for this (building a
    ViT, its weight initialisation, costs more than a few images through it); every command
    still loads and checks its pair through load_pair. For commands that do not change
    their models."""
    from collabvit.models import pair

    built, load_model = {}, pair.load_model

    def once(spec, server=False):
        key = (repr(spec), server)
        if key not in built:
            built[key] = load_model(spec, server)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pair, "load_model", once)
        yield


def cli_in_process(*args: str) -> tuple[int, list[str]]:
    """`collabvit ARGS` in this process, for session fixtures: (exit status, stdout lines)."""
    import contextlib
    import io

    from collabvit.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(list(args))
    return status, printed.getvalue().splitlines()


SERVER_ALONE = ("--uncer-mode", "none", "--masking-th", "1.0")  # every patch of every image sent


@pytest.fixture(scope="session")
def shipped_slices(shipped_eval, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Both shipped pairs on their first SHIPPED_IMAGES test images as `collabvit eval`
    measures them now: {data set: {"default point": summary, "server alone": summary with
    SERVER_ALONE}}; Fashion-MNIST's default point is shipped_eval's run."""
    folder = tmp_path_factory.mktemp("slices")

    def summary(data_set: str, *flags: str) -> dict:
        out = folder / f"{data_set}-{len(flags)}.json"
        status, _ = cli_in_process("eval", "--data-set", data_set, "--limit",
                                   str(SHIPPED_IMAGES), "--quiet", "--results-file", str(out),
                                   *flags)  # fmt: skip
        assert status == 0
        return json.loads(out.read_text())["summary"]

    return {"fmnist": {"default point": shipped_eval[1],
                       "server alone": summary("fmnist", *SERVER_ALONE)},
            "fmnist-cluttered": {"default point": summary("fmnist-cluttered"),
                                 "server alone": summary("fmnist-cluttered", *SERVER_ALONE)}}


@pytest.fixture(scope="session")
def cluttered_export(tmp_path_factory) -> tuple[Path, list[str]]:
    """`collabvit export --data-set fmnist-cluttered --int8` in this process: the shipped
    cluttered edge at its default point, with its int8 graph calibrated as by default (the
    first 1,000 validation canvases): (its folder, its stdout lines)."""
    folder = tmp_path_factory.mktemp("cluttered-export") / "export"
    status, lines = cli_in_process("export", "--data-set", "fmnist-cluttered", "--int8",
                                   "--out-dir", str(folder))  # fmt: skip
    assert status == 0
    return folder, lines
