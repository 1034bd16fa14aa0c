"""`collabvit reproduce`: the paper's ImageNet run in one command, beside its published figures.

The run is `collabvit eval` at the paper's setting (PAPER, the one place that states it),
done in chunks of whole batches. After each chunk the figures so far (summary.RunningSummary's
counts and exact sums) are saved, so that a run of hours survives an interruption and
`--resume` continues it; since the counts add up exactly and every batch is the one an
uninterrupted run (or `collabvit eval` with the same batch size) would form, the figures do
not depend on where the run was interrupted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from collabvit.config import DataSpec, ModelSpec
from collabvit.lite.specs import PAPER_DELTA, PAPER_ETA, EdgeConfig
from collabvit.lite.summary import RunningSummary, Summary

if TYPE_CHECKING:  # torch is imported when a run starts, not with this module
    from collabvit.models.pair import Pair
    from collabvit.research.evaluate import EvalResult


@dataclass(frozen=True)
class Published:
    """A published run: its models, weights, data and operating point, and its figures."""

    reference: str
    citation: str  # the short form printed beside the figures
    edge_model: str  # timm names
    server_model: str
    edge_weights_url: str  # the weights the figures were measured with
    server_weights_url: str
    data: str
    images: int
    attention_mode: str
    masking_mode: str
    masking_th: float
    uncer_mode: str
    uncer_th: float
    client_acc: float  # %
    collab_acc: float  # %
    comm_cost: float
    sent_tokens: float
    confident_images: int

    def edge_config(self) -> EdgeConfig:
        """The operating point of the run."""
        return EdgeConfig(attention_mode=self.attention_mode, masking_mode=self.masking_mode,
                          masking_th=self.masking_th, uncer_mode=self.uncer_mode,
                          uncer_th=self.uncer_th)  # fmt: skip

    def model_specs(self, edge_weights: str | None, server_weights: str | None,
                    ) -> tuple[ModelSpec, ModelSpec]:  # fmt: skip
        """The edge's and the server's specs with these weights files (None: timm's hub)."""
        return (ModelSpec(name=self.edge_model, weights=edge_weights),
                ModelSpec(name=self.server_model, weights=server_weights))  # fmt: skip


DEIT_RELEASE = "https://dl.fbaipublicfiles.com/deit/"
PAPER = Published(
    reference="Im et al., \"Attention-aware Semantic Communications for Collaborative "
              "Inference\", IEEE Internet of Things Journal, 2024",
    citation="Im et al., IEEE IoT Journal 2024",
    edge_model="deit_tiny_patch16_224", server_model="deit_base_patch16_224",
    edge_weights_url=DEIT_RELEASE + "deit_tiny_patch16_224-a1311bcf.pth",
    server_weights_url=DEIT_RELEASE + "deit_base_patch16_224-b5f2ef4d.pth",
    data="ImageNet-1k val", images=50_000,
    attention_mode="mean", masking_mode="attention_sum_threshold", masking_th=PAPER_DELTA,
    uncer_mode="min_entropy", uncer_th=PAPER_ETA,
    client_acc=72.13, collab_acc=80.23, comm_cost=0.2707, sent_tokens=148.8113,
    confident_images=32171,
)  # fmt: skip


def paper_data(data_path: str, limit: int | None = None, batch_size: int = 64,
               num_workers: int = 0, skip_unreadable: bool = False) -> DataSpec:  # fmt: skip
    """The paper's images: an ImageNet val folder read with DeiT's crop (resize 256, centre
    crop 224, bicubic; data.DEIT_CROP_PCT)."""
    from collabvit.data import DEIT_CROP_PCT

    return DataSpec(data_set="imagenet", data_path=data_path, crop_pct=DEIT_CROP_PCT,
                    limit=limit, batch_size=batch_size, num_workers=num_workers,
                    skip_unreadable=skip_unreadable)  # fmt: skip


# ------------------------------------------------------------------ weights

# What timm's hub holds for a model, the safetensors first (timm.models._hub's file names).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_can_give(name: str) -> bool:
    """Whether timm can load `name`'s pretrained weights without a file: its hub is reachable,
    or (HF_HUB_OFFLINE) they are in the hub's cache."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    from collabvit.models import vit

    if not vit._hub_reachable():
        return False
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    if not constants.HF_HUB_OFFLINE or repo is None:
        return True  # online timm downloads them; without a hub id it tries its own URL
    return any(isinstance(try_to_load_from_cache(repo, file), str) for file in HUB_FILES)


def missing_weights(edge: ModelSpec, server: ModelSpec, published: Published = PAPER,
                    can_give=hub_can_give) -> str | None:  # fmt: skip
    """One line naming the weights files to pass when timm's hub cannot give a model that
    has none; None when both can load."""
    roles = ((edge, "--model-weights", published.edge_weights_url),
             (server, "--server-weights", published.server_weights_url))  # fmt: skip
    missing = [(flag, url) for spec, flag, url in roles
               if spec.weights is None and not can_give(spec.name)]  # fmt: skip
    if not missing:
        return None
    files = " ".join(f"{flag} {url.rsplit('/', 1)[1]}" for flag, url in missing)
    return (f"no weights: timm's hub cannot give them here (offline, and not in its cache); "
            f"pass {files}, the official DeiT release ({', '.join(u for _, u in missing)}), "
            "or .safetensors of the same models")  # fmt: skip


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's content, in hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def run_identity(edge: ModelSpec, server: ModelSpec, data: DataSpec, config: EdgeConfig,
                 seed: int, precision: str = "float32") -> dict:  # fmt: skip
    """What must match for a saved run to be continued: the weights' content (None: the
    hub's), the images and how they are read, the operating point, the seed and the
    precision (named only when not float32, so the states of float32 runs keep theirs).
    The batch size and workers do not change the figures' meaning, so they may differ."""
    def model(spec: ModelSpec) -> dict:
        return {"name": spec.name,
                "sha256": file_sha256(spec.weights) if spec.weights else None}  # fmt: skip

    images = {k: v for k, v in asdict(data).items() if k not in ("batch_size", "num_workers")}
    images["data_path"] = str(Path(data.data_path).resolve()) if data.data_path else None
    parts = dict(edge_model=model(edge), server_model=model(server), data=images,
                 edge=asdict(config), seed=seed,
                 **({"precision": precision} if precision != "float32" else {}))  # fmt: skip
    return json.loads(json.dumps(parts, default=str))  # as a state file holds it


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class Comparison:
    """One figure measured beside the published one."""

    figure: str  # a Summary field, or confident_share (% of the images)
    label: str
    measured: float
    published: float
    decimals: int  # as the paper gives it

    @property
    def difference(self) -> float:
        return self.measured - self.published

    def as_dict(self) -> dict:
        return {**asdict(self), "difference": self.difference}


# (Summary field, label, decimals) of the figures the paper publishes
FIGURES = (
    ("client_acc", "edge-only accuracy (%)", 2),
    ("collab_acc", "collaborative accuracy (%)", 2),
    ("comm_cost", "communication cost", 4),
    ("sent_tokens", "sent token number", 4),
)


def covers_all(summary: Summary, published: Published = PAPER) -> bool:
    """Whether the run measured as many images as the published one."""
    return summary.images == published.images


def compare(summary: Summary, published: Published = PAPER) -> list[Comparison]:
    """Each published figure beside the measured one. The confident images are compared as
    a count over all the published images, otherwise as a share of the images (a count over
    fewer images would look like a large difference)."""
    rows = [Comparison(name, label, getattr(summary, name), getattr(published, name), places)
            for name, label, places in FIGURES]  # fmt: skip
    if covers_all(summary, published):
        rows.append(Comparison("confident_images", "confident images", summary.confident_images,
                               published.confident_images, 0))  # fmt: skip
    else:
        share = 100.0 * summary.confident_images / summary.images if summary.images else 0.0
        rows.append(Comparison("confident_share", "confident images (% of images)", share,
                               100.0 * published.confident_images / published.images, 2))
    return rows


def _signed(value: float, places: int) -> str:
    return f"{round(value, places) or 0.0:+.{places}f}"  # never "-0.00"


def format_comparison(rows: Sequence[Comparison], images: int,
                      published: Published = PAPER) -> str:  # fmt: skip
    """The comparison for people: a table of measured, published and difference (measured
    minus published, of the figures as shown), and over fewer images than the paper's a note
    on what that means."""
    width = max(len(row.label) for row in rows) + 2
    lines = [f"Compared with the paper ({published.citation}; {published.data}, "
             f"{published.images:,} images):",
             f"{'':<{width}}{'measured':>10}{'published':>11}{'difference':>12}"]  # fmt: skip
    for row in rows:
        shown = round(row.measured, row.decimals)
        lines.append(f"{row.label:<{width}}{shown:>10.{row.decimals}f}"
                     f"{row.published:>11.{row.decimals}f}"
                     f"{_signed(shown - row.published, row.decimals):>12}")  # fmt: skip
    if images != published.images:
        p = published.collab_acc / 100.0
        error = 100.0 * math.sqrt(p * (1.0 - p) / images) if images else math.inf
        lines += [f"Note: this run measured {images:,} images, the paper all "
                  f"{published.images:,} of {published.data}: the differences include "
                  "sampling error",
                  f"(one standard error of an accuracy near {published.collab_acc:.0f} % over "
                  f"{images:,} images: {error:.2f} points), and the confident images are "
                  f"compared as a share (the paper's {published.confident_images:,} of "
                  f"{published.images:,})."]  # fmt: skip
    return "\n".join(lines)


def reference_point(published: Published = PAPER):
    """The published operating point, to mark on the frontier (plots.ReferencePoint)."""
    from collabvit.research.plots import ReferencePoint

    return ReferencePoint(f"paper ({published.citation}): {published.collab_acc:.2f} % at "
                          f"cost {published.comm_cost:.4f}", published.comm_cost,
                          published.collab_acc)  # fmt: skip


# ------------------------------------------------------------------ chunks and state

STATE_FORMAT = "collabvit-reproduce-state/1"


class StateError(ValueError):
    """A state file that cannot be continued (a user-facing, one-line reason)."""


def chunk_size(chunk_images: int, batch_size: int) -> int:
    """Images per chunk: `chunk_images` rounded up to whole batches, so that a chunked run
    forms exactly the batches of an unchunked one."""
    return batch_size * -(-chunk_images // batch_size)


def _running_as_json(running: RunningSummary) -> dict:
    """The counts, with the exact sums as "numerator/denominator" strings."""
    return {name: str(value) if isinstance(value, Fraction) else value
            for name, value in asdict(running).items()}  # fmt: skip


def _running_from_json(values: dict) -> RunningSummary:
    exact = {f.name for f in fields(RunningSummary) if isinstance(f.default, Fraction)}
    return RunningSummary(**{name: Fraction(value) if name in exact else value
                             for name, value in values.items()})  # fmt: skip


def save_state(path: str | Path, identity: dict, images: int, done: int,
               running: RunningSummary) -> None:  # fmt: skip
    """Save a run after its first `done` of `images` images, atomically: an interruption
    while writing leaves the previous state in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": STATE_FORMAT, "run": identity, "images": images, "done": done,
                "running": _running_as_json(running)}  # fmt: skip
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        handle.write(json.dumps(document, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # on disk before it replaces the old state
    temporary.replace(path)


def read_state(path: str | Path) -> dict:
    """A state file's content (StateError with one line when it is not one)."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StateError(f"--resume: {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise StateError(f"{path} is not a collabvit reproduce state file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise StateError(f"{path} is not a collabvit reproduce state file")
    return document


def load_state(path: str | Path, identity: dict) -> tuple[int, int, RunningSummary]:
    """A saved run to continue: (images, done, running); StateError when it was made with
    other data, weights or settings."""
    document = read_state(path)
    saved = document.get("run") or {}
    if saved != identity:
        changed = sorted(k for k in set(identity) | set(saved)
                         if identity.get(k) != saved.get(k))  # fmt: skip
        raise StateError(f"{path} is from a run with other {', '.join(changed)}; use another "
                         "--state-file or drop --resume")  # fmt: skip
    try:
        return int(document["images"]), int(document["done"]), \
            _running_from_json(document["running"])  # fmt: skip
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise StateError(f"{path} is damaged ({type(error).__name__}: {error})") from None


# ------------------------------------------------------------------ the run


def run(pair: Pair, config: EdgeConfig, state_file: str | Path, identity: dict,
        resume: bool = False, chunk_images: int = 1000, seed: int = 0,
        progress: bool | None = None) -> EvalResult:  # fmt: skip
    """The collaborative run over the pair's images, chunk by chunk, saving the figures so
    far to `state_file` after each chunk; with `resume`, from where the saved run stopped.

    Returns the result over all the images (`skipped` counts the unreadable ones left out).
    A KeyboardInterrupt leaves the state of the last whole chunk.
    """
    from collabvit.lite.progress import progress_bar
    from collabvit.research.evaluate import EvalResult, evaluate, merge_results

    images = len(pair.dataset)
    edge, server = pair.edge(config), pair.server()
    if resume:
        saved, start, running = load_state(state_file, identity)
        if saved != images:
            raise StateError(f"{state_file} is from a run over {saved:,} images; these data "
                             f"have {images:,}")  # fmt: skip
    else:
        start, running = 0, RunningSummary(num_patches=edge.geometry.num_patches)
        save_state(state_file, identity, images, start, running)
    size = chunk_size(chunk_images, pair.data_spec.batch_size)
    loader = pair.loader(range(start, images))
    batches = progress_bar(loader, "reproduce", total=len(loader), unit="batch",
                           enabled=progress)  # fmt: skip
    result = EvalResult(summary=running.summary(), running=running)
    # batches never straddle chunks (a chunk is whole batches), so each batch's first index
    # tells its chunk, also when a batch of only unreadable images was left out
    for number, chunk in itertools.groupby(batches, key=lambda b: (int(b[2][0]) - start) // size):
        result = merge_results([result, evaluate(edge, server, chunk, seed=seed, progress=False)])
        done = min(start + (number + 1) * size, images)
        save_state(state_file, identity, images, done, result.running)
    save_state(state_file, identity, images, images, result.running)
    return replace(result, skipped=images - result.summary.images)


def unfinished(path: str | Path) -> tuple[int, int] | None:
    """(done, images) of the run saved in `path` when it has done some of its images but not
    all; None otherwise (no file, not a state file, nothing or everything done)."""
    if not Path(path).is_file():
        return None
    try:
        document = read_state(path)
        done, images = int(document["done"]), int(document["images"])
    except (StateError, KeyError, TypeError, ValueError):
        return None
    return (done, images) if 0 < done < images else None


def sweep_frontier(pair: Pair, out_dir: str | Path, provenance: dict, seed: int = 0,
                   progress: bool | None = None, published: Published = PAPER):  # fmt: skip
    """`collabvit sweep`'s default grid (the paper's policy, measure and attention) over the
    pair's images, its files in `out_dir`, and the frontier drawn with the published point.

    Returns (SweepReport, SweepConfig, the figure's paths).
    """
    from collabvit.config import SweepConfig
    from collabvit.research import sweep

    config = SweepConfig(out_dir=str(out_dir))
    report = sweep.run(pair, config, seed=seed, progress=progress)
    title = (f"{report.images:,} images of {published.data}: {pair.edge_spec.name} edge, "
             f"{pair.server_spec.name} server")  # fmt: skip
    written = sweep.write_report(report, out_dir, provenance, title,
                                 references=[reference_point(published)])  # fmt: skip
    return report, config, written[len(sweep.OUTPUT_FILES):]
