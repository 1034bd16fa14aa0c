"""The torch side's command configs: which models, which data, and what `eval`, `reproduce`,
`sweep`, `visualize`, `train`, `serve` and `export` do, as small frozen dataclasses.

This module imports neither torch nor timm, so the command line can be built (and
`collabvit --help` answered) without loading them. The `collabvit` command generates its flags
from these fields (cli/flags.py): each option is declared once, here, with its help text;
results record `asdict` of them. Values are validated on construction (ValueError with a
one-line reason). The specs both edges share live in collabvit.lite.specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from collabvit.lite.config import TOKEN_ENV
from collabvit.lite.modes import (
    ATTENTION_MODES,
    canonical_uncertainty_mode,
    validate_masking,
)
from collabvit.lite.specs import (
    DATA_SETS,
    FASHION_MNIST_SPLITS,
    PRECISIONS,
    SHIPPED_PAIRS,
    finite,
    flag,
    require,
)


def check_clutter(data_set: str, clutter: dict) -> None:
    """--clutter's checks for every command that takes it: ValueError with one line when the
    data set has no canvases or a change is unknown or out of range."""
    if not clutter:
        return
    if data_set != "fmnist-cluttered":
        raise ValueError(f"--clutter changes fmnist-cluttered canvases, not {data_set} images")
    from collabvit.lite.cluttered import spec_with

    try:
        spec_with(clutter)
    except ValueError as error:
        raise ValueError(f"--clutter: {error}") from error


@dataclass(frozen=True)
class ModelSpec:
    """Which model, with which weights. The edge's flags are --model, --model-weights, ...;
    the server's --server-model, --server-weights, ... (flags.EDGE_FLAGS, SERVER_FLAGS)."""

    name: str = field(default="collabvit_fmnist_edge", metadata=flag(
        "a timm ViT name, e.g. deit_tiny_patch16_224 (default: the shipped collabvit_fmnist_* "
        "model; collabvit_cluttered_* where --data-set fmnist-cluttered is given)",
        metavar="NAME"))
    weights: str | None = field(default=None, metadata=flag(
        ".safetensors or .pth (the DeiT release's nested 'model' is fine); without it a shipped "
        "collabvit model loads from the package and any other asks timm's hub", metavar="FILE"))
    kwargs: dict = field(default_factory=dict, metadata=flag(
        "architecture overrides for timm.create_model, e.g. '{\"img_size\": 32}'",
        type="json", metavar="JSON"))
    use_ema: bool = field(default=False, metadata=flag(
        "load the checkpoint's EMA weights (model_ema) instead of its model"))


CLUTTER_HELP = ("fmnist-cluttered: change the published canvases' parameters, e.g. "
                "'{\"fragments\": 12}' (canvas, fragments, fragment, seed; default: none, the "
                "published 56x56 canvases with 6 fragments of 10x10, seed 0)")


