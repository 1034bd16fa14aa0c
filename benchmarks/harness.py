"""What every benchmark shares: interleaved timing, the machine's description and the
results file, in which each benchmark owns one section."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from collabvit import cpu_model

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = RESULTS.parents[1]


@dataclass
class Timings:
    """Wall-clock seconds of each variant, one entry per repetition."""

    seconds: dict[str, list[float]]

    def median_ms(self, name: str) -> float:
        return 1000.0 * statistics.median(self.seconds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Ratio of the medians."""
        return self.median_ms(name) / self.median_ms(baseline)

    def min_ratio(self, name: str, baseline: str) -> float:
        """Ratio of the fastest repetitions (contention only ever adds time)."""
        return min(self.seconds[name]) / min(self.seconds[baseline])

    def paired_ratios(self, name: str, baseline: str) -> list[float]:
        """Per-repetition ratios (the two were timed back to back)."""
        return [a / b for a, b in zip(self.seconds[name], self.seconds[baseline], strict=True)]


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int) -> Timings:
    """Time each variant `repeats` times, alternating variants within every repetition.

    The order of the variants rotates from one repetition to the next, so no
    variant always runs first (or always right after the same other one).
    Warm-up calls run every variant `warmup` times and are not recorded.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
        done = ", ".join(f"{n} {1000 * seconds[n][-1]:.0f} ms" for n in names)
        print(f"  rep {rep + 1}/{repeats}: {done}", file=sys.stderr, flush=True)
    return Timings(seconds)


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_lines(threads: int, load_at_start: str) -> list[str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- CPU: {cpu_model()}; {os.cpu_count()} logical cores ({usable} usable by this process)",
        f"- torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
        f"- torch threads: {threads}",
        f"- date: {now}",
        f"- load average (1, 5, 15 min): {load_at_start} at the start, {load_average()} at the "
        "end (this benchmark alone adds about its thread count)",
    ]


def markers(name: str) -> tuple[str, str]:
    """The comments that open and close benchmark `name`'s section of the results file."""
    return f"<!-- {name}:start (written by benchmarks/{name}.py) -->", f"<!-- {name}:end -->"


def within(path: Path | str) -> str:
    """`path` relative to the repository's root when it lies inside it (the commands each
    section records then hold no machine's folders), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(REPO.resolve()))
    except ValueError:
        return str(path)


def rerun_command(name: str, argv: list[str]) -> str:
    """The command that reruns benchmark `name` from the repository's root with the
    arguments `argv`: paths inside the repository relative to it, and an option whose file
    lies outside it (a temporary file of that run, such as the suite's --json) left out,
    so that the command holds no machine's folders."""
    kept: list[str] = []
    for argument in argv:
        option, equals, value = argument.partition("=") if argument.startswith("--") \
            else ("", "", argument)  # fmt: skip
        if not value.startswith("/"):
            kept.append(argument)
            continue
        relative = within(value)
        if relative.startswith("/"):  # outside the repository: drop it with its option
            if not equals and kept and kept[-1].startswith("--"):
                kept.pop()
            continue
        kept.append(f"{option}={relative}" if equals else relative)
    return shlex.join(["python", "-m", f"benchmarks.{name}", *kept])


def section(name: str, title: str, body: list[str], load_at_start: str,
            elapsed: float | None = None) -> str:  # fmt: skip
    """Benchmark `name`'s results section: its title and body, then how to rerun it (this
    process's own arguments, rerun_command) and the machine it ran on."""
    start, end = markers(name)
    command = rerun_command(name, sys.argv[1:])
    lines = [start, f"## {title} (`{name}.py`)", "", *body, "", "Regenerate with:", "", "```",
             command, "```", "", "Machine:", "",
             *machine_lines(torch.get_num_threads(), load_at_start)]  # fmt: skip
    if elapsed is not None:
        lines.append(f"- total benchmark time: {elapsed:.0f} s")
    return "\n".join([*lines, end]) + "\n"


def fmt_ratio(timings: Timings, name: str, baseline: str) -> tuple[str, ...]:
    paired = timings.paired_ratios(name, baseline)
    return (
        f"{timings.median_ms(name):.1f}",
        f"{timings.median_ms(baseline):.1f}",
        f"**{timings.ratio(name, baseline):.3f}**",
        f"{statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]",
        f"{timings.min_ratio(name, baseline):.3f}",
    )


def write_section(path: Path, section: str, start_marker: str, end_marker: str) -> None:
    """Replace one script's section of `path` (or append it, or create the file)."""
    if path.exists():
        text = path.read_text()
        start, end = text.find(start_marker), text.find(end_marker)
        if start != -1 and end > start:
            rest = text[end + len(end_marker) :].lstrip("\n")
            text = text[:start] + section + ("\n" + rest if rest else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = (
            "# Benchmark results\n\n"
            "Each benchmark script in `benchmarks/` owns one section below and rewrites "
            "only that section.\n\n" + section
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _status_kib(field: str, pid: int | str = "self") -> int:
    """A memory figure of a process (default: this one) from /proc/PID/status, in KiB
    (Linux); OSError when it has none (a process that has exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/{pid}/status has no {field}")


def current_rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (default: this one) now, in MB (Linux)."""
    return _status_kib("VmRSS", pid) / 1024


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Start the peak-RSS record of a process (default: this one) afresh from its current
    RSS (Linux >= 4.0: clear_refs 5), so that the peak of a measured section is not the peak
    of loading models before it. False where the kernel does not allow it (the peak then
    includes the loading)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (default: this one) since it started or the last
    reset_peak_rss, in MB."""
    return _status_kib("VmHWM", pid) / 1024


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark shares with the suite (python -m benchmarks)."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repetition: checks the harness, not the speed; "
                             "writes no results file unless --output is given")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None,
                        help=f"results file whose section this rewrites (default: {RESULTS})")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the headline figures as JSON (the suite reads them)")


def apply_quick(args: argparse.Namespace, **small) -> argparse.Namespace:
    """Under --quick, replace the named settings by small ones; else default the output."""
    if args.quick:
        for name, value in small.items():
            setattr(args, name, value)
    elif args.output is None:
        args.output = RESULTS
    return args


def publish(args: argparse.Namespace, name: str, text: str, figures: dict | None = None) -> None:
    """Print benchmark `name`'s section, write it into the results file, its figures to JSON."""
    print(text)
    if args.output is not None:
        write_section(args.output, text, *markers(name))
        print(f"wrote {args.output}", file=sys.stderr)
    if args.json is not None and figures is not None:
        args.json.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


def batched_calls(variants: dict[str, Callable[[], object]],
                  min_seconds: float) -> tuple[dict[str, Callable[[], object]], int]:  # fmt: skip
    """Variants that each make `calls` calls, so that one timed repetition of the slowest
    lasts at least `min_seconds` (a few ms per call is below what one timing resolves on a
    busy machine). Returns the wrapped variants and `calls`; divide their times by it."""
    slowest = 0.0
    for variant in variants.values():
        variant()  # warm-up
        start = time.perf_counter()
        variant()
        slowest = max(slowest, time.perf_counter() - start)
    calls = max(1, math.ceil(min_seconds / max(slowest, 1e-9)))

    def repeat(variant: Callable[[], object]) -> Callable[[], object]:
        def run() -> None:
            for _ in range(calls):
                variant()

        return run

    return {name: repeat(variant) for name, variant in variants.items()}, calls
