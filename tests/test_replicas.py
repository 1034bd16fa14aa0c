"""`collabvit serve --replicas N`: the server as replicas on Ray Serve behind one address.

Each test starts the real command (Ray included) in a process of its own and runs the real
`collabvit edge` against it: the replicas share the work, their answers equal eval's, a full
proxy queue answers 503 with Retry-After, a replica killed mid-run costs no image, and two
Ray nodes serve as one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SHIPPED_IMAGES, ServeProcess

from benchmarks.bench_ray import replica_pids
from collabvit.config import ReplicaConfig
from collabvit.lite.client import infer_request
from collabvit.lite.protocol import Codec, WireGeometry, build_payloads, encode_payload

MODEL = "collabvit_fmnist_server"
# two replicas of one torch thread each on the machine's cores: Ray reserves half a CPU for
# each, so that they start on a 2-core machine beside Ray's own processes
TWO_REPLICAS = ("--replicas", "2", "--replica-cpus", "0.5", "--threads", "1")


class ReplicatedServer(ServeProcess):
    """`collabvit serve --replicas ...` as its own process; stopped with SIGINT (Ctrl-C), so
    that it takes its Ray instance down with it."""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                super().stop()


def start_replicated(tmp_path: Path, *flags: str) -> ReplicatedServer:
    server = ReplicatedServer(tmp_path / "serve.log", *flags)
    if not server.wait_ready():
        server.stop()
        raise AssertionError(f"the replicated server did not start:\n{server.log.read_text()}")
    return server


def run_edge(url: str, records: Path, images: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collabvit", "edge", "--server", url,
                           "--limit", str(images), "--quiet", "--records", str(records),
                           *flags], capture_output=True, text=True, timeout=600)  # fmt: skip


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:] if line]


def test_the_replica_flags_are_checked_before_ray_starts(run_cli):
    assert ReplicaConfig(replicas=2, max_replicas=4).replicated
    for flags, says in [(["--max-replicas", "3"], "give both"),
                        (["--replicas", "3", "--max-replicas", "2"], "at least --replicas"),
                        (["--ray-address", "auto"], "give --replicas"),
                        (["--replicas", "2", "--workers", "2"], "--replicas alone"),
                        (["--replicas", "2", "--max-connections", "300"],
                         "Ray's proxy holds them"),
                        (["--replica-cpus", "2"], "give --replicas"),
                        (["--replicas", "2", "--target-ongoing-requests", "5"],
                         "give --max-replicas")]:
        result = run_cli("serve", *flags)
        assert result.returncode == 2 and says in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr


def test_two_replicas_share_the_work_and_answer_as_eval(tmp_path, shipped_eval):
    """The edge's figures over the replicas equal eval's; both replicas answered, and each
    answer names its replica in the records and the report."""
    server = start_replicated(tmp_path, *TWO_REPLICAS)
    try:
        result = run_edge(server.url, tmp_path / "r.jsonl", SHIPPED_IMAGES)
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:8] == shipped_eval[0][:8]
    answered = [r for r in read_records(tmp_path / "r.jsonl") if r["route"] == "server"]
    names = {r["replica"] for r in answered}
    assert len(names) == 2 and None not in names
    assert min(sum(r["replica"] == name for r in answered) for name in names) >= 5
    assert "Answered by 2 replicas: " in result.stdout
    assert "2 replicas on Ray Serve" in server.log.read_text()


@pytest.mark.slow
def test_a_full_proxy_queue_answers_503_with_retry_after(tmp_path):
    """One replica holding one request, a proxy holding one more: the rest of a burst gets
    503 with Retry-After from the proxy, and a request later is answered again."""
    server = start_replicated(tmp_path, "--replicas", "1", "--replica-cpus", "0.5",
                              "--threads", "1", "--max-ongoing-requests", "1",
                              "--max-queued-requests", "1", "--max-delay-ms", "1500",
                              "--max-batch", "64")  # fmt: skip
    geometry = WireGeometry(channels=1, patch_size=(4, 4), grid_size=(7, 7))
    images = np.zeros((1, 1, 28, 28), np.uint8)
    (payload,) = build_payloads(images, np.ones((1, 49), bool), [0], (4, 4))
    blob = encode_payload(payload, geometry, Codec("raw"))
    url = f"{server.url}/v2/models/{MODEL}/infer"

    async def burst(count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.send(infer_request(client, url, blob))
                                          for _ in range(count)])  # fmt: skip

    try:
        answers = asyncio.run(burst(8))
        later = asyncio.run(burst(1))
    finally:
        server.stop()
    refused = [a for a in answers if a.status_code == 503]
    assert 1 <= sum(a.status_code == 200 for a in answers) <= 2
    assert len(refused) >= 6 and all(a.headers.get("retry-after") == "1" for a in refused)
    assert later[0].status_code == 200


@pytest.mark.slow
def test_a_replica_killed_mid_run_costs_no_image(tmp_path):
    """SIGKILL of one of two replicas while `collabvit edge` runs: every image the gate
    sends is answered by the server, the figures equal eval's, and Ray puts a new replica
    in the dead one's place."""
    images = 600
    evaluated = subprocess.run([sys.executable, "-m", "collabvit", "eval", "--limit",
                                str(images), "--quiet"], capture_output=True, text=True,
                               check=True).stdout.splitlines()[:8]  # fmt: skip
    server = start_replicated(tmp_path, *TWO_REPLICAS)
    records = tmp_path / "r.jsonl"
    try:
        edge = subprocess.Popen([sys.executable, "-m", "collabvit", "edge", "--server",
                                 server.url, "--limit", str(images), "--quiet", "--records",
                                 str(records)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not records.exists() or len(read_records(records)) < 40:
            assert edge.poll() is None and time.monotonic() < deadline, edge.stderr.read()
            time.sleep(0.05)
        before = replica_pids()
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = edge.communicate(timeout=300)
        deadline = time.monotonic() + 60
        while len(replica_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        after = replica_pids()
    finally:
        server.stop()
    assert edge.returncode == 0, stderr
    assert stdout.splitlines()[:8] == evaluated
    written = read_records(records)
    assert len({r["index"] for r in written}) == images
    assert not [r for r in written if r["route"] == "fallback"]
    assert len(after) == 2 and victim not in after  # the pool is whole again


@pytest.mark.slow
def test_two_ray_nodes_serve_as_one(tmp_path, shipped_eval):
    """A simulated two-node Ray cluster (one CPU each); replicas of one CPU each must take
    one node each, and the edge's figures over them equal eval's."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        server = start_replicated(tmp_path, "--replicas", "2", "--replica-cpus", "1",
                                  "--threads", "1", "--ray-address", cluster.address)
        try:
            result = run_edge(server.url, tmp_path / "r.jsonl", SHIPPED_IMAGES)
        finally:
            server.stop()
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:8] == shipped_eval[0][:8]
    names = {r["replica"] for r in read_records(tmp_path / "r.jsonl") if r["route"] == "server"}
    assert len(names) == 2


def test_waiting_for_a_server_waits_through_a_ray_proxy_still_deploying():
    """A Ray Serve proxy up before its application answers 404 in plain text, pointing at its
    routes: the readiness wait keeps waiting there, and still refuses other servers' 404."""
    from collabvit.lite.client.link import deploying_on_ray

    ray_404 = httpx.Response(404, headers={"content-type": "text/plain; charset=utf-8"},
                             content=b"Path '/v2/health/ready' not found. Ping "
                                     b"http://.../-/routes for available routes.")
    assert deploying_on_ray(ray_404)
    assert not deploying_on_ray(httpx.Response(404, headers={"content-type": "text/html"},
                                               content=b"<h1>Not Found</h1>"))
    assert not deploying_on_ray(httpx.Response(404, json={"error": "Not Found"}))


def test_the_kuberay_manifest_is_a_valid_serve_config_that_builds_the_replicas():
    """deploy/kuberay/rayservice.yaml: its serveConfigV2 passes Ray Serve's own schema, and
    its application's args build the autoscaled replicas of the shipped server."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from collabvit.serve.replicas import build

    manifest = yaml.safe_load((Path(__file__).parents[1] / "deploy/kuberay/rayservice.yaml")
                              .read_text())  # fmt: skip
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "collabvit.serve.replicas:build"
    deployment = build(app.args)._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 8)
    assert deployment.ray_actor_options["num_cpus"] == 1
    (served,) = deployment.init_args
    assert served["model"]["name"] == MODEL and served["threads"] == 1
    assert served["settings"]["allowed_hosts"] is None  # any: the Service decides who reaches it
    with pytest.raises(ValueError, match="no option 'port'"):
        build({**app.args, "port": 9000})


def test_replicas_on_a_gpu_device_each_reserve_one():
    """On a CUDA device each replica asks Ray for a GPU (so Ray places it where one is
    free); on the CPU for none."""
    from collabvit.serve.replicas import deployment_options

    config = ReplicaConfig(replicas=2, replica_cpus=0.5)
    assert deployment_options(config, "cuda")["ray_actor_options"] == {"num_cpus": 0.5,
                                                                       "num_gpus": 1}
    assert deployment_options(config)["ray_actor_options"] == {"num_cpus": 0.5}
    assert deployment_options(config)["num_replicas"] == 2