@dataclass(frozen=True)
class DataSpec:
    """Which images, read how."""

    data_set: str = field(default="fmnist", metadata=flag(
        "imagenet: ImageNet-style folder (synset folders get their ImageNet indices) with the "
        "edge model's eval transform; fmnist: Fashion-MNIST IDX files; fmnist-cluttered: 56x56 "
        "canvases, a Fashion-MNIST item at a random position among clutter (made from the "
        "same IDX files); tensors: a safetensors file with images and targets (default: "
        "%(default)s)", choices=DATA_SETS))
    data_path: str | None = field(default=None, metadata=flag(
        "ROOT with ROOT/val/<class>/<image> or ROOT/<class>/<image>; the Fashion-MNIST folder "
        "(default /usr/share/datasets/fashion-mnist); or the tensor file", metavar="PATH"))
    split: str = field(default="test", metadata=flag(
        "Fashion-MNIST split (cluttered canvases too): test (10,000); val: the 5,000 "
        "training images collabvit's "
        "training holds out; train: the other 55,000; train-all: all 60,000 training images "
        "(default: %(default)s)", choices=FASHION_MNIST_SPLITS))
    crop_pct: float | None = field(default=None, metadata=flag(
        "centre-crop fraction for ImageNet-style data (default: 0.875 = resize 256, crop 224 "
        "for the DeiT-224 models, as the reference; timm's value for other models)",
        type="fraction", metavar="F"))
    clutter: dict = field(default_factory=dict, metadata=flag(CLUTTER_HELP, type="json",
                                                              metavar="JSON"))
    limit: int | None = field(default=None, metadata=flag(
        "only the first N images", type="positive_int", metavar="N"))
    inputs_normalized: bool = field(default=False, metadata=flag(
        "the images are already normalised: both models take them as they are"))
    batch_size: int = field(default=64, metadata=flag(
        "(default: %(default)s)", type="positive_int", metavar="N"))
    num_workers: int = field(default=0, metadata=flag(
        "data loading processes (default: %(default)s)", type="non_negative_int", metavar="N"))
    skip_unreadable: bool = field(default=False, metadata=flag(
        "skip and count images that cannot be read instead of stopping"))

    def __post_init__(self) -> None:
        require([
            (self.data_set in DATA_SETS, f"unknown data set {self.data_set!r}; "
             f"choose one of {', '.join(DATA_SETS)}"),
            (self.split in FASHION_MNIST_SPLITS, f"unknown split {self.split!r}; "
             f"choose one of {', '.join(FASHION_MNIST_SPLITS)}"),
            (self.crop_pct is None or 0 < self.crop_pct <= 1, "crop fraction must lie in (0, 1]"),
            (self.limit is None or self.limit >= 1, "limit must be >= 1"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.num_workers >= 0, f"data loading workers must be >= 0, got {self.num_workers}"),
        ])  # fmt: skip
        check_clutter(self.data_set, self.clutter)


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    device: str = field(default="cpu", metadata=flag(
        "torch device for both models, e.g. cpu, cuda, cuda:1 (default: %(default)s)"))
    seed: int = field(default=0, metadata=flag(
        "seed of the random policy (each image's draw depends on the seed and its index) and "
        "of calibration splits (default: %(default)s)", type=int))
    quiet: bool = field(default=False, metadata=flag("no progress output"))
    precision: str = field(default="float32", metadata=flag(
        "what both models compute in: float32 (default: exact, the reference's figures), "
        "bfloat16 (fast on CPUs with AVX512-BF16 or AMX and on GPUs; answers may differ "
        "slightly), float16 (GPUs; emulated, slowly, on most CPUs), int8 (the linear layers "
        "dynamically quantized, CPU)",
        choices=PRECISIONS))

    def __post_init__(self) -> None:
        require([(self.precision in PRECISIONS, f"unknown precision {self.precision!r}; "
                  f"choose one of {', '.join(PRECISIONS)}")])


@dataclass(frozen=True)
class EvalOutputs:
    """What `collabvit eval` writes besides its summary lines."""

    results_file: str | None = field(default=None, metadata=flag(
        "write every figure and the resolved configuration as JSON", metavar="FILE"))
    per_image: str | None = field(default=None, metadata=flag(
        "write one CSV row per image", metavar="FILE"))


@dataclass(frozen=True)
class ReproduceConfig:
    """The images of `collabvit reproduce`, how it saves its progress, and what it draws
    besides its figures."""

    data_path: str = field(default="", metadata=flag(
        "ImageNet val (ILSVRC2012, 50,000 images): ROOT/val/<synset>/<image> or "
        "ROOT/<synset>/<image>, the folders named n01440764, ...", required=True,
        metavar="ROOT"))
    state_file: str = field(default="runs/reproduce/state.json", metadata=flag(
        "the figures so far, saved after every chunk of images, so that an interrupted run "
        "can be continued (default: %(default)s)", metavar="FILE"))
    resume: bool = field(default=False, metadata=flag(
        "continue the run saved in --state-file (refused when it was made with other data, "
        "weights or settings)"))
    chunk_images: int = field(default=1000, metadata=flag(
        "images between two saves of the state file, rounded up to whole batches "
        "(default: %(default)s)", type="positive_int", metavar="N"))
    sweep: str | None = field(default=None, metadata=flag(
        "also sweep accuracy against communication cost on the same images (as `collabvit "
        "sweep` does) and draw the frontier with the paper's point into DIR", metavar="DIR"))

    def __post_init__(self) -> None:
        require([(bool(self.data_path), "reproduce needs ImageNet val: --data-path ROOT"),
                  (self.chunk_images >= 1, "chunk images must be >= 1"),
                  (bool(self.state_file), "the state file needs a name")])  # fmt: skip


