"""Ship a pair's frontier in its edge model's card, where `collabvit edge --budget-bps` and
`--budget-cost` (and `collabvit export`) find it.

    python scripts/ship_frontier.py runs/frontier/fmnist/frontier.json

The file is the frontier.json `collabvit sweep` wrote for a shipped pair on the validation
split (`make frontier`): each swept series' Pareto points. It is checked to be a frontier
file of a shipped edge's own weights with its shipped server on held-out images, then
stored under "frontier" in src/collabvit/weights/<edge>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collabvit.lite.controller import FRONTIER_FORMAT
from collabvit.models import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frontier", type=Path, help="frontier.json of `collabvit sweep`")
    args = parser.parse_args()
    document = json.loads(args.frontier.read_text())
    if document.get("format") != FRONTIER_FORMAT:
        raise SystemExit(f"{args.frontier} is not a frontier file ({FRONTIER_FORMAT})")
    provenance = document["provenance"]
    edge, server = provenance["edge_model"], provenance["server_model"]
    if edge["weights"] is not None or not zoo.is_shipped(edge["name"]):
        raise SystemExit(f"{args.frontier} was not swept with a shipped edge's own weights")
    if zoo.default_operating_point(edge["name"], server["name"]) == zoo.EdgeConfig():
        raise SystemExit(f"{server['name']} is not the server shipped with {edge['name']}")
    if provenance["data"]["split"] == "test":
        raise SystemExit("the shipped frontier must come from held-out images, not the test split")
    path = zoo.WEIGHTS_DIR / f"{edge['name'].split('.')[0]}.json"
    card = json.loads(path.read_text())
    card["frontier"] = document
    path.write_text(json.dumps(card, indent=2) + "\n")
    series = ", ".join(f"{s['policy']} + {s['measure']} ({len(s['points'])} points)"
                       for s in document["series"])  # fmt: skip
    print(f"{path}: frontier of {series} on {provenance['data']['data_set']} "
          f"--split {provenance['data']['split']}")


if __name__ == "__main__":
    main()
