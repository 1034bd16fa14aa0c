"""Bytes on the wire per codec: the README's deployment table, measured over HTTP.

    python scripts/deploy_table.py [--data-set fmnist|fmnist-cluttered] [--limit N]
        [--readme README.md] [--out benchmarks/deploy_results.json]

Starts `collabvit serve` (the data set's shipped server), then runs `collabvit edge` over
the test set at the shipped default operating point once per codec (raw,
png, jpeg at quality 50, 75, 90 and 95), and once more per codec sending every full
image (`--uncer-mode none --masking-th 1.0`), which gives the accuracy of the
server on full images through that codec. Bytes are whole HTTP requests (request
line, headers, body) as `collabvit edge` counts them. Writes the figures with their
provenance to benchmarks/deploy_results.json and the table between the
deploy-table markers in README.md (for fmnist-cluttered: deploy_results_cluttered.json and
the deploy-table-cluttered markers); tests/test_readme_numbers.py checks that the
README shows exactly what the JSON holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from readme_block import write_block

from collabvit.lite.specs import shipped_pair

REPO = Path(__file__).resolve().parents[1]
# data set -> (results file, README marker name, what its images are called)
OUTPUTS = {
    "fmnist": ("deploy_results.json", "deploy-table", "Fashion-MNIST test images"),
    "fmnist-cluttered": ("deploy_results_cluttered.json", "deploy-table-cluttered",
                         "cluttered Fashion-MNIST test canvases"),
}


CODECS = ("raw", "png", "jpeg:50", "jpeg:75", "jpeg:90", "jpeg:95")
FULL_CODECS = ("raw", "jpeg:50", "jpeg:75", "jpeg:90", "jpeg:95")  # png is lossless: raw's accuracy
TOLERANCE = 0.2  # accuracy points a lossy codec may lose and still count as free


def run_edge(url: str, codec: str, limit: int | None, folder: Path, data_set: str,
             *extra: str) -> dict:  # fmt: skip
    name = codec.replace(":", "") + ("-full" if extra else "")
    results = folder / f"{name}.json"
    command = [sys.executable, "-m", "collabvit", "edge", "--server", url, "--codec", codec,
               "--data-set", data_set,
               "--quiet", "--concurrency", "16", "--records", str(folder / f"{name}.jsonl"),
               "--results-file", str(results), *extra]  # fmt: skip
    if limit:
        command += ["--limit", str(limit)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"{name}: done", flush=True)
    return json.loads(results.read_text())


def measure(limit: int | None, data_set: str = "fmnist") -> dict:
    # the port is part of every request's Host header, so the same as `make demo-deploy`'s
    port = int(os.environ.get("DEPLOY_PORT", "8000"))
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "collabvit", "serve", "--port", str(port),
                               "--server-model", shipped_pair(data_set)[1], "--precision",
                               "float32"],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        from collabvit.lite.client import wait_until_served

        wait_until_served(url, 120, alive=lambda: server.poll() is None)
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            runs = {codec: run_edge(url, codec, limit, folder, data_set) for codec in CODECS}
            full = {codec: run_edge(url, codec, limit, folder, data_set, "--uncer-mode", "none",
                                    "--masking-th", "1.0") for codec in FULL_CODECS}  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    for report in (*runs.values(), *full.values()):
        fallbacks = sum(report["fallbacks"].values())
        if fallbacks:
            raise SystemExit(f"{fallbacks} images fell back to the edge: the figures would mix")
    first = runs["raw"]
    rows = [{
        "codec": codec,
        "bytes_all": report["bytes_per_image"]["collaborative"]["all_images"],
        "bytes_sent": report["bytes_per_image"]["collaborative"]["sent_images"],
        "payload_all": report["bytes_per_image"]["collaborative"]["payload_all_images"],
        "collab_acc": report["summary"]["collab_acc"],
        "comm_cost": report["summary"]["comm_cost"],
    } for codec, report in runs.items()]  # fmt: skip
    full_rows = [{
        "codec": codec,
        "bytes_all": report["bytes_per_image"]["collaborative"]["all_images"],
        "server_acc": report["summary"]["collab_acc"],
    } for codec, report in full.items()]  # fmt: skip
    full_rows.insert(1, {"codec": "png",
                         "bytes_all": full["raw"]["bytes_per_image"]["full_png"]["all_images"],
                         "server_acc": full["raw"]["summary"]["collab_acc"]})  # fmt: skip
    config = first["config"]
    return {
        "data_set": data_set,
        "images": first["summary"]["images"],
        "client_acc": first["summary"]["client_acc"],
        "operating_point": config["edge"],
        "rows": rows,
        "full_rows": full_rows,
        "config": {key: config[key] for key in ("edge_model", "server_model", "data", "run",
                                                "collabvit", "torch", "timm", "created")
                   if key in config},
    }  # fmt: skip


def free_quality(results: dict) -> str | None:
    """The lowest jpeg quality that loses less than TOLERANCE points against raw."""
    raw = next(r for r in results["rows"] if r["codec"] == "raw")["collab_acc"]
    jpeg = sorted((r for r in results["rows"] if r["codec"].startswith("jpeg")),
                  key=lambda r: int(r["codec"].split(":")[1]))  # fmt: skip
    for row in jpeg:
        if raw - row["collab_acc"] < TOLERANCE:
            return row["codec"]
    return None


def render(results: dict) -> str:
    raw = next(r for r in results["rows"] if r["codec"] == "raw")
    point = results["operating_point"]
    images = OUTPUTS[results.get("data_set", "fmnist")][2]
    lines = [
        f"{results['images']:,} {images}, default operating point "
        f"(δ {point['masking_th']}, η {point['uncer_th']}): the edge alone is right on "
        f"{results['client_acc']:.2f} %.",
        "",
        "| what is sent | codec | bytes per image (all images) | bytes per sent image "
        "| accuracy | vs. raw |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        delta = row["collab_acc"] - raw["collab_acc"]
        lines.append(f"| selected patches of uncertain images | {row['codec']} | "
                     f"{row['bytes_all']:.1f} | {row['bytes_sent']:.1f} | "
                     f"{row['collab_acc']:.2f} % | {delta:+.2f} pt |")  # fmt: skip
    for row in results["full_rows"]:
        lines.append(f"| every full image (server alone) | {row['codec']} | "
                     f"{row['bytes_all']:.1f} | {row['bytes_all']:.1f} | "
                     f"{row['server_acc']:.2f} % | |")  # fmt: skip
    best = free_quality(results)
    full_raw = next(r for r in results["full_rows"] if r["codec"] == "raw")["bytes_all"]
    lines += ["", f"Collaboration with raw patches sends {raw['bytes_all'] / full_raw:.1%} of "
              "the bytes of sending every full image raw. " + (
                  f"The lowest JPEG quality that loses less than {TOLERANCE} pt against raw is "
                  f"**{best.split(':')[1]}**." if best else
                  f"Every JPEG quality tried loses {TOLERANCE} pt or more against raw.")]
    return "\n".join(lines)


def png_share(results: dict) -> float:
    """Bytes per image of collaboration with png patches over sending every image as png."""
    collaborative = next(r for r in results["rows"] if r["codec"] == "png")["bytes_all"]
    whole = next(r for r in results["full_rows"] if r["codec"] == "png")["bytes_all"]
    return collaborative / whole


def write_table(readme: Path, results: dict) -> None:
    write_block(readme, OUTPUTS[results.get("data_set", "fmnist")][1], render(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-set", choices=sorted(OUTPUTS), default="fmnist")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test images")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: benchmarks/deploy_results[_cluttered].json)")
    args = parser.parse_args()
    args.out = args.out or REPO / "benchmarks" / OUTPUTS[args.data_set][0]
    results = measure(args.limit, args.data_set)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_table(args.readme, results)
    print(render(results))


if __name__ == "__main__":
    main()
