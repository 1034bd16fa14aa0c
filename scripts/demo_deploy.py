"""`make demo-deploy`: the shipped server in the background, the edge client over the test set.

Starts `collabvit serve` (its log goes to runs/deploy/server.log), waits until it is
ready, runs `collabvit edge` against it with the given extra flags, and stops the
server (SIGTERM: in-flight requests finish first), whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

PORT = os.environ.get("DEPLOY_PORT", "8000")
URL = f"http://127.0.0.1:{PORT}"


def main(extra: list[str]) -> int:
    folder = Path("runs/deploy")
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "collabvit", "serve", "--port", PORT],
                                  stderr=log, stdout=log)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    print(f"collabvit serve stopped (see {folder / 'server.log'}):\n"
                          + (folder / "server.log").read_text().strip(), file=sys.stderr)
                    return 1
                try:
                    if httpx.get(f"{URL}/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    print("collabvit serve was not ready within 300 s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
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