# The sweep's default grid: thirteen deltas of the paper's policy, twenty etas per measure.
# Fine steps just below 1: on small images the last few per cent of attention sit on a
# handful of background patches, and which of them a point drops decides its accuracy.
SWEEP_DELTAS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 1.0)
SWEEP_NUM_ETAS = 20
SWEEP_COMPARE_AT = (0.1, 0.2, 0.27)


@dataclass(frozen=True)
class SweepConfig:
    """The grid of a sweep, what to report and where."""

    out_dir: str = field(default="", metadata=flag(
        "writes points.jsonl, points.csv, sweep.json, frontier.png/svg", required=True,
        metavar="DIR"))
    attention_modes: tuple[str, ...] = field(default=("mean",), metadata=flag(
        "patch scores to sweep; each mode costs one edge pass (default: mean)", nargs="+",
        choices=ATTENTION_MODES))
    policy: tuple[tuple[str, tuple[float, ...]], ...] = field(
        default=(("attention_sum_threshold", SWEEP_DELTAS),), metadata=flag(
            "a selection policy and its thresholds, repeatable, e.g. topk=20,30,40 (default: "
            f"attention_sum_threshold={','.join(map(str, SWEEP_DELTAS))})", type="policy",
            action="append", metavar="MODE=TH,..."))
    uncer_modes: tuple[str, ...] = field(default=("min_entropy",), metadata=flag(
        "uncertainty measures of the gate (default: min_entropy)", nargs="+",
        type="uncertainty_mode", metavar="MODE"))
    num_etas: int = field(default=SWEEP_NUM_ETAS, metadata=flag(
        "N etas per measure, sending evenly spaced shares of the images from none (edge "
        "alone) to all (default: %(default)s)", type="num_etas", metavar="N", exclusive="etas"))
    etas: tuple[float, ...] | None = field(default=None, metadata=flag(
        "explicit etas for every measure instead of --num-etas", type="number_list",
        metavar="ETA,...", exclusive="etas"))
    compare_at: tuple[float, ...] = field(default=SWEEP_COMPARE_AT, metadata=flag(
        "report each series' best accuracy at these costs (default: "
        f"{','.join(map(str, SWEEP_COMPARE_AT))})", type="cost_list", metavar="COST,..."))
    no_server_alone: bool = field(default=False, metadata=flag(
        "skip the server-alone reference pass (all patches of every image)"))
    budget: float | None = field(default=None, metadata=flag(
        "pick the most accurate point with communication cost <= C on the calibration part "
        "and report it on the held-out part", type="cost", metavar="C", exclusive="goal"))
    target_acc: float | None = field(default=None, metadata=flag(
        "pick the cheapest point with accuracy >= A %% on the calibration part",
        type="percent", metavar="A", exclusive="goal"))
    calibration_fraction: float = field(default=0.5, metadata=flag(
        "share of the images, drawn at random with --seed, used for calibration; the rest is "
        "held out (default: %(default)s)", type="open_fraction", metavar="F"))
    temperature_scaling: bool = field(default=False, metadata=flag(
        "also fit a temperature to the edge logits on the calibration part, sweep the gate on "
        "the scaled logits and report the calibration error before and after"))
    no_plots: bool = field(default=False, metadata=flag("do not draw the frontier"))

    def __post_init__(self) -> None:
        for mode, thresholds in self.policy:
            if not thresholds:
                raise ValueError(f"policy {mode} has no thresholds")
            for threshold in thresholds:
                validate_masking(mode, threshold)
        object.__setattr__(
            self, "uncer_modes", tuple(canonical_uncertainty_mode(m) for m in self.uncer_modes)
        )
        require([
            (bool(self.out_dir), "the sweep needs an output folder (--out-dir)"),
            (bool(self.attention_modes) and set(self.attention_modes) <= set(ATTENTION_MODES),
             f"attention modes must be among {', '.join(ATTENTION_MODES)}"),
            (1 <= self.num_etas <= 1000, f"--num-etas must lie in 1..1000, got {self.num_etas}"),
            (self.etas is None or (bool(self.etas) and all(map(finite, self.etas))),
             "etas must be finite numbers"),
            (all(finite(c) and c >= 0 for c in self.compare_at), "costs must be >= 0"),
            (self.budget is None or self.target_acc is None,
             "give at most one of --budget and --target-acc"),
            (self.budget is None or (finite(self.budget) and self.budget >= 0),
             "the budget must be a cost >= 0"),
            (self.target_acc is None or 0 <= self.target_acc <= 100,
             "the target accuracy must lie in [0, 100]"),
            (0 < self.calibration_fraction < 1, "the calibration fraction must lie in (0, 1)"),
        ])  # fmt: skip

    @property
    def calibrating(self) -> bool:
        """A point is picked on a calibration part and checked on the held-out part."""
        return self.budget is not None or self.target_acc is not None

    def selection_policies(self) -> tuple[tuple[str, float], ...]:
        """The (mode, threshold) pairs of the grid, without repeats, in the given order."""
        return tuple(dict.fromkeys((m, float(t)) for m, ths in self.policy for t in ths))


