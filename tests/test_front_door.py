"""What a new user meets first: the README's promises about `collabvit serve`, `visualize`,
budgets and the benchmark results, checked against what the commands do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import free_port
from readme_block import markers

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def between(text: str, start: str, end: str) -> str:
    assert start in text and end in text, f"missing the {start!r} markers"
    return text.split(start, 1)[1].split(end, 1)[0]


# ------------------------------------------------------------------ serve --data-set


def test_serve_data_set_serves_that_data_sets_shipped_server(run_cli, monkeypatch,
                                                             models_built_once):
    """`collabvit serve --data-set fmnist-cluttered` loads and serves the cluttered server
    (the listening itself is replaced: the model is what the flag chooses)."""
    import collabvit.serve.app

    served = {}
    monkeypatch.setattr(collabvit.serve.app, "serve",
                        lambda settings, *args, **options: served.update(
                            name=settings.model_name, worker=options["worker"]))  # fmt: skip
    result = run_cli("serve", "--data-set", "fmnist-cluttered", "--port", str(free_port()))
    assert result.returncode == 0, result.stderr
    assert served["name"] == served["worker"]["model"]["name"] == "collabvit_cluttered_server"
    assert "/v2/models/collabvit_cluttered_server" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--data-set", "fmnist-cluttered", "--server-model", "collabvit_fmnist_server"],
     "--data-set fmnist-cluttered serves collabvit_cluttered_server, but --server-model says "
     "collabvit_fmnist_server: give one of them"),
    (["--data-set", "imagenet"], "no server is shipped for --data-set imagenet"),
])  # fmt: skip
def test_serve_data_set_mistakes_are_one_line(run_cli, args, message):
    result = run_cli("serve", *args, "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_serve_help_and_readme_name_the_data_set_flag(run_cli):
    """The help's promise ('where --data-set fmnist-cluttered is given') holds for serve,
    and the README's deploy section shows the cluttered pair served that way."""
    result = run_cli("serve", "--help")
    assert "--data-set {fmnist,fmnist-cluttered,imagenet,tensors}" in result.stdout
    deploy = README.split("## Deploy: `collabvit serve` and `collabvit edge`", 1)[1]
    assert "collabvit serve --data-set fmnist-cluttered" in deploy.split("\n## ", 1)[0]


# ------------------------------------------------------------------ visualize


