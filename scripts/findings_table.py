"""The README's findings tables, rendered from the sweeps in docs/findings/*/sweep.json.

    python scripts/findings_table.py [--table NAME ...] [--readme README.md]
        [--findings docs/findings]

`make findings` runs the three Fashion-MNIST sweeps and `make findings-cluttered` the one
on cluttered canvases; each copies its sweep.json and figures into docs/findings/ and then
runs this script, which writes the table between that table's markers in README.md.
tests/test_readme_numbers.py checks that README's tables are exactly what this renders from
the committed JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from readme_block import write_block

REPO = Path(__file__).resolve().parents[1]
# (comparison, sweep folder, [(row label, series label in sweep.json's comparison)])
ROWS = (
    ("attention (sum threshold, min-entropy)", "attention", (
        ("mean", "mean · attention_sum_threshold · min_entropy"),
        ("rollout", "rollout · attention_sum_threshold · min_entropy"),
    )),
    ("selection (mean, min-entropy)", "policies", tuple(
        (policy, f"mean · {policy} · min_entropy")
        for policy in ("attention_sum_threshold", "attention_threshold", "topk", "random")
    )),
    ("uncertainty (mean, sum threshold)", "measures", tuple(
        (measure, f"mean · attention_sum_threshold · {measure}")
        for measure in ("min_entropy", "shannon_entropy", "margin")
    )),
)  # fmt: skip
# The cluttered canvases: one sweep over every attention mode, policy and measure.
CLUTTERED_ROWS = (
    ("attention (sum threshold, min-entropy)", "cluttered_frontier", (
        ("mean", "mean · attention_sum_threshold · min_entropy"),
        ("rollout", "rollout · attention_sum_threshold · min_entropy"),
    )),
    *((f"selection ({mode}, min-entropy)", "cluttered_frontier", tuple(
        (policy, f"{mode} · {policy} · min_entropy")
        for policy in ("attention_sum_threshold", "attention_threshold", "topk", "random")
    )) for mode in ("mean", "rollout")),
    ("uncertainty (mean, sum threshold)", "cluttered_frontier", tuple(
        (measure, f"mean · attention_sum_threshold · {measure}")
        for measure in ("min_entropy", "shannon_entropy", "margin")
    )),
)  # fmt: skip
# README marker name -> the rows of its table
TABLES = {"findings-table": ROWS, "cluttered-findings-table": CLUTTERED_ROWS}


def render(findings: Path, table: str = "findings-table") -> str:
    """The markdown table: each series' best accuracy at each cost, the best per group bold."""
    lines = []
    costs = None
    for comparison, folder, rows in TABLES[table]:
        report = json.loads((findings / folder / "sweep.json").read_text())
        table = dict(report["comparison"])
        rows = list(rows)
        for fit in report.get("temperature", {}).values():
            suffix = f"T={fit['temperature']:.2f}"
            rows.append((f"min_entropy, temperature-scaled (T = {fit['temperature']:.2f})",
                         f"mean · attention_sum_threshold · min_entropy · {suffix}"))  # fmt: skip
        if costs is None:
            costs = list(table[rows[0][1]])
            lines += ["| comparison | series | " + " | ".join(f"cost ≤ {c}" for c in costs)
                      + " |", "|---|---|" + "---:|" * len(costs)]  # fmt: skip
        best = {c: max(table[series][c] or 0.0 for _, series in rows) for c in costs}
        for position, (label, series) in enumerate(rows):
            cells = []
            for cost in costs:
                value = table[series][cost]
                text = "-" if value is None else f"{value:.2f}"
                cells.append(f"**{text}**" if value is not None and value == best[cost] else text)
            name = comparison if position == 0 else ""
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", nargs="+", choices=sorted(TABLES), default=["findings-table"])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--findings", type=Path, default=REPO / "docs" / "findings")
    args = parser.parse_args()
    for table in args.table:
        write_block(args.readme, table, render(args.findings, table))


if __name__ == "__main__":
    main()