@dataclass(frozen=True)
class VisualizeConfig:
    """What `collabvit visualize` draws."""

    output_dir: str = field(default="", metadata=flag(
        "where the PNG/SVG/CSV go", required=True, metavar="DIR"))
    indices: tuple[int, ...] = field(default=(), metadata=flag(
        "dataset indices to draw: original, attention heatmap, masked image (the random "
        "policy draws each image's patches from --seed and its index)", type=int, nargs="+",
        metavar="I", aliases=("--output-list",)))
    attention_histogram: bool = field(default=False, metadata=flag(
        "also histogram every patch score over the dataset (use --limit for a part)"))
    bins: int = field(default=50, metadata=flag(
        "histogram bins (default: %(default)s)", type="num_bins", metavar="N"))

    def __post_init__(self) -> None:
        require([
            (bool(self.output_dir), "visualize needs an output folder (--output-dir)"),
            (1 <= self.bins <= 10_000, f"--bins must lie in 1..10000, got {self.bins}"),
            (bool(self.indices) or self.attention_histogram,
             "nothing to draw: give --indices and/or --attention-histogram"),
        ])  # fmt: skip


@dataclass(frozen=True)
class ServeConfig:
    """Which shipped server `collabvit serve` serves, and how it listens, batches and
    protects itself."""

    data_set: str | None = field(default=None, metadata=flag(
        "serve the shipped server of this data set: fmnist collabvit_fmnist_server, "
        "fmnist-cluttered collabvit_cluttered_server; --server-model names any other "
        "(default: fmnist's, unless --server-model is given)", choices=DATA_SETS))
    host: str = field(default="127.0.0.1", metadata=flag(
        "address to listen on; 0.0.0.0 for every interface (default: %(default)s)"))
    port: int = field(default=8000, metadata=flag(
        "(default: %(default)s)", type="port", metavar="N"))
    max_batch: int = field(default=32, metadata=flag(
        "images per forward at most; 1 turns dynamic batching off (default: %(default)s)",
        type="positive_int", metavar="N"))
    max_delay_ms: float = field(default=5.0, metadata=flag(
        "how long a batch waits for more requests once it has one (default: %(default)s)",
        type="non_negative", metavar="MS"))
    max_request_bytes: int = field(default=16 * 2**20, metadata=flag(
        "larger request bodies are refused with 413 (default: %(default)s)",
        type="positive_int", metavar="N"))
    max_request_images: int = field(default=1024, metadata=flag(
        "requests declaring more images are refused with 413 before any is read "
        "(default: %(default)s)", type="positive_int", metavar="N"))
    max_queue_images: int = field(default=4096, metadata=flag(
        "images admitted and not yet answered at most; past it requests get 503 with "
        "Retry-After (default: %(default)s)", type="positive_int", metavar="N"))
    max_queue_mb: float = field(default=512.0, metadata=flag(
        "megabytes that requests hold at most: bodies being read or parsed and the decoded "
        "pixels of admitted images; past it 503 with Retry-After (default: %(default)s)",
        type="positive", metavar="MB"))
    limit_concurrency: int = field(default=256, metadata=flag(
        "requests in progress at most, past it 503 with Retry-After; health, readiness and "
        "metrics are not counted (default: %(default)s)", type="positive_int", metavar="N"))
    max_connections: int = field(default=1024, metadata=flag(
        "open connections at most; past it the longest-idle one is closed to make room "
        "(503 with Retry-After only when every one has a request in progress) "
        "(default: %(default)s)", type="positive_int", metavar="N"))
    parse_processes: int = field(default=1, metadata=flag(
        "processes that parse request JSON over 64 KiB, so that slow-to-parse bodies never "
        "stall the server's event loop (default: %(default)s)", type="positive_int",
        metavar="N"))
    timeout_keep_alive: float = field(default=5.0, metadata=flag(
        "seconds an idle keep-alive connection stays open (default: %(default)s)",
        type="positive", metavar="S"))
    timeout_request_head: float = field(default=10.0, metadata=flag(
        "seconds a request line and its headers may take to arrive; slower connections are "
        "closed (default: %(default)s)", type="positive", metavar="S"))
    timeout_body: float = field(default=30.0, metadata=flag(
        "seconds a request body may take to arrive; slower ones get 408 and the connection "
        "is closed (default: %(default)s)", type="positive", metavar="S"))
    allowed_hosts: tuple[str, ...] = field(default=(), metadata=flag(
        "Host headers answered, others get 400 (DNS rebinding); '*' for any (default: the "
        "bound address and the loopback names, and the machine's names and addresses when "
        "bound to every interface)", nargs="+", metavar="HOST"))
    token: str | None = field(default=None, repr=False, metadata=flag(
        f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} when set; the "
        "environment keeps it out of the process list)", metavar="TOKEN"))
    ssl_certfile: str | None = field(default=None, metadata=flag(
        "serve HTTPS with this certificate (PEM)", metavar="FILE"))
    ssl_keyfile: str | None = field(default=None, metadata=flag(
        "the certificate's private key (PEM)", metavar="FILE"))
    device: str = field(default="cpu", metadata=flag(
        "torch device of the model, e.g. cpu, cuda (default: %(default)s)"))
    threads: int | None = field(default=None, metadata=flag(
        "torch threads of the model (default: torch's choice, about one per core); leave cores "
        "to other processes on a shared machine", type="positive_int", metavar="N"))
    access_log: bool = field(default=False, metadata=flag("log every request"))
    workers: int = field(default=1, metadata=flag(
        "server processes, each with its own model, event loop and queue bounds, sharing the "
        "port; give each --threads cores / N (default: %(default)s)", type="positive_int",
        metavar="N"))
    precision: str = field(default="auto", metadata=flag(
        "what the model computes in: auto picks bfloat16 where it runs natively (CPUs with "
        "AVX512-BF16 or AMX, GPUs), else float16 on a GPU, where the shipped model's card "
        "records a change of at most 0.1 pt for it, float32 otherwise; float32 answers "
        "exactly as `collabvit eval` computes (default: %(default)s)",
        choices=("auto", *PRECISIONS)))
    bf16: bool = field(default=False, metadata=flag("the same as --precision bfloat16"))

    def __post_init__(self) -> None:
        require([
            (1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port}"),
            (self.max_batch >= 1, f"max batch must be >= 1, got {self.max_batch}"),
            (finite(self.max_delay_ms) and self.max_delay_ms >= 0,
             f"max delay must be >= 0 ms, got {self.max_delay_ms}"),
            (self.max_request_bytes >= 1, "the request size limit must be >= 1 byte"),
            ((self.ssl_certfile is None) == (self.ssl_keyfile is None),
             "HTTPS needs both --ssl-certfile and --ssl-keyfile"),
            (self.token is None or self.token.strip() != "", "the token must not be empty"),
            # idle connections make room for new ones, busy ones cannot: with more
            # connections than requests in progress, a health probe always gets in
            (self.max_connections > self.limit_concurrency,
             f"--max-connections ({self.max_connections}) must exceed --limit-concurrency "
             f"({self.limit_concurrency}), so that health checks always find a connection"),
            (self.data_set is None or self.data_set in DATA_SETS,
             f"unknown data set {self.data_set!r}; choose one of {', '.join(DATA_SETS)}"),
            (self.precision in ("auto", *PRECISIONS), f"unknown precision {self.precision!r}"),
            (not self.bf16 or self.precision in ("auto", "bfloat16"),
             f"--bf16 is --precision bfloat16, not {self.precision}"),
        ])  # fmt: skip

    @property
    def asked_precision(self) -> str:
        """--precision, with --bf16 read as bfloat16."""
        return "bfloat16" if self.bf16 else self.precision

    def served_model(self, server_model: str | None) -> str:
        """The model to serve: `server_model` (--server-model) when given, else the shipped
        server of the data set (Fashion-MNIST's without one). ValueError, one line, when the
        data set ships no server, or when both are given and name different models."""
        if self.data_set is None:
            return server_model or SHIPPED_PAIRS["fmnist"][1]
        if self.data_set not in SHIPPED_PAIRS:
            raise ValueError(f"no server is shipped for --data-set {self.data_set} (only for "
                             f"{', '.join(SHIPPED_PAIRS)}): name the model with --server-model")
        shipped = SHIPPED_PAIRS[self.data_set][1]
        if server_model is not None and server_model.split(".")[0] != shipped:
            raise ValueError(f"--data-set {self.data_set} serves {shipped}, but --server-model "
                             f"says {server_model}: give one of them")
        return server_model or shipped



