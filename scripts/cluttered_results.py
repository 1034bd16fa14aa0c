"""Cluttered Fashion-MNIST results: the paper's claims, measured where *which* patches matter.

    python scripts/cluttered_results.py [--budget 0.1] [--bytes-only | --slice-only]

1. Default operating point, on the validation canvases: the most accurate (delta, eta) of
   attention_sum_threshold + min_entropy whose validation communication cost is at most
   --budget; written into the cluttered edge's model card, where `collabvit eval
   --data-set fmnist-cluttered` finds it.
2. Selection matters (test, every canvas sent to the server): server accuracy against the
   mean number of patches sent, for mean attention and rollout (sum threshold over a delta
   grid), top-k of mean attention and random, at equal patch counts.
3. Attention finds the object (test): recall of the item's patches in the k most attended
   (mean, rollout) and in k random patches, for every k; what the selections at the
   default's patch count hold (item, clutter or blank patches).
4. Collaboration at the default point (test): edge alone, server alone, every policy and
   uncertainty measure calibrated on validation to the default's sent share and patch count.
5. The targets the paper's idea predicts, measured.
6. `collabvit eval` on the first test canvases (`slice`, as scripts/fmnist_results.py
   measures them), which tests/test_shipped_slices.py measures again; --slice-only
   measures them alone into the JSON of an earlier run.

Writes benchmarks/cluttered_results.json, the figures in docs/findings/cluttered/ and the
table between the cluttered-results markers in README.md (tests/test_readme_numbers.py
checks that README and JSON agree). The frontier over every policy, attention mode and
measure is `make findings-cluttered` (collabvit sweep); the bytes are scripts/deploy_table.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure
from readme_block import opening_blocks, write_block, write_blocks

from collabvit import versions
from collabvit.algo.metrics import accuracy
from collabvit.algo.selection import (
    object_recall,
    select_random,
    select_topk,
    selection_composition,
)
from collabvit.data import ClutteredFashionMNIST, indexed_loader
from collabvit.lite.protocol import patchify
from collabvit.lite.specs import EdgeConfig
from collabvit.models import vit, zoo
from collabvit.models.edge import EdgeDevice
from collabvit.models.server import Server
from collabvit.research import plots
from collabvit.research.passes import (
    EdgePass,
    run_edge,
    selections,
    server_logits,
)

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    """Another script of this folder, as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The Fashion-MNIST results' default-point choice and calibrated rows, shared.
FMNIST_RESULTS = script("fmnist_results")
# Sum thresholds of the selection curve: from a handful of patches to nearly all of them.
CURVE_DELTAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999)
CURVE_COUNTS = (4, 8, 12, 16, 20, 24, 32, 40, 49)
RECALL_K = 16


def edge_passes(edge_model, data, batch_size: int = 500) -> dict[str, EdgePass]:
    """The edge's logits and scores over `data`, one pass per attention mode."""
    return {mode: run_edge(EdgeDevice(edge_model, EdgeConfig(attention_mode=mode)),
                           indexed_loader(data, batch_size=batch_size), progress=False)
            for mode in ("mean", "rollout")}  # fmt: skip


