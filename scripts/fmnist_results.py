"""Fashion-MNIST results: choose the default operating point on validation, report on test.

    python scripts/fmnist_results.py [--no-drop-server runs/train/server_nodrop/model.safetensors]
        [--slice-only]

1. On the validation split (5,000 training images held out by training), sweep
   delta of attention_sum_threshold and eta of min_entropy for the shipped pair
   and pick the most accurate point whose communication cost is at most
   --budget. It is written into the edge's model card as the shipped pair's
   operating point, which `collabvit eval` uses by default (zoo.py).
2. On the test split, measure edge alone, server alone, and collaborative
   accuracy and cost for every selection policy and uncertainty measure, each
   calibrated on validation to the default's operating point (same sent
   fraction for every measure; for the policies the same mean patch count),
   with the token-drop server and, given --no-drop-server, one trained without it.
3. `collabvit eval` on the first SLICE_IMAGES test images, at the default point and
   with every patch of every image sent (the server alone): these figures
   (`slice`) are what tests/test_shipped_slices.py measures again in the default
   test suite. --slice-only measures them alone into the JSON of an earlier run.
4. Write the table between the results markers in README.md and the raw
   numbers to benchmarks/fmnist_results.json (tests/test_readme_numbers.py checks
   that the two agree).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch
from readme_block import write_block

from collabvit import versions
from collabvit.algo.metrics import accuracy
from collabvit.algo.selection import selection_statistics
from collabvit.config import SWEEP_DELTAS
from collabvit.data import FashionMNIST, indexed_loader
from collabvit.lite.frontier import pick_point
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeConfig, EdgeDevice
from collabvit.models.server import Server
from collabvit.research.passes import (
    EdgePass,
    Grid,
    eta_grid,
    etas_for_sent_fractions,
    run_edge,
    server_logits,
    summarize_decisions,
    sweep_points,
)

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("min_entropy", "shannon_entropy", "margin")
# The first test images of each shipped pair that the default test suite evaluates again
# (eval's default batch size, 64, both times: float sums depend on the batching), and the
# `collabvit eval` flags of each run on them.
SLICE_IMAGES = 200
SLICE_RUNS = {"default point": (),
              "server alone": ("--uncer-mode", "none", "--masking-th", "1.0")}  # fmt: skip


def eval_slice(data_set: str, images: int = SLICE_IMAGES) -> dict:
    """`collabvit eval --data-set DATA_SET --limit IMAGES` in this process, once per SLICE_RUNS
    entry: {"images", "runs": {name: {"flags", "results": its results file (summary,
    config with seed, data and versions)}}}."""
    from collabvit.cli import main as collabvit

    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, flags) in enumerate(SLICE_RUNS.items()):
            out = Path(folder) / f"run{index}.json"
            argv = ["eval", "--data-set", data_set, "--limit", str(images), "--quiet",
                    "--results-file", str(out), *flags]  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                status = collabvit(argv)
            if status:
                raise SystemExit(f"collabvit {' '.join(argv)} failed (exit {status})")
            runs[name] = {"flags": list(flags), "results": json.loads(out.read_text())}
    return {"images": images, "runs": runs}


def edge_pass(edge_model, split: str) -> EdgePass:
    data = FashionMNIST(split=split)
    edge = EdgeDevice(edge_model, EdgeConfig())
    return run_edge(edge, indexed_loader(data, batch_size=500), progress=False)


def choose_default(val: EdgePass, server: Server, budget: float) -> dict:
    """Most accurate (delta, eta) on validation with cost <= budget (collabvit sweep's pick)."""
    etas = tuple(dict.fromkeys(round(eta, 3) for eta in eta_grid(val.logits, "min_entropy", 41)))
    grid = Grid(tuple(("attention_sum_threshold", delta) for delta in SWEEP_DELTAS),
                {(1.0, "min_entropy"): etas})  # fmt: skip
    best = pick_point(sweep_points(val, server, grid, progress=False), budget=budget)
    if best is None:
        raise SystemExit(f"no operating point has a validation cost <= {budget}")
    return {"delta": best.threshold, "eta": best.eta, **best.figures.as_dict()}


def ship_operating_point(default: dict, budget: float, edge: str = zoo.EDGE,
                         server: str = zoo.SERVER, script: str = "scripts/fmnist_results.py",
                         data: str = "the validation split") -> None:  # fmt: skip
    """Record the chosen point in the edge's model card, where `collabvit eval` finds it."""
    path = zoo.WEIGHTS_DIR / f"{edge}.json"
    card = json.loads(path.read_text())
    card["operating_point"] = {
        "server": server, "attention_mode": "mean", "masking_mode": "attention_sum_threshold",
        "masking_th": default["delta"], "uncer_mode": "min_entropy", "uncer_th": default["eta"],
        "chosen": f"{script}: the most accurate (delta, eta) of "
        f"attention_sum_threshold + min_entropy on {data} with a validation cost "
        f"of at most {budget} (ties go to the cheaper point)",
        "validation": {"collab_acc": default["collab_acc"], "comm_cost": default["comm_cost"]},
    }  # fmt: skip
    path.write_text(json.dumps(card, indent=2) + "\n")


def matched_threshold(val: EdgePass, target_count: float) -> float:
    """The attention_threshold whose mean selection size on validation is nearest the target."""
    candidates = torch.quantile(val.scores.flatten(), torch.linspace(0, 1, 2001)).unique()
    sizes = torch.stack([(val.scores >= c).sum(1).float().mean() for c in candidates])
    return round(float(candidates[(sizes - target_count).abs().argmin()]), 5)


def calibrated_settings(val: EdgePass, default: dict) -> tuple[dict, dict]:
    """The other policies and measures, calibrated on validation to the default point:
    (policy -> threshold keeping the default's mean patch count, measure -> eta sending the
    default's share of images)."""
    mean_count = default["sent_tokens"]  # the patch count the other policies are matched to
    policies = {
        "attention_sum_threshold": default["delta"],
        "topk": max(1, round(mean_count)),
        "attention_threshold": matched_threshold(val, mean_count),
        "random": max(1, round(mean_count)),
    }
    fraction = torch.tensor([default["sent_images"] / default["images"]])
    etas = {m: round(etas_for_sent_fractions(val.logits, m, fraction)[0], 4) for m in MEASURES}
    etas["min_entropy"] = default["eta"]
    return policies, etas


def calibrated_rows(test: EdgePass, server: Server, policies: dict, etas: dict) -> list[dict]:
    """The calibrated points on test: every measure with the paper's policy, the other
    policies with min-entropy; one server pass per policy, only on images a gate sends."""
    gates = {(1.0, measure): (eta,) for measure, eta in etas.items()}
    wanted = {("attention_sum_threshold", m) for m in MEASURES}
    wanted |= {(policy, "min_entropy") for policy in policies}
    rows = []
    for point in sweep_points(test, server, Grid(tuple(policies.items()), gates), progress=False):
        if (point.policy, point.measure) in wanted:
            row = point.as_dict()
            row.pop("temperature")
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", type=float, default=0.25, help="communication cost budget on validation"
    )
    parser.add_argument(
        "--no-drop-server",
        type=Path,
        help="weights of a server trained without token drop, for the comparison (default: none)",
    )
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "fmnist_results.json")
    parser.add_argument("--slice-only", action="store_true",
                        help="only measure the test slice into the results already in --json")
    args = parser.parse_args()
    if args.slice_only:
        results = json.loads(args.json.read_text())
        results["slice"] = eval_slice("fmnist")
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

    edge_model = vit.create_vit(zoo.EDGE)
    servers = {"token drop": vit.create_vit(zoo.SERVER, server=True)}
    if args.no_drop_server:
        servers["no token drop"] = vit.create_vit(zoo.SERVER, args.no_drop_server, server=True)
    val, test = edge_pass(edge_model, "val"), edge_pass(edge_model, "test")
    drop_server = Server(servers["token drop"])
    default = choose_default(val, drop_server, args.budget)
    print(f"default on validation: {default}")
    ship_operating_point(default, args.budget)

    policies, etas = calibrated_settings(val, default)
    rows = []
    edge_alone = accuracy(test.logits, test.labels)
    for server_name, model in servers.items():
        server = Server(model)
        full = torch.ones_like(test.scores, dtype=torch.bool)
        nobody_confident = torch.zeros(len(test.labels), dtype=torch.bool)
        alone = summarize_decisions(test, selection_statistics(test.scores, full),
                                    server_logits(server, test.images, full), nobody_confident)
        rows.append({"server": server_name, "policy": "all patches",
                     "measure": "none (server alone)", "threshold": "", "eta": "",
                     "collab_acc": alone.collab_acc, "comm_cost": 1.0})  # fmt: skip
        rows += [{"server": server_name, **row}
                 for row in calibrated_rows(test, server, policies, etas)]  # fmt: skip
    results = {
        "default": default,
        "policies": policies,
        "etas": etas,
        "edge_alone": edge_alone,
        "budget": args.budget,
        "rows": rows,
        "slice": eval_slice("fmnist"),
        "provenance": {"script": "scripts/fmnist_results.py", "edge": zoo.EDGE,
                       "servers": {name: getattr(m, "default_cfg", {}).get("architecture")
                                   for name, m in servers.items()},
                       "data": "Fashion-MNIST val (choice) and test (report)", "seed": 0,
                       **versions()},
    }
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    write_table(args.readme, results)


def write_table(readme: Path, results: dict) -> None:
    lines = [
        f"Edge alone: **{results['edge_alone']:.2f} %** top-1 on the 10,000 test images.",
        "",
        "| server | selection | threshold | uncertainty | η | collaborative acc. | comm. cost |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['server']} | {row['policy']} | {row['threshold']} | {row['measure']} | "
            f"{row['eta']} | {row['collab_acc']:.2f} % | {row['comm_cost']:.3f} |"
        )
    write_block(readme, "fmnist-results", "\n".join(lines))


if __name__ == "__main__":
    main()
