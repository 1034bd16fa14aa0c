"""How closely `--budget-cost` holds its budget: CostController replayed over many runs.

    python scripts/budget_tolerance.py [--runs 100] [--json runs/budget_tolerance.json]

For each shipped pair, one edge pass over the 10,000 test images gives every image's
uncertainty and, for every δ of the pair's shipped frontier, its patch count. Each run then
takes n images in a random order and replays what `collabvit eval --budget-cost C` does
with them, batch by batch (64 images): the controller's point (δ, η), the gate on the
batch's uncertainties, the batch's uncertainties observed. A run's cost is the patches sent
over n × 49. For every budget and run length the script reports the mean and spread of
cost / budget - 1, the spread chance predicts (sqrt((1 - s) / (n s)) at the controller's
send share s) and the share of runs beyond the tolerance CostController states
(controller.cost_tolerance). Writes the figures with their provenance as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from collabvit import versions
from collabvit.algo.uncertainty import confident_by, uncertainty
from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.controller import CostController, cost_tolerance, read_frontier
from collabvit.lite.specs import EdgeConfig, shipped_pair
from collabvit.models import zoo
from collabvit.models.pair import load_pair
from collabvit.research.passes import run_edge, selections

MEASURE = "min_entropy"
POLICY = "attention_sum_threshold"
BUDGETS = (0.01, 0.03, 0.05, 0.1, 0.15, 0.25)
LENGTHS = (200, 600, 2000, 5000)
BATCH = 64  # `collabvit eval`'s default batch size: the controller moves between batches


def edge_outputs(data_set: str) -> tuple[np.ndarray, dict[float, np.ndarray], list]:
    """The pair's test uncertainties [n], its patch counts [n] per frontier δ, and the
    frontier (the shipped edge's series of the policy and measure)."""
    edge_name, server_name = shipped_pair(data_set)
    pair = load_pair(ModelSpec(edge_name), ModelSpec(server_name),
                     DataSpec(data_set=data_set, batch_size=500), with_server=False)  # fmt: skip
    config = pair.default_config()
    edge_pass = run_edge(pair.edge(config), pair.loader(), progress=False)
    values = uncertainty(edge_pass.logits, MEASURE).numpy()
    points = read_frontier(zoo.model_card(edge_name)["frontier"], POLICY, MEASURE, "mean")
    counts = {p.masking_th: selections(edge_pass, EdgeConfig(masking_th=p.masking_th))
              .sum(1).numpy() for p in points}  # fmt: skip
    return values, counts, points


def replay(values: np.ndarray, counts: dict[float, np.ndarray], points: list, budget: float,
           order: np.ndarray) -> tuple[float, float]:  # fmt: skip
    """One run over the images `order`: (its cost, the controller's send share)."""
    controller = CostController(points, MEASURE, budget)
    patches = 0.0
    for start in range(0, len(order), BATCH):
        rows = order[start:start + BATCH]
        delta, eta = controller.operating_point()
        sent = ~confident_by(torch.from_numpy(values[rows]), MEASURE, eta).numpy()
        patches += float(counts[delta][rows][sent].sum())
        controller.observe(values[rows], None)
    num_patches = controller.point.num_patches
    return patches / (len(order) * num_patches), controller.full_share


def measure(values, counts, points, runs: int, rng: np.random.Generator) -> list[dict]:
    """Every budget and run length: the deviations' mean and spread, and how often a run
    ended beyond the stated tolerance."""
    rows = []
    for budget in BUDGETS:
        for length in LENGTHS:
            deviations, share = [], 0.0
            for _ in range(runs):
                cost, share = replay(values, counts, points, budget,
                                     rng.permutation(len(values))[:length])  # fmt: skip
                deviations.append(cost / budget - 1)
            deviations = np.asarray(deviations)
            tolerance = cost_tolerance(share, length)
            rows.append({"budget": budget, "images": length, "share": share,
                         "chance_spread": math.sqrt((1 - share) / (length * share)),
                         "mean": float(deviations.mean()), "spread": float(deviations.std()),
                         "tolerance": tolerance,
                         "beyond": float(np.mean(np.abs(deviations) > tolerance)),
                         "over": float(np.mean(deviations > tolerance))})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="runs per budget and length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("runs/budget_tolerance.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    results = {}
    for data_set in ("fmnist", "fmnist-cluttered"):
        results[data_set] = measure(*edge_outputs(data_set), args.runs, rng)
        for row in results[data_set]:
            print(f"{data_set:16s} cost {row['budget']:<5} n {row['images']:<5} share "
                  f"{row['share']:.3f}: mean {100 * row['mean']:+5.1f} %, spread "
                  f"{100 * row['spread']:4.1f} % (chance {100 * row['chance_spread']:4.1f} %), "
                  f"tolerance ±{100 * row['tolerance']:4.1f} %: {100 * row['beyond']:.0f} % of "
                  "runs beyond it")  # fmt: skip
    every = [row for rows in results.values() for row in rows]
    beyond = float(np.mean([row["beyond"] for row in every]))
    print(f"runs beyond the tolerance: {100 * beyond:.2f} % of {len(every) * args.runs:,}; "
          f"worst setting {100 * max(row['beyond'] for row in every):.0f} %")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "pairs": results, "beyond": beyond,
        "provenance": {"script": "scripts/budget_tolerance.py", "runs": args.runs,
                       "seed": args.seed, "batch": BATCH, "measure": MEASURE, "policy": POLICY,
                       "data": "fmnist and fmnist-cluttered test splits (10,000 each), "
                               "frontiers and operating points shipped in the edges' cards",
                       **versions()},
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