def occupied_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Patches holding any non-zero pixel: images [n, C, H, W] -> [n, N] bool."""
    return patchify(images, (patch, patch)).flatten(2).amax(dim=2) > 0


def selection_curve(passes: dict[str, EdgePass], server: Server, seed: int = 0) -> list[dict]:
    """Server accuracy with every canvas sent, per selection: [{series, setting, patches,
    server_acc}] for sum thresholds of mean and rollout, top-k of mean, and random."""
    mean = passes["mean"]
    rows = []
    settings = [(f"{mode} · sum threshold", mode, "attention_sum_threshold", delta)
                for mode in ("mean", "rollout") for delta in CURVE_DELTAS]  # fmt: skip
    settings += [("mean · top-k", "mean", "topk", k) for k in CURVE_COUNTS]
    settings += [("random", "mean", "random", k) for k in CURVE_COUNTS]
    for series, mode, policy, threshold in settings:
        config = EdgeConfig(attention_mode=mode, masking_mode=policy, masking_th=threshold)
        keep = selections(passes[mode], config, seed)
        logits = server_logits(server, mean.images, keep)
        rows.append({"series": series, "setting": threshold,
                     "patches": float(keep.sum(1).float().mean()),
                     "server_acc": accuracy(logits, mean.labels)})  # fmt: skip
    return rows


def recall_curve(passes: dict[str, EdgePass], masks: torch.Tensor, seed: int = 0) -> dict:
    """Mean recall of the item's patches in the k most attended (mean, rollout) and in k
    random patches, for k = 1..N: {series: [recall at k = 1, ..., N]}."""
    count = masks.shape[1]
    mean = passes["mean"]
    curves: dict[str, list[float]] = {"mean": [], "rollout": [], "random": []}
    for k in range(1, count + 1):
        for mode in ("mean", "rollout"):
            keep = select_topk(passes[mode].scores, k)
            curves[mode].append(float(object_recall(keep, masks).mean()))
        keep = select_random(mean.scores, k, mean.image_ids, seed)
        curves["random"].append(float(object_recall(keep, masks).mean()))
    return curves


def compositions(passes: dict[str, EdgePass], masks: torch.Tensor, occupied: torch.Tensor,
                 k: int, delta: float, seed: int = 0) -> dict:  # fmt: skip
    """What each selection of about k patches holds: {selection: {object, clutter, blank}}."""
    mean = passes["mean"]
    chosen = {
        f"mean · sum threshold δ {delta}": selections(mean, EdgeConfig(masking_th=delta), seed),
        f"mean · top-{k}": select_topk(mean.scores, k),
        f"rollout · top-{k}": select_topk(passes["rollout"].scores, k),
        f"random {k}": select_random(mean.scores, k, mean.image_ids, seed),
    }
    return {name: {**selection_composition(keep, masks, occupied),
                   "patches": float(keep.sum(1).float().mean()),
                   "recall": float(object_recall(keep, masks).mean())}
            for name, keep in chosen.items()}  # fmt: skip


def targets(results: dict) -> list[dict]:
    """The paper's idea, as four measurable predictions on this data set."""
    server_acc = results["server_alone"]
    curve = results["selection_curve"]
    # attention-selected: any series but random (sum thresholds of mean attention and of
    # rollout, top-k of mean attention), at most 20 patches on average
    attention = [r for r in curve if r["series"] != "random" and r["patches"] <= 20]
    best = max(attention, key=lambda r: r["server_acc"]) if attention else None
    paper = [r for r in attention if r["series"] == "mean · sum threshold"]
    paper_best = max(paper, key=lambda r: r["server_acc"]) if paper else None
    random = [r for r in curve if r["series"] == "random"]

    def random_at(patches: float) -> float:  # the random series, interpolated in patches
        points = sorted((r["patches"], r["server_acc"]) for r in random)
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if x0 <= patches <= x1:
                return y0 + (y1 - y0) * (patches - x0) / (x1 - x0)
        return points[0][1] if patches < points[0][0] else points[-1][1]

    recall = results["recall"]["mean"][RECALL_K - 1]
    default = results["default_test"]
    bytes_row = results.get("bytes")
    rows = [
        {"target": "sent every canvas, attention-selected patches averaging <= 20 of 49 keep "
                   "the server within 1 pt of its whole-canvas accuracy",
         "measured": (f"{best['series']} {best['setting']}: {best['server_acc']:.2f} % at "
                      f"{best['patches']:.1f} patches (whole canvas {server_acc:.2f} %; mean · "
                      f"sum threshold {paper_best['setting']}: {paper_best['server_acc']:.2f} % "
                      f"at {paper_best['patches']:.1f})")
                     if best and paper_best else "no such point",
         "holds": bool(best and best["server_acc"] >= server_acc - 1)},
        {"target": "random patches at the same count lose >= 10 pt",
         "measured": (f"{random_at(best['patches']):.2f} % at {best['patches']:.1f} patches"
                      if best else "-"),
         "holds": bool(best and random_at(best["patches"]) <= server_acc - 10)},
        {"target": f"attention's item recall at k = {RECALL_K} >= 0.85 (random: "
                   f"{RECALL_K / 49:.2f})",
         "measured": f"{recall:.3f}", "holds": recall >= 0.85},
        {"target": "default point (picked on validation) within 0.5 pt of the server alone at "
                   "a test communication cost <= 0.12",
         "measured": f"{default['collab_acc']:.2f} % at cost {default['comm_cost']:.3f}",
         "holds": default["collab_acc"] >= server_acc - 0.5 and default["comm_cost"] <= 0.12},
    ]  # fmt: skip
    if bytes_row:
        rows.append({"target": "png bytes per test image <= 10 % of sending every canvas as png",
                     "measured": f"{100 * bytes_row['share']:.1f} %",
                     "holds": bytes_row["share"] <= 0.10})  # fmt: skip
    return rows