def test_visualize_prints_the_gates_decision_and_the_items_patches(run_cli, tmp_path,
                                                                   models_built_once):
    """At the pair's operating point canvas 0 stays at the edge and canvas 6 is sent: only
    the sent one gets a server's answer, both say how much of their item the selection
    kept; README's example is this very output."""
    example = between(README, *markers("visualize-example")).strip().strip("`").strip()
    command, *expected = example.splitlines()
    args = command.removeprefix("$ collabvit ").split()
    out = tmp_path / "vis"
    result = run_cli(*args[:-1], str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.replace(str(out), args[-1]).splitlines()
    assert lines == expected
    kept, sent = lines[0], lines[1]
    assert "answered at the edge (min_entropy" in kept and "server on" not in kept
    assert re.search(r"sent \(min_entropy [\d.]+ >= η 0\.544\): server on \d+/49 patches says",
                     sent)  # fmt: skip
    assert all(re.search(r"; kept \d+ of the item's \d+ patches ->", line) for line in lines[:2])
    assert (out / "00000_masked.png").stat().st_size > 500  # drawn although not sent


# ------------------------------------------------------------------ budgets


@pytest.mark.parametrize("spent, within, text", [
    (0.0525, True, "over the budget by 5.0 %, within the ±19.7 % this controller holds on 600 "
                   "images"),
    (0.0625, False, "over the budget by 25.0 %, beyond the ±19.7 % this controller holds on "
                    "600 images"),
    (0.0375, False, "under the budget by 25.0 %, beyond the ±19.7 %"),
])  # fmt: skip
def test_a_cost_budget_states_its_tolerance_and_says_when_a_run_ends_beyond_it(spent, within,
                                                                               text):
    """600 cluttered canvases at a cost of 0.05 send a share of 0.279: chance alone moves
    the cost by a relative sqrt((1 - s) / (n s)) = 6.6 %, and the controller holds three of
    those."""
    from collabvit.lite.controller import BudgetOutcome, cost_tolerance

    tolerance = cost_tolerance(0.2787, 600)
    assert tolerance == pytest.approx(3 * ((1 - 0.2787) / (600 * 0.2787)) ** 0.5)
    outcome = BudgetOutcome(0.05, spent, tolerance, True, "on 600 images")
    assert outcome.within is within and outcome.text().startswith(text)
    assert outcome.as_dict()["deviation"] == pytest.approx(spent / 0.05 - 1)
    assert cost_tolerance(0.5, 1_000_000) == 0.03  # never tighter than the frontier's 3 %


def test_a_bytes_budget_bounds_only_the_excess_by_the_buckets_head_start():
    from collabvit.lite.controller import BudgetOutcome, bytes_tolerance

    tolerance = bytes_tolerance(1.0, 50.0)  # one second of budget ahead over 50 s
    assert tolerance == pytest.approx(0.02)
    under = BudgetOutcome(3000, 2400, tolerance, False, "over 50.0 s")
    assert under.within and under.text() == ("under the budget by 20.0 %, within the +2.0 % "
                                             "this controller holds over 50.0 s")
    assert not BudgetOutcome(3000, 3090, tolerance, False, "over 50.0 s").within


def test_readme_shows_the_budget_line_the_controller_writes():
    from collabvit.lite.controller import BudgetOutcome, cost_tolerance

    section = README.split("## Budgets that follow the link", 1)[1].split("\n## ", 1)[0]
    line = BudgetOutcome(0.05, 0.0525, cost_tolerance(0.2787, 600), True, "on 600 images")
    assert f"Budget cost 0.05: communication cost 0.0525, {line.text()}; ..." in section


def test_a_run_that_ends_beyond_the_tolerance_says_so(run_cli, tmp_path, models_built_once):
    """A frontier that understates the patches a sent canvas takes (10 of 49 for all 49)
    makes the cost controller send five times what its budget pays for: the budget line and
    the results file say the run ended beyond what the controller holds."""
    frontier = tmp_path / "frontier.json"
    point = {"masking_th": 1.0, "send_share": 0.5, "sent_tokens": 10.0, "num_patches": 49,
             "collab_acc": 90.0, "eta": None}  # fmt: skip
    frontier.write_text(json.dumps({"format": "collabvit-frontier/1", "provenance": {},
                                    "series": [{"attention_mode": "mean",
                                                "policy": "attention_sum_threshold",
                                                "measure": "min_entropy", "images": 100,
                                                "points": [point]}]}))  # fmt: skip
    result = run_cli("eval", "--data-set", "fmnist-cluttered", "--limit", "128", "--quiet",
                     "--budget-cost", "0.02", "--frontier", str(frontier),
                     "--results-file", str(tmp_path / "eval.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert re.match(r"Budget cost 0\.02: communication cost 0\.\d+, over the budget by "
                    r"[\d.]+ %, beyond the ±[\d.]+ % this controller holds on 128 images;", line)
    held = json.loads((tmp_path / "eval.json").read_text())["budget"]
    assert held["within"] is False and held["deviation"] > held["tolerance"] > 0
    assert held["spent"] == json.loads((tmp_path / "eval.json").read_text())["summary"][
        "comm_cost"]


# ------------------------------------------------------------------ benchmark commands


def test_benchmark_results_hold_no_machines_folders():
    """RESULTS.md's 'Regenerate with' commands run from any checkout: no absolute path,
    no temporary folder of the run that wrote them."""
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    assert not [folder for folder in ("/tmp/", "/work/", "/home/") if folder in text]
    commands = re.findall(r"Regenerate with:\n\n```\n(.*?)\n```", text)
    assert len(commands) >= 10 and all(c.startswith("python -m benchmarks.") for c in commands)
    assert not [c for c in commands if any(w.lstrip("-").split("=")[-1].startswith("/")
                                           for w in c.split())]  # fmt: skip


def test_a_benchmarks_rerun_command_is_repository_relative():
    from benchmarks.harness import rerun_command

    argv = ["--output", str(REPO / "benchmarks" / "RESULTS.md"), "--json",
            "/tmp/collabvit-bench-x/bench_eval.json", f"--extra={REPO}/runs/x", "--threads",
            "2"]  # fmt: skip
    assert rerun_command("bench_eval", argv) == ("python -m benchmarks.bench_eval --output "
                                                 "benchmarks/RESULTS.md --extra=runs/x "
                                                 "--threads 2")  # fmt: skip