@dataclass(frozen=True)
class ReplicaConfig:
    """`collabvit serve` as replicas on Ray Serve behind one address, on this machine or a
    Ray cluster of many (README, "Many machines")."""

    replicas: int | None = field(default=None, metadata=flag(
        "serve from N replicas on Ray Serve, each with its own model, batching and queue "
        "bounds, behind Ray's proxy on --host:--port; a replica that dies is replaced "
        "(default: one process, no Ray)", type="positive_int", metavar="N"))
    max_replicas: int | None = field(default=None, metadata=flag(
        "autoscale between --replicas and N replicas, on the requests each has in progress "
        "(--target-ongoing-requests)", type="positive_int", metavar="N"))
    target_ongoing_requests: float = field(default=32.0, metadata=flag(
        "with --max-replicas: the requests in progress per replica the autoscaler aims at "
        "(default: %(default)s)", type="positive", metavar="N"))
    replica_cpus: float = field(default=1.0, metadata=flag(
        "CPUs Ray reserves for each replica, fractions allowed, e.g. 0.5 for two replicas on "
        "one core; give the replicas' torch --threads to match (default: %(default)s)",
        type="positive", metavar="CPUS"))
    max_ongoing_requests: int = field(default=128, metadata=flag(
        "requests one replica holds at once, what its batches are drawn from; more wait at "
        "the proxy (default: %(default)s)", type="positive_int", metavar="N"))
    max_queued_requests: int = field(default=1024, metadata=flag(
        "requests each proxy holds waiting for a replica; past it 503 with Retry-After "
        "(default: %(default)s)", type="positive_int", metavar="N"))
    ray_address: str | None = field(default=None, metadata=flag(
        "deploy to this Ray cluster (host:port of its head, or auto for the one `ray start` "
        "runs on this machine); default: a Ray instance of this command's own, ended with it",
        metavar="ADDRESS"))

    @property
    def replicated(self) -> bool:
        return self.replicas is not None

    def __post_init__(self) -> None:
        require([
            (self.max_replicas is None or self.replicas is not None,
             "--max-replicas autoscales from --replicas: give both"),
            (self.max_replicas is None or self.replicas is None
             or self.max_replicas >= self.replicas,
             f"--max-replicas ({self.max_replicas}) must be at least --replicas "
             f"({self.replicas})"),
            (finite(self.replica_cpus) and self.replica_cpus > 0,
             "--replica-cpus must be > 0"),
            (self.ray_address is None or self.replicas is not None,
             "--ray-address deploys replicas: give --replicas"),
            (self.replicas is not None or not self._changed(
                "replica_cpus", "max_ongoing_requests", "max_queued_requests",
                "target_ongoing_requests"),
             "--replica-cpus, --max-ongoing-requests, --max-queued-requests and "
             "--target-ongoing-requests set up replicas: give --replicas"),
            (self.max_replicas is not None or not self._changed("target_ongoing_requests"),
             "--target-ongoing-requests steers the autoscaler: give --max-replicas"),
        ])  # fmt: skip

    def _changed(self, *names: str) -> bool:
        """Any of the named options set to other than its default."""
        return any(getattr(self, item.name) != item.default for item in fields(self)
                   if item.name in names)


@dataclass(frozen=True)
class ExportConfig:
    """What `collabvit export` writes."""

    out_dir: str = field(default="", metadata=flag(
        "folder for edge.onnx and edge.json", required=True, metavar="DIR"))
    int8: bool = field(default=False, metadata=flag(
        "also write edge.int8.onnx: ONNX Runtime static quantisation (QDQ, int8 weights and "
        "activations of the matrix products), calibrated on the first --calibration-images "
        "of the data (Fashion-MNIST data sets: of --split, val by default)"))
    calibration_images: int = field(default=1000, metadata=flag(
        "images that calibrate the int8 ranges (default: %(default)s)", type="positive_int",
        metavar="N"))

    def __post_init__(self) -> None:
        require([(bool(self.out_dir), "export needs an output folder (--out-dir)")])