def measure(edge_model, server_model, val_data, test_data, budget: float,
            seed: int = 0) -> dict:  # fmt: skip
    """Every figure of the results, from the pair and the validation and test canvases."""
    server = Server(server_model)
    val, test = edge_passes(edge_model, val_data), edge_passes(edge_model, test_data)
    default = FMNIST_RESULTS.choose_default(val["mean"], server, budget)
    masks = test_data.masks
    patch = vit.geometry(edge_model).patch_size[0]
    occupied = occupied_patches(test["mean"].images, patch)
    full = torch.ones_like(test["mean"].scores, dtype=torch.bool)
    server_alone = accuracy(server_logits(server, test["mean"].images, full), test["mean"].labels)
    policies, etas = FMNIST_RESULTS.calibrated_settings(val["mean"], default)
    rows = FMNIST_RESULTS.calibrated_rows(test["mean"], server, policies, etas)
    default_test = default_row(rows)
    return {
        "default": default,
        "default_test": default_test,
        "budget": budget,
        "edge_alone": accuracy(test["mean"].logits, test["mean"].labels),
        "server_alone": server_alone,
        "item_patches": float(masks.sum(1).float().mean()),
        "selection_curve": selection_curve(test, server, seed),
        "recall": recall_curve(test, masks, seed),
        "composition": compositions(test, masks, occupied, RECALL_K, default["delta"], seed),
        "rows": rows,
    }


def selection_figure(results: dict):
    """Server accuracy against patches sent, every canvas sent, one line per selection."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    series = dict.fromkeys(r["series"] for r in results["selection_curve"])
    for index, name in enumerate(series):
        members = sorted((r["patches"], r["server_acc"]) for r in results["selection_curve"]
                         if r["series"] == name)  # fmt: skip
        axes.plot(*zip(*members, strict=True), label=name, **plots.series_style(index))
    axes.axhline(results["server_alone"], color="0.3", linestyle=":", linewidth=1,
                 label=f"server, whole canvas ({results['server_alone']:.2f} %)")  # fmt: skip
    axes.axvline(results["item_patches"], color="0.6", linestyle="--", linewidth=1,
                 label=f"item's patches (mean {results['item_patches']:.1f})")  # fmt: skip
    axes.set(xlabel="patches sent per canvas (of 49)", ylabel="server top-1 accuracy (%)",
             title="Every test canvas sent: which patches matter", xlim=(0, 49))  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return figure


def recall_figure(results: dict):
    """Recall of the item's patches in the k most attended patches, against k."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    for index, (name, values) in enumerate(results["recall"].items()):
        label = {"mean": "mean attention, top-k", "rollout": "rollout, top-k",
                 "random": "k random patches"}[name]  # fmt: skip
        axes.plot(range(1, len(values) + 1), values, label=label, **plots.series_style(index))
    axes.axvline(results["item_patches"], color="0.6", linestyle="--", linewidth=1,
                 label=f"item's patches (mean {results['item_patches']:.1f})")  # fmt: skip
    axes.set(xlabel="k: patches selected (of 49)", ylabel="share of the item's patches selected",
             title="Does attention find the object?", xlim=(0, 49), ylim=(0, 1.01))  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return figure


