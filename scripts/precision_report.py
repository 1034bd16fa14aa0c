"""What bfloat16 and int8 change against float32, on every test image of each shipped pair.

    python scripts/precision_report.py [--limit N] [--out benchmarks/precision_results.json]
        [--no-cards]

For each shipped pair at its default operating point, runs `collabvit eval`'s loop at each
precision with both models in it, and with the server alone in it (the edge in float32, as
behind `collabvit serve --precision P` with a float32 or ONNX edge), and counts against
float32: every summary figure, the share of images whose gate decision changes, whose
kept-patch set changes, and per-image answer agreement. Writes the figures with their
provenance to the JSON, and (unless --no-cards, or with --limit) the server-alone change of
each precision into the shipped server's model card, where `collabvit serve --precision
auto` reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from readme_block import write_block

from collabvit import cpu_model, versions
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.specs import PRECISIONS, SHIPPED_PAIRS
from collabvit.models import zoo
from collabvit.models.pair import load_pair
from collabvit.models.precision import with_precision
from collabvit.models.server import Server
from collabvit.research.precision import compare_runs, decided_run, precision_table

REPO = Path(__file__).resolve().parents[1]
BATCH = 250


def pair_report(data_set: str, limit: int | None) -> dict:
    edge_name, server_name = SHIPPED_PAIRS[data_set]
    pair = load_pair(ModelSpec(edge_name), ModelSpec(server_name),
                     DataSpec(data_set=data_set, limit=limit, batch_size=BATCH))  # fmt: skip
    config = pair.default_config()
    edge = pair.edge(config)
    total = len(pair.loader())
    exact = decided_run(edge, pair.server(), pair.loader(), total=total)
    print(f"{data_set} float32: {exact.summary.collab_acc:.2f} %", file=sys.stderr, flush=True)
    report = {"edge_model": edge_name, "server_model": server_name,
              "operating_point": {"masking_mode": config.masking_mode,
                                  "masking_th": config.masking_th,
                                  "uncer_mode": config.uncer_mode,
                                  "uncer_th": config.uncer_th},
              "images": exact.summary.images, "both": {}, "server_alone": {}}  # fmt: skip
    for precision in PRECISIONS[1:]:
        low = load_pair(ModelSpec(edge_name), ModelSpec(server_name),
                        DataSpec(data_set=data_set, limit=limit, batch_size=BATCH),
                        precision=precision)  # fmt: skip
        both = decided_run(low.edge(config), low.server(), low.loader(), total=total)
        report["both"][precision] = compare_runs(exact, both)
        server = Server(with_precision(pair.server_model, precision, pair.device), pair.device,
                        pair.normalization)  # fmt: skip
        alone = decided_run(edge, server, pair.loader(), total=total)
        report["server_alone"][precision] = compare_runs(exact, alone)
        print(f"{data_set} {precision}: both {both.summary.collab_acc:.2f} %, server alone "
              f"{alone.summary.collab_acc:.2f} %", file=sys.stderr, flush=True)
    return report


def write_cards(reports: dict, provenance: dict) -> None:
    """Each shipped server's card records its measured change when served in each lower
    precision behind a float32 edge (what `--precision auto` reads)."""
    for report in reports.values():
        path = zoo.WEIGHTS_DIR / f"{report['server_model']}.json"
        card = json.loads(path.read_text())
        card["precision"] = {
            precision: {"largest_change_pt": round(alone["largest_change_pt"], 4),
                        "answer_agreement_pct": round(alone["answer_agreement_pct"], 4),
                        "images": report["images"],
                        "measured_by": "scripts/precision_report.py",
                        "cpu": provenance["cpu"], "torch": provenance["torch"]}
            for precision, alone in report["server_alone"].items()}  # fmt: skip
        path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N test images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/precision_results.json")
    parser.add_argument("--no-cards", action="store_true")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md",
                        help="README whose precision block this rewrites (not with --limit)")
    args = parser.parse_args()
    torch.manual_seed(0)
    reports = {data_set: pair_report(data_set, args.limit) for data_set in SHIPPED_PAIRS}
    provenance = {"script": "scripts/precision_report.py", "limit": args.limit,
                  "cpu": cpu_model(), "threads": torch.get_num_threads(), **versions(),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    args.out.write_text(json.dumps({"pairs": reports, "provenance": provenance}, indent=1)
                        + "\n")  # fmt: skip
    print(f"wrote {args.out}", file=sys.stderr)
    if args.limit is None and not args.no_cards:
        write_cards(reports, provenance)
    if args.limit is None:
        write_block(args.readme, "precision", precision_table({"pairs": reports}))


if __name__ == "__main__":
    main()
