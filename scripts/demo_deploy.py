"""`make demo-deploy`: the shipped server in the background, the edge client over the test set.

Starts `collabvit serve` (its log goes to runs/deploy/server.log) with the server the
edge's flags name (`EDGE_FLAGS="--data-set fmnist-cluttered"`: `collabvit serve --data-set
fmnist-cluttered`, the cluttered pair's server),
waits until it is ready, runs `collabvit edge` against it with the given extra flags, and stops the
server (SIGTERM: in-flight requests finish first), whatever happens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from collabvit.lite.client import ClientError, wait_until_served

PORT = os.environ.get("DEPLOY_PORT", "8000")
URL = f"http://127.0.0.1:{PORT}"


def serve_flags(extra: list[str]) -> list[str]:
    """What `collabvit serve` needs of the edge's flags to serve the model the edge asks
    for: its --server-model, else its --data-set (whose shipped server serve picks)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-set", "--data_set", default="fmnist")
    parser.add_argument("--server-model", "--server_model", default=None)
    known, _ = parser.parse_known_args(extra)
    # float32: the answers over HTTP equal `make demo`'s (eval's) to the last digit
    exact = ["--precision", "float32"]
    if known.server_model:
        return ["--server-model", known.server_model, *exact]
    return ["--data-set", known.data_set, *exact]


def main(extra: list[str]) -> int:
    folder = Path("runs/deploy")
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "collabvit", "serve", "--port", PORT,
                                   *serve_flags(extra)],
                                  stderr=log, stdout=log)  # fmt: skip
        try:
            try:
                wait_until_served(URL, 300, alive=lambda: server.poll() is None)
            except ClientError as error:
                log.flush()
                print(f"{error}; its log, {folder / 'server.log'}:\n"
                      + (folder / "server.log").read_text().strip(), file=sys.stderr)
                return 1
            (folder / "records.jsonl").unlink(missing_ok=True)  # a demo starts afresh
            return subprocess.run([sys.executable, "-m", "collabvit", "edge", "--server", URL,
                                   "--records", str(folder / "records.jsonl"),
                                   "--results-file", str(folder / "results.json"),
                                   *extra]).returncode  # fmt: skip
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