def render(results: dict) -> str:
    """The README block: the pair, the default point, the claims and the targets."""
    default, test = results["default"], results["default_test"]
    lines = [
        f"Edge alone **{results['edge_alone']:.2f} %**, server alone (whole canvases) "
        f"**{results['server_alone']:.2f} %**, collaborative at the default point (δ "
        f"{default['delta']}, η {default['eta']}, picked on validation with cost ≤ "
        f"{results['budget']}) **{test['collab_acc']:.2f} %** at a communication cost of "
        f"**{test['comm_cost']:.3f}**, on the 10,000 test canvases; the item covers "
        f"{results['item_patches']:.1f} of 49 patches on average.",
        "",
        "| selection (every canvas sent) | patches | server acc. |",
        "|---|---:|---:|",
    ]
    for row in results["selection_curve"]:
        if row["series"] != "rollout · sum threshold":
            lines.append(f"| {row['series']} {row['setting']} | {row['patches']:.1f} | "
                         f"{row['server_acc']:.2f} % |")  # fmt: skip
    lines += ["", f"| selection of about {RECALL_K} patches | patches | item recall | item | "
              "clutter | blank |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, shares in results["composition"].items():
        lines.append(f"| {name} | {shares['patches']:.1f} | {shares['recall']:.3f} | "
                     f"{100 * shares['object']:.1f} % | {100 * shares['clutter']:.1f} % | "
                     f"{100 * shares['blank']:.1f} % |")  # fmt: skip
    lines += ["", "| selection | threshold | uncertainty | η | collaborative acc. | comm. cost |",
              "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for row in results["rows"]:
        lines.append(f"| {row['policy']} | {row['threshold']} | {row['measure']} | {row['eta']} "
                     f"| {row['collab_acc']:.2f} % | {row['comm_cost']:.3f} |")  # fmt: skip
    lines += ["", "| the paper's idea predicts | measured | holds |", "|---|---|---|"]
    for row in results["targets"]:
        lines.append(f"| {row['target']} | {row['measured']} | "
                     f"{'yes' if row['holds'] else '**no**'} |")  # fmt: skip
    return "\n".join(lines)


def default_row(rows: list[dict]) -> dict:
    """The default point's test row: the sum threshold with min-entropy (and, for
    Fashion-MNIST, the shipped token-drop server)."""
    return next(r for r in rows if r["policy"] == "attention_sum_threshold"
                and r["measure"] == "min_entropy" and r.get("server", "token drop") == "token drop")


def render_opening(fmnist: dict, cluttered: dict) -> str:
    """README's opening table: both shipped pairs side by side, from their results JSON."""
    plain, busy = default_row(fmnist["rows"]), cluttered["default_test"]
    server_alone = next(r["collab_acc"] for r in fmnist["rows"] if r["policy"] == "all patches")

    def sent_share(row: dict) -> str:
        return f"{100 * row['sent_images'] / row['images']:.0f} %"

    lines = [
        "| on 10,000 test images | Fashion-MNIST | cluttered Fashion-MNIST |",
        "|---|---:|---:|",
        f"| edge alone | {fmnist['edge_alone']:.2f} % | {cluttered['edge_alone']:.2f} % |",
        f"| server alone, every patch | {server_alone:.2f} % | {cluttered['server_alone']:.2f} % |",
        f"| **collaborative** | **{plain['collab_acc']:.2f} %** | **{busy['collab_acc']:.2f} %** |",
        f"| communication cost | {plain['comm_cost']:.3f} | {busy['comm_cost']:.3f} |",
        f"| images sent to the server | {sent_share(plain)} | {sent_share(busy)} |",
        f"| patches per sent image (of 49) | {plain['sent_tokens']:.1f} | "
        f"{busy['sent_tokens']:.1f} |",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.1,
                        help="communication cost budget on validation (default: %(default)s)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--json", type=Path,
                        default=REPO / "benchmarks" / "cluttered_results.json")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "findings" / "cluttered")
    parser.add_argument("--deploy", type=Path,
                        default=REPO / "benchmarks" / "deploy_results_cluttered.json",
                        help="scripts/deploy_table.py --data-set fmnist-cluttered's results, for "
                        "the bytes target")
    parser.add_argument("--bytes-only", action="store_true",
                        help="only take the bytes from --deploy into the results already in "
                        "--json (the deploy table runs at the point the full run ships)")
    parser.add_argument("--slice-only", action="store_true",
                        help="only measure the test slice into the results already in --json")
    args = parser.parse_args()
    if args.slice_only:
        results = json.loads(args.json.read_text())
        results["slice"] = FMNIST_RESULTS.eval_slice("fmnist-cluttered")
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

    if args.bytes_only:
        results = json.loads(args.json.read_text())
    else:
        edge_model = vit.create_vit(zoo.CLUTTERED_EDGE)
        server_model = vit.create_vit(zoo.CLUTTERED_SERVER, server=True)
        val_data = ClutteredFashionMNIST(split="val")
        test_data = ClutteredFashionMNIST(split="test")
        results = measure(edge_model, server_model, val_data, test_data, args.budget)
        FMNIST_RESULTS.ship_operating_point(
            results["default"], args.budget, zoo.CLUTTERED_EDGE, zoo.CLUTTERED_SERVER,
            "scripts/cluttered_results.py", "the validation canvases")
        results["slice"] = FMNIST_RESULTS.eval_slice("fmnist-cluttered")
        results["provenance"] = {
            "script": "scripts/cluttered_results.py", "edge": zoo.CLUTTERED_EDGE,
            "server": zoo.CLUTTERED_SERVER, "seed": 0,
            "data": "fmnist-cluttered val (choice) and test (report), default ClutterSpec",
            **versions(),
        }  # fmt: skip
    results["bytes"] = None
    if args.deploy.is_file():
        deploy = json.loads(args.deploy.read_text())
        point = deploy["operating_point"]
        if (point["masking_th"], point["uncer_th"]) == (results["default"]["delta"],
                                                        results["default"]["eta"]):
            results["bytes"] = {"share": script("deploy_table").png_share(deploy),
                                "source": str(args.deploy.relative_to(REPO))}  # fmt: skip
        else:
            print(f"{args.deploy} was measured at another operating point: rerun "
                  "scripts/deploy_table.py --data-set fmnist-cluttered, then --bytes-only")
    results["targets"] = targets(results)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.figures.mkdir(parents=True, exist_ok=True)
    plots.save(selection_figure(results), args.figures / "selection", ("png",))
    plots.save(recall_figure(results), args.figures / "recall", ("png",))
    write_block(args.readme, "cluttered-results", render(results))
    fmnist = json.loads((REPO / "benchmarks" / "fmnist_results.json").read_text())
    write_block(args.readme, "opening", render_opening(fmnist, results))
    write_blocks(args.readme, opening_blocks(default_row(fmnist["rows"]), fmnist, results))
    for row in results["targets"]:
        print(f"{'holds' if row['holds'] else 'MISSES'}: {row['target']}: {row['measured']}")


if __name__ == "__main__":
    main()
