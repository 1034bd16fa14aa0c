"""The benchmark suite: every benchmark in turn, each in a fresh process, then the targets.

    python -m benchmarks            # rewrites benchmarks/RESULTS.md (about 40 min on 2 cores)
    python -m benchmarks --quick    # a smoke run of every harness (CI), into a temporary file
    python -m benchmarks --only bench_eval bench_codec
    python -m benchmarks --only bench_gpu   # on a machine with a GPU: the GPU figures

Each benchmark rewrites its own section of the results file and hands its headline figures
back as JSON, kept beside the results file (figures/NAME.json); this writes the "Targets"
section at the top from the latest figures of every benchmark, so that `--only` reruns some
and keeps the rest. ``make bench-sweep``
and ``make bench-train`` stay separate (they take long and answer other questions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS, load_average, machine_lines, within

SUITE = ("bench_forward", "bench_eval", "bench_compute", "bench_codec", "bench_serve", "bench_data",
         "bench_onnx_edge", "bench_overload", "bench_adaptive", "bench_ray", "bench_precision",
         "bench_gpu", "bench_train_ddp")
SECTION_START = "<!-- targets:start (written by python -m benchmarks) -->"
SECTION_END = "<!-- targets:end -->"


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def adaptive_rows(results: dict) -> list[str]:
    """The budget targets of bench_adaptive: budget held, no worse than offline, graceful
    under a drop to a tenth, and the burst."""
    a, f = results["adaptive"], results["fixed"]
    budget = a["budget"]
    worst = max(abs(b / budget - 1) for b in a["held_windows"]) if a["held_windows"] else 1.0
    gap = a["steady_accuracy"] - a["offline_accuracy_at_cost"]
    ratio = f["drop_loss"] / a["drop_loss"] if a["drop_loss"] > 0 else float("inf")
    return [f"| budget held: worst 10 s window off the budget | {100 * worst:.1f} % | <= 5 % | "
            f"{verdict(worst <= 0.05)} | |",
            f"| budgeted accuracy − the offline frontier's at its cost | {gap:+.2f} pt | "
            f">= -0.2 pt | {verdict(gap >= -0.2)} | |",
            f"| accuracy lost with the link at a tenth, fixed / budgeted | {ratio:.1f}x | >= 3x | "
            f"{verdict(ratio >= 3)} | the frontier allows about {a['ratio_bound']:.1f}x |",
            f"| budgeted p99 latency with the link at a tenth | {a['drop_p99_ms']:,.0f} ms | "
            f"<= the deadline, {1000 * a['deadline']:,.0f} ms | "
            f"{verdict(a['drop_p99_ms'] <= 1000 * a['deadline'])} | fixed clients: "
            f"{f['drop_p99_ms']:,.0f} ms |",
            f"| budgeted images lost in the 2x burst | {a['lost_images']} | 0 | "
            f"{verdict(a['lost_images'] == 0)} | |",
            f"| server queue peak in the burst / its bound | {a['queue_peak']:.0f} / "
            f"{a['queue_bound']} | <= 1 | {verdict(a['queue_peak'] <= a['queue_bound'])} | |",
            f"| server throughput in the burst / its capacity | "
            f"{100 * a['burst_served_share']:.0f} % | >= 90 % | "
            f"{verdict(a['burst_served_share'] >= 0.9)} | |"]  # fmt: skip


def fixed_share(kept_rows: list[dict], mode: str) -> float:
    """The part of the whole-image server time that does not shrink with the tokens kept:
    the intercept of time(k) / time(N) fitted linearly on the token share (k + p) / (N + p)."""
    fit = statistics.linear_regression([row["bound_fraction"] for row in kept_rows],
                                       [row[f"{mode}_ratio"] for row in kept_rows])  # fmt: skip
    return fit.intercept


def target_rows(figures: dict) -> list[str]:
    """One row per target: what is measured, the figure, the target, met or not, and what
    bounds the figure, from the same run."""
    rows = []
    if "bench_eval" in figures:
        for name, r in figures["bench_eval"].items():
            speed, share = {"deit": (1.2, 0.90), "fmnist": (2.5, 0.75)}[name]
            fraction = r["forward_fraction"]
            rows.append(f"| eval throughput / reference loop, {name} | {r['speedup']:.2f}x | "
                        f">= {speed}x | {verdict(r['speedup'] >= speed)} | the forwards take "
                        f"{100 * fraction:.1f} % of the time: {r['speedup'] / fraction:.2f}x "
                        "if nothing else took any |")  # fmt: skip
            for batch, runs in r["memory"].items():
                ours, ref = runs["collabvit"], runs["reference"]
                above = {k: max(run["peak_mb"] - run["loaded_mb"], 0.0) for k, run in runs.items()}
                whole = ours["peak_mb"] / ref["peak_mb"]
                work = above["collabvit"] / max(above["reference"], 1e-9)
                rows.append(f"| peak RSS / reference's, {name}, batch {batch}: whole process "
                            f"(above loaded models and data) | {whole:.2f} ({work:.2f}) | "
                            f"<= 0.25 | {verdict(whole <= 0.25)} ({verdict(work <= 0.25)}) | "
                            f"loaded process alone {ours['loaded_mb'] / ref['peak_mb']:.2f} "
                            f"(plain forwards {above['plain'] / max(above['reference'], 1e-9):.2f})"
                            " |")  # fmt: skip
            rows.append(f"| eval wall time inside model forwards, {name} | "
                        f"{100 * fraction:.1f} % | >= {100 * share:.0f} % | "
                        f"{verdict(fraction >= share)} | |")  # fmt: skip
    if "bench_compute" in figures:
        c = figures["bench_compute"]
        for name, m in c["models"].items():
            rate = m["rates"]["server classify (all patches)"]["gflops"] / c["matmul_gflops"]
            if name.startswith("deit"):
                rows.append(f"| server forward GFLOP/s / matmul GFLOP/s, {name} | "
                            f"{100 * rate:.0f} % | >= 80 % | {verdict(rate >= 0.8)} | |")
            for mode in ("batched", "single"):
                worst = max(m["kept"], key=lambda row: row[f"{mode}_ratio"] / row["bound_fraction"])
                ok = all(row[f"{mode}_met"] for row in m["kept"])
                ratio, bound = worst[f"{mode}_ratio"], 1.1 * worst["bound_fraction"]
                rows.append(f"| server time at k / at N, {mode}, {name}: worst k = "
                            f"{worst['kept']} | {ratio:.3f} | <= {bound:.3f} | {verdict(ok)} "
                            f"(all k) | a part that does not shrink with k: "
                            f"{fixed_share(m['kept'], mode):.2f} of the whole-image time |")
            latency = m["latency"]["ratio"]
            rows.append(f"| batch-1 latency / two plain forwards, {name} | {latency:.3f} | "
                        f"<= 1.1 | {verdict(latency <= 1.1)} | |")  # fmt: skip
    if "bench_serve" in figures:
        s = figures["bench_serve"]
        served, batching = s["batched"] / s["in_process"], s["batched"] / s["unbatched"]
        handling_ms = 1000 * (1 / s["batched"] - 1 / s["in_process"])
        rows += [f"| served / in-process throughput | {served:.2f} | >= 0.7 | "
                 f"{verdict(served >= 0.7)} | {handling_ms:.2f} ms of HTTP handling per "
                 "request, not overlapped with the model at 32 clients on batches of 32 |",
                 f"| served with 2 workers x 1 thread / in-process | "
                 f"{s['workers'] / s['in_process']:.2f} | >= 0.7 | "
                 f"{verdict(s['workers'] / s['in_process'] >= 0.7)} | |",
                 f"| served with batching / without | {batching:.2f}x | >= 2x | "
                 f"{verdict(batching >= 2)} | |"]  # fmt: skip
    if "bench_ray" in figures:
        r = figures["bench_ray"]
        rows += [f"| images lost with a replica killed mid-run (2 replicas on Ray Serve) | "
                 f"{r['kill_lost']} | 0 | {verdict(r['kill_lost'] == 0)} | {r['kill_retried']} "
                 f"retried; a new replica answered {r['kill_whole_after_s']:.1f} s after "
                 "the kill |",
                 f"| Ray, 1 replica / direct `collabvit serve`, 1 thread (informational) | "
                 f"{r['proxied'] / r['direct']:.2f} | | | {r['proxy_ms']:.2f} ms of proxy per "
                 "request |"]  # fmt: skip
    if "bench_precision" in figures:
        rows += precision_rows(figures["bench_precision"])
    if "bench_gpu" in figures:
        rows += gpu_rows(figures["bench_gpu"])
    for model, r in figures.get("bench_train_ddp", {}).get("measured", {}).items():
        rows.append(f"| training images/s, 2 processes x 1 thread / 1 x 2 threads, {model} "
                    f"(informational) | {r['ratio']:.2f}x | | | |")
    if "bench_forward" in figures:
        f = figures["bench_forward"]
        rows.append(f"| edge `mean` step / plain `model(x)` | {f['edge_mean_over_plain']:.3f} | "
                    f"<= 1.05 | {verdict(f['edge_mean_over_plain'] <= 1.05)} | |")  # fmt: skip
    if "bench_data" in figures:
        worst = max(figures["bench_data"]["shares"].items(), key=lambda item: item[1])
        rows.append(f"| composing cluttered canvases / a training step, {worst[0]} | "
                    f"{100 * worst[1]:.1f} % | <= 5 % | {verdict(worst[1] <= 0.05)} | |")
    if "bench_overload" in figures:
        o = figures["bench_overload"]
        load, hostile = o["overload"], o["hostile"]
        rows += [f"| images lost under overload (back-to-back clients) | {load['lost']} | 0 | "
                 f"{verdict(load['lost'] == 0)} | {load['refused']:,} refused with 503, "
                 f"{load['retry_after']:,} of them with Retry-After |",
                 f"| hostile 16 MiB body refused | {hostile['answer_ms']:.1f} ms | <= 50 ms | "
                 f"{verdict(hostile['answer_ms'] <= 50)} | {hostile['status']} |",
                 f"| slowest liveness probe during it | {hostile['slowest_probe_ms']:.1f} ms | "
                 f"<= 50 ms | {verdict(hostile['slowest_probe_ms'] <= 50)} | |",
                 f"| images of departed clients computed | "
                 f"{o['departed']['sent'] - o['departed']['dropped']:.0f} | 0 | "
                 f"{verdict(o['departed']['dropped'] == o['departed']['sent'])} | |",
                 f"| bfloat16 server: largest accuracy change | {o['bf16_largest_change']:.2f} pt"
                 f" | informational (default on only if <= 0.1) | | |"]  # fmt: skip
        rows += overload_attack_rows(o)
    if "bench_adaptive" in figures:
        rows += adaptive_rows(figures["bench_adaptive"]["results"])
    if "bench_onnx_edge" in figures:
        o = figures["bench_onnx_edge"]
        torch_ms = o["latency_ms"]["torch fp32"]
        for name, target in (("onnx fp32", 0.5), ("onnx int8", 0.35)):
            ratio = o["latency_ms"][name] / torch_ms
            rows.append(f"| batch-1 latency / the torch edge's, {name}, 1 thread | {ratio:.2f} | "
                        f"<= {target} | {verdict(ratio <= target)} | |")  # fmt: skip
        for name, mb in o["sizes_mb"].items():
            if name.startswith("light"):
                rows.append(f"| install size, {name} | {mb:.0f} MB | <= 150 MB | "
                            f"{verdict(mb <= 150)} | |")  # fmt: skip
        for name, seconds in o["cold_start_s"].items():
            if name.startswith("light"):
                rows.append(f"| cold start to the first answer, {name} | {seconds:.2f} s | "
                            f"<= 1 s | {verdict(seconds <= 1)} | |")  # fmt: skip
    return rows


def precision_rows(p: dict) -> list[str]:
    """bench_precision's targets: eval at each lower precision against the float32 reference
    loop on the DeiT sizes, and served images/s against float32 served; what bounds both is
    how much faster this CPU multiplies matrices in bfloat16 than in float32."""
    served, in_process = p["server"]["served"], p["server"]["in_process"]
    matmul = p.get("matmul_gflops", {})
    bound = (f"; bfloat16 / float32 matmul GFLOP/s on this CPU: "
             f"{matmul['bfloat16'] / matmul['float32']:.2f}x" if matmul else "")
    rows = []
    for precision in ("bfloat16", "int8"):
        deit = p["eval"]["deit"]["over_reference"][precision]
        ratio = served[precision] / served["float32"]
        rows += [f"| eval throughput / reference loop (float32), deit, {precision} | "
                 f"{deit:.2f}x | >= 2.5x | {verdict(deit >= 2.5)} | float32: "
                 f"{p['eval']['deit']['over_reference']['float32']:.2f}x{bound} |",
                 f"| served images/s, {precision} / float32 (shipped Fashion-MNIST server) | "
                 f"{ratio:.2f}x | >= 2.5x | {verdict(ratio >= 2.5)} | in-process "
                 f"{in_process[precision] / in_process['float32']:.2f}x{bound} |"]
    changes = [(abs(report[scope][precision]["figures"][figure]["change"]), data_set, precision)
               for data_set, report in p.get("accuracy", {}).items()
               for scope in ("both",) for precision in report[scope]
               for figure in ("collab_acc", "client_acc")]  # fmt: skip
    for precision in sorted({c[2] for c in changes}):
        worst = max(c for c in changes if c[2] == precision)
        rows.append(f"| largest accuracy change, {precision} (both models), shipped pairs, "
                    f"every test image | {worst[0]:.2f} pt | <= 0.1 pt | "
                    f"{verdict(worst[0] <= 0.1)} | {worst[1]} |")
    return rows


def gpu_rows(g: dict) -> list[str]:
    """bench_gpu's figures (informational: the targets are this CPU's), or that none ran."""
    if not g.get("ran"):
        return ["| GPU eval and server figures | not measured | | | no GPU at hand |"]
    rows = [f"| GPU eval throughput / reference loop (float32), deit, batch 256, {precision} "
            f"(informational) | {ratio:.2f}x | | | |"
            for precision, ratio in g["eval"]["over_reference"].items()]
    rows += [f"| GPU server in-process images/s, {precision} / float32, deit_base "
             f"(informational) | {rate / g['server']['float32']:.2f}x | | | |"
             for precision, rate in g["server"].items() if precision != "float32"]
    return rows


def overload_attack_rows(o: dict) -> list[str]:
    """The targets of bench_overload's attacks: idle sockets, JSON built to be slow to
    parse, stalled uploads."""
    idle = o["idle_sockets"][0]
    at_once = o["json_bodies"]["at_once"]
    stalled = o["stalled_uploads"]
    growth = stalled["rss_peak_mb"] - stalled["rss_before_mb"]
    return [f"| liveness probes answered 200 with {idle['sockets']} idle sockets held | "
            f"{idle['probes'] - idle['failed']} / {idle['probes']} | all | "
            f"{verdict(idle['failed'] == 0)} | |",
            f"| slowest of them | {idle['max_ms']:.1f} ms | <= 50 ms | "
            f"{verdict(idle['max_ms'] <= 50)} | |",
            f"| slowest liveness probe during three 16 MiB JSON bodies | "
            f"{at_once['max_ms']:.1f} ms | <= 100 ms | {verdict(at_once['max_ms'] <= 100)} | |",
            f"| server memory growth under {stalled['connections']} stalled 16 MiB uploads | "
            f"{growth:,.0f} MB | <= 512 MB (`--max-queue-mb`) | {verdict(growth <= 512)} | "
            f"{stalled['offered_mb']:,.0f} MiB offered |"]  # fmt: skip


def render(figures: dict, args: argparse.Namespace, elapsed: float, load_at_start: str) -> str:
    lines = [
        SECTION_START,
        "## Targets (`python -m benchmarks`)",
        "",
        "Every figure below comes from the sections that follow, each from its benchmark's "
        "latest run (its section gives the date; `python -m benchmarks --only NAME` reruns one "
        "and rewrites this table with the stored figures of the rest)" +
        (" in --quick mode (tiny sizes: these figures say nothing about speed)"
         if args.quick else "") + ".",  # fmt: skip
        "",
        "| measured | figure | target | | what bounds it (same run) |",
        "|---|---:|---:|---|---|",
        *target_rows(figures),
        "",
        "Machine:",
        "",
        *machine_lines(args.threads, load_at_start),
        f"- total suite time: {elapsed:.0f} s",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def write_at_top(path: Path, section: str) -> None:
    """Replace the targets section, or put it right after the file's opening paragraph."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        text = text[:start] + section + "\n" + text[end + len(SECTION_END) :].lstrip("\n")
    else:
        first = text.find("<!-- ")
        first = len(text) if first == -1 else first
        text = text[:first].rstrip("\n") + "\n\n" + section + "\n" + text[first:]
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repetition: checks every harness, not the speed")
    parser.add_argument("--only", nargs="+", choices=SUITE, default=None,
                        help="these benchmarks (default: all; without a GPU, bench_gpu "
                             "writes that none was at hand, and under --quick it runs on "
                             "the CPU)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results file (default: {RESULTS}; --quick: a temporary file)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the forwards")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = (Path(tempfile.mkdtemp(prefix="collabvit-bench-")) / "RESULTS.md"
                       if args.quick else RESULTS)  # fmt: skip
    if args.only is None:
        args.only = list(SUITE)
    threaded = {"bench_forward", "bench_eval", "bench_compute"}
    began, load_at_start = time.perf_counter(), load_average()
    stored = args.output.parent / "figures"
    stored.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        json_path = stored / f"{name}.json"
        command = [sys.executable, "-m", f"benchmarks.{name}", "--output", within(args.output),
                   "--json", within(json_path)]  # fmt: skip
        command += ["--quick"] if args.quick else []
        command += ["--threads", str(args.threads)] if name in threaded else []
        print(f"== {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    figures = {path.stem: json.loads(path.read_text()) for path in sorted(stored.glob("*.json"))
               if path.stem in SUITE}  # fmt: skip
    section = render(figures, args, time.perf_counter() - began, load_at_start)
    write_at_top(args.output, section)
    print(section)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as error:
        sys.exit(f"benchmark failed: {' '.join(error.cmd)} (exit status {error.returncode})")
