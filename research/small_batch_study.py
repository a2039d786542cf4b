"""Small-batch image-classification study on Fashion-MNIST: MABN against BN, BRN, GN and its ablations.

The paper's protocol, shrunk to a CPU: SGD batch 32 split into micro-batches of 2 for every
batch-dependent norm (the gradients of 16 forwards are accumulated, so each norm layer sees
normalization batch 2 and MABN's buffer of 16 spans one SGD batch). BN(32) is the target
(one forward of 32). GroupNorm does not depend on the batch, so it runs one forward of 32,
which is the same computation as 16 micro-batches of 2.

Runs are resumable: each (norm, seed) writes `<norm>_seed<seed>.json` when done and is
skipped afterwards; a partial run resumes from `<norm>_seed<seed>.ckpt.pt`. All files are
written to a temporary name and moved into place.

Sizing of the default (2-core AMD EPYC VM, torch 2.14 CPU, idle machine). Time per SGD
iteration of 32 images with 1 torch thread: BN(32) 34 ms, GN 29, BN(2) 70, BRN(2) 119,
MABN(2) 102, MABN(2) SMA fwd only 100, MABN(2) no CW 123 (sum 576 ms). Two threads barely help
the micro-batched runs (BN(2) 60 ms, MABN(2) 93 ms: 16 small forwards are dispatch-bound) and
are much slower when the other core is busy; two 1-thread processes run at ~95% of the
single-process speed each. Hence 2 jobs x 1 thread: 3 seeds x 576 ms / (2 x 0.95) = 0.91 s per
iteration index, so the default 2 epochs (3,750 iterations) take ~57 min of training plus
~5 min of evaluation (10 curve points on 2,000 test images and a final full 10k evaluation per
run): about 1 h for 7 norms x 3 seeds, leaving room under 2 h for a busier machine. Any other
load on the machine slows this down roughly in proportion.

MABN's warm-ups count norm forwards, i.e. micro-batches (16 per SGD iteration): with the
paper's defaults the moving averages start at SGD iteration 7 and re-normalization at 63,
out of 3,750, which is about the proportion of the paper's schedules; BRN's warm-up (5,000)
and ramps (20,000 / 35,000 forwards) end at SGD iterations 313, 1,250 and 2,188.
"""
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from torch import nn

from mabn_d2.utils.atomic_io import atomic_write, atomic_write_json, atomic_write_text
from .ablations import MABNCentered2d, MABNForwardOnly2d
from mabn_d2.layers import BatchRenorm2d, CenteredConv2d, MABN2d
from mabn_d2.layers.hyperparams import MABN_HYPERPARAMETERS, defaults
from mabn_d2.modeling.prepare import allow_uncentered
from .batch_stats import BatchStatsRecorder

__all__ = [
    "NORMS", "NormSpec", "StudyConfig", "norm_label", "SmallResNet", "conv_norm", "build_model", "load_data",
    "batch_indices", "lr_at", "make_optimizer", "sgd_step", "evaluate", "run_paths", "train_run",
    "record_batch_statistics", "run_study", "summarize", "write_results_markdown", "plot_accuracy_curves",
    "environment_info",
]

_MABN_DEFAULTS = defaults(MABN_HYPERPARAMETERS)

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the training split


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Everything that changes a run's result (runtime options such as threads are not here)."""

    epochs: float = 2.0  # over the 60k training images; `iters` overrides it
    iters: Optional[int] = None  # SGD iterations
    batch_size: int = 32  # SGD batch
    norm_batch: int = 2  # micro-batch seen by batch-dependent norms (except the BN(full batch) target)
    lr: float = 0.05
    warmup_iters: int = 200  # linear warm-up from 0.1 * lr, in SGD iterations, then cosine to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4  # on conv and linear weights; none on norm parameters and biases
    widths: Tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 2
    gn_channels_per_group: int = 4  # groups = min(32, C // 4): 4, 8, 16 groups at widths 16/32/64
    center_stem: bool = True  # centralize the stem conv too (the paper centralizes every conv feeding MABN)
    # MABN's hyper-parameters, the layer's defaults; the counts are norm forwards, i.e. micro-batches
    mabn_buffer_size: int = _MABN_DEFAULTS["buffer_size"]
    mabn_ema_decay: float = _MABN_DEFAULTS["ema_decay"]
    mabn_warmup_iters: int = _MABN_DEFAULTS["warmup_iters"]
    mabn_renorm_warmup_iters: int = _MABN_DEFAULTS["renorm_warmup_iters"]
    mabn_renorm_clip: float = _MABN_DEFAULTS["renorm_clip"]
    train_images: Optional[int] = None  # subset of the training split (None: all 60k)
    test_images: Optional[int] = None  # subset of the test split for the final accuracy (None: all 10k)
    curve_test_images: int = 2000  # fixed test subset for the accuracy curve points
    evals: int = 10  # curve points (and checkpoints) per run

    def total_iters(self, train_images: int) -> int:
        if self.iters is not None:
            return self.iters
        return max(1, round(self.epochs * train_images / self.batch_size))


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A norm in the study: how to build it, which conv feeds it, which batch it normalizes over."""

    label: str
    build: Callable[[int, StudyConfig], nn.Module]
    centered_conv: bool = False
    micro_batched: bool = True
    cost: float = 1.0  # measured time per SGD iteration relative to BN(2); longest runs start first


def _mabn_kwargs(config: StudyConfig) -> dict:
    return dict(
        buffer_size=config.mabn_buffer_size, ema_decay=config.mabn_ema_decay, warmup_iters=config.mabn_warmup_iters,
        renorm_warmup_iters=config.mabn_renorm_warmup_iters, renorm_clip=config.mabn_renorm_clip,
    )


def _group_norm(channels: int, config: StudyConfig) -> nn.Module:
    return nn.GroupNorm(max(1, min(32, channels // config.gn_channels_per_group)), channels)


NORMS: Dict[str, NormSpec] = {
    "bn32": NormSpec("BN(32)", lambda c, cfg: nn.BatchNorm2d(c), micro_batched=False, cost=0.48),
    "bn2": NormSpec("BN(2)", lambda c, cfg: nn.BatchNorm2d(c), cost=1.0),
    "brn2": NormSpec("BRN(2)", lambda c, cfg: BatchRenorm2d(c), cost=1.68),
    "gn": NormSpec("GN", _group_norm, micro_batched=False, cost=0.42),
    "mabn2": NormSpec("MABN(2)", lambda c, cfg: MABN2d(c, **_mabn_kwargs(cfg)), centered_conv=True, cost=1.45),
    "mabn2_fwd_only": NormSpec(
        "MABN(2) SMA fwd only", lambda c, cfg: MABNForwardOnly2d(c, **_mabn_kwargs(cfg)),
        centered_conv=True, cost=1.41,
    ),
    "mabn2_no_cw": NormSpec("MABN(2) no CW", lambda c, cfg: MABNCentered2d(c, **_mabn_kwargs(cfg)), cost=1.75),
}


def norm_label(name: str, config: StudyConfig) -> str:
    """Display name with the normalization batch actually used (labels assume 32 and 2)."""
    spec = NORMS[name]
    if name == "gn":
        return spec.label
    batch = config.norm_batch if spec.micro_batched else config.batch_size
    return spec.label.replace("(32)", f"({batch})").replace("(2)", f"({batch})")


# --------------------------------------------------------------------------- model
def conv_norm(conv: type, in_channels: int, out_channels: int, kernel_size: int, norm: nn.Module,
              stride: int = 1) -> Conv2d:
    """A bias-free conv of class `conv` followed by `norm` (detectron2 style: the norm is `conv.norm`).

    The norm is attached after construction and no `prepare_mabn_model` pass runs on these
    models, so the conv class is exactly the one asked for: CenteredConv2d where the study wants
    weight centralization, a plain Conv2d where an ablation needs one in front of MABN.
    """
    layer = conv(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    layer.norm = norm
    return layer


class BasicBlock(nn.Module):
    """ResNet basic block; the norm sits inside each conv (detectron2 style), ReLU in place."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv: type,
                 norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = conv_norm(conv, in_channels, out_channels, 3, norm(out_channels), stride)
        self.conv2 = conv_norm(conv, out_channels, out_channels, 3, norm(out_channels))
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv_norm(conv, in_channels, out_channels, 1, norm(out_channels), stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu_(self.conv1(x)))
        return F.relu_(out + (x if self.shortcut is None else self.shortcut(x)))


class SmallResNet(nn.Module):
    """ResNet for 28x28 grey images: 3x3 stem, len(widths) stages of basic blocks, avg-pool, linear."""

    def __init__(self, norm: Callable[[int], nn.Module], conv: type = Conv2d, stem_conv: Optional[type] = None,
                 widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = conv_norm(stem_conv or conv, 1, widths[0], 3, norm(widths[0]))
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, 2 if (i > 0 and b == 0) else 1, conv, norm))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu_(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def build_model(norm_name: str, config: StudyConfig) -> SmallResNet:
    spec = NORMS[norm_name]
    conv = CenteredConv2d if spec.centered_conv else Conv2d
    stem_conv = conv if config.center_stem else Conv2d
    model = SmallResNet(lambda c: spec.build(c, config), conv, stem_conv, config.widths, config.blocks_per_stage)
    if spec.centered_conv and not config.center_stem:
        allow_uncentered(model.stem)  # the ablation: MABN behind a plain stem convolution, on purpose
    return model


# --------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def _load_split(split: str, images: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    from demo_datasets.fashion_mnist_coco import load_fashion_mnist

    raw_images, raw_labels = load_fashion_mnist(split)
    index = np.arange(len(raw_labels))
    if images is not None and images < len(index):
        # a fixed random subset (the same for every run), so the class balance is kept
        index = np.sort(np.random.default_rng(0).permutation(len(index))[:images])
    x = torch.from_numpy(raw_images[index].astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, torch.from_numpy(raw_labels[index].astype(np.int64))


def load_data(config: StudyConfig) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float images [N, 1, 28, 28] and int64 labels: train, test and the curve subset."""
    train = _load_split("train", config.train_images)
    test = _load_split("t10k", config.test_images)
    curve = _load_split("t10k", min(config.curve_test_images, len(test[1])))
    return {"train": train, "test": test, "curve": curve}


def batch_indices(iteration: int, seed: int, num_images: int, batch_size: int) -> torch.Tensor:
    """Indices of SGD iteration `iteration` (0-based): a fresh permutation per epoch, from the seed.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have.
    """
    per_epoch = max(1, num_images // batch_size)
    epoch, position = divmod(iteration, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    permutation = torch.randperm(num_images, generator=generator)
    return permutation[position * batch_size:(position + 1) * batch_size]


# --------------------------------------------------------------------------- training
def lr_at(iteration: int, total_iters: int, config: StudyConfig) -> float:
    """Linear warm-up from 0.1 * lr over warmup_iters, then cosine decay to 0 at total_iters."""
    warmup = 1.0
    if iteration < config.warmup_iters:
        warmup = 0.1 + 0.9 * iteration / config.warmup_iters
    return config.lr * warmup * 0.5 * (1.0 + math.cos(math.pi * iteration / total_iters))


def make_optimizer(model: nn.Module, config: StudyConfig) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
             micro_batch: Optional[int]) -> float:
    """One SGD step on `images`; with `micro_batch`, one forward/backward per micro-batch, gradients summed.

    Each micro-batch loss is weighted by its share of the batch, so the step equals the mean
    cross-entropy over the whole batch. Returns that loss.
    """
    optimizer.zero_grad(set_to_none=True)
    chunks = zip(images.split(micro_batch), labels.split(micro_batch)) if micro_batch else [(images, labels)]
    total = 0.0
    for x, y in chunks:
        loss = F.cross_entropy(model(x), y) * (y.numel() / labels.numel())
        loss.backward()
        total += loss.detach().item()
    optimizer.step()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (running statistics), in percent."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, labels.numel())


def run_paths(output_dir: Path, norm: str, seed: int) -> Tuple[Path, Path]:
    """(final JSON log, checkpoint) of one run."""
    return output_dir / f"{norm}_seed{seed}.json", output_dir / f"{norm}_seed{seed}.ckpt.pt"


def environment_info() -> dict:
    """torch version and the git commit of this checkout (None outside a git checkout)."""
    commit = None
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        if result.returncode == 0:
            commit = result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"torch_version": torch.__version__, "git_commit": commit}


def train_run(norm: str, seed: int, config: StudyConfig, output_dir: Path, threads: Optional[int] = None,
              stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> Optional[dict]:
    """Train and evaluate one (norm, seed); returns its log, also written as JSON.

    Skips a finished run (returns its log) and resumes a checkpointed one. `stop_after` stops
    at the first checkpoint at or after that many iterations and returns None (to split a run
    across calls). Refuses to mix runs with a different config in one directory.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final_path, ckpt_path = run_paths(output_dir, norm, seed)
    if final_path.exists():
        done = json.loads(final_path.read_text())
        _check_same_config(done["config"], dataclasses.asdict(config), final_path)
        return done
    if threads is not None:
        torch.set_num_threads(threads)
    data = load_data(config)
    train_x, train_y = data["train"]
    total_iters = config.total_iters(len(train_y))
    eval_points = {round(k * total_iters / config.evals) for k in range(1, config.evals + 1)} | {total_iters}
    torch.manual_seed(seed)
    model = build_model(norm, config).train()
    optimizer = make_optimizer(model, config)
    state = _load_checkpoint(ckpt_path, config, model, optimizer)
    if state["iteration"]:
        log(f"[{norm} seed {seed}] resuming at iteration {state['iteration']}/{total_iters}")
    micro_batch = config.norm_batch if NORMS[norm].micro_batched else None
    started, losses = time.perf_counter(), []
    while state["iteration"] < total_iters and not state["diverged"]:
        it = state["iteration"]
        lr = lr_at(it, total_iters, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = batch_indices(it, seed, len(train_y), config.batch_size)
        t0 = time.perf_counter()
        losses.append(sgd_step(model, optimizer, train_x[index], train_y[index], micro_batch))
        state["train_seconds"] += time.perf_counter() - t0
        state["iteration"] = it + 1
        state["diverged"] = not math.isfinite(losses[-1])
        if state["iteration"] not in eval_points and not state["diverged"]:
            continue
        entry = {"iteration": state["iteration"], "epoch": state["iteration"] * config.batch_size / len(train_y),
                 "lr": lr, "train_loss": statistics.fmean(losses),
                 "curve_test_accuracy": evaluate(model, *data["curve"]), "train_seconds": state["train_seconds"]}
        state["history"].append(entry)
        ms_per_iteration = state["train_seconds"] / entry["iteration"] * 1e3
        log(f"[{norm} seed {seed}] it {entry['iteration']}/{total_iters} loss {entry['train_loss']:.4f} "
            f"curve acc {entry['curve_test_accuracy']:.2f}% ({ms_per_iteration:.0f} ms/it)")
        now = time.perf_counter()
        state["wall_seconds"] += now - started
        started, losses = now, []
        _save_checkpoint(ckpt_path, config, model, optimizer, state)
        if stop_after is not None and stop_after <= state["iteration"] < total_iters:
            return None
    final_accuracy = evaluate(model, *data["test"])
    state["wall_seconds"] += time.perf_counter() - started
    atomic_write_json(str(final_path), {
        "norm": norm, "label": norm_label(norm, config), "seed": seed, "config": dataclasses.asdict(config),
        "iterations": state["iteration"], "total_iters": total_iters, "diverged": state["diverged"],
        "final_test_accuracy": final_accuracy, "test_images": len(data["test"][1]),
        "curve_test_images": len(data["curve"][1]), "history": state["history"],
        "train_seconds": state["train_seconds"],
        "seconds_per_iteration": state["train_seconds"] / max(1, state["iteration"]),
        "wall_seconds": state["wall_seconds"], "threads": torch.get_num_threads(), **environment_info(),
    })
    ckpt_path.unlink(missing_ok=True)
    log(f"[{norm} seed {seed}] done: test accuracy {final_accuracy:.2f}% in {state['wall_seconds']:.0f} s")
    return json.loads(final_path.read_text())  # the same form a skipped run returns


def _save_checkpoint(path: Path, config: StudyConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict) -> None:
    checkpoint = {"config": dataclasses.asdict(config), "model": model.state_dict(),
                  "optimizer": optimizer.state_dict(), "state": state}
    atomic_write(str(path), lambda f: torch.save(checkpoint, f))


def _load_checkpoint(path: Path, config: StudyConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restores model and optimizer from `path` if it exists; returns the run state (fresh if none)."""
    if not path.exists():
        return {"iteration": 0, "history": [], "train_seconds": 0.0, "wall_seconds": 0.0, "diverged": False}
    checkpoint = torch.load(path, weights_only=False)
    _check_same_config(checkpoint["config"], dataclasses.asdict(config), path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint["state"]


def _check_same_config(found: dict, expected: dict, path: Path) -> None:
    found = {k: tuple(v) if isinstance(v, list) else v for k, v in found.items()}
    if found != expected:
        changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise ValueError(f"{path} was made with a different config (differs in {changed}); use another output dir")


def record_batch_statistics(norm: str, config: StudyConfig, iters: int, layer_names: Optional[Sequence[str]] = None,
                            seed: int = 0, log: Callable[[str], None] = print) -> Tuple[torch.Tensor, dict]:
    """Train `norm` for `iters` SGD iterations (the study's step and schedule) while recording batch statistics.

    Returns (training images seen at each record, BatchStatsRecorder.to_dict()); a micro-batched
    norm gives batch_size / norm_batch records per SGD iteration, hence the image axis.
    """
    torch.manual_seed(seed)
    model = build_model(norm, config).train()
    optimizer = make_optimizer(model, config)
    train_x, train_y = load_data(config)["train"]
    micro_batch = config.norm_batch if NORMS[norm].micro_batched else None
    with BatchStatsRecorder(model, layer_names) as recorder:
        for it in range(iters):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, iters, config)
            index = batch_indices(it, seed, len(train_y), config.batch_size)
            loss = sgd_step(model, optimizer, train_x[index], train_y[index], micro_batch)
            if (it + 1) % max(1, iters // 5) == 0:
                log(f"[{norm}] it {it + 1}/{iters} loss {loss:.4f}")
    stats = recorder.to_dict()
    records = len(next(iter(recorder.records.values())))
    images = torch.arange(1, records + 1, dtype=torch.float64) * (micro_batch or config.batch_size)
    return images, stats


# --------------------------------------------------------------------------- the study
def _train_in_worker(norm: str, seed: int, config: StudyConfig, output_dir: str, threads: int) -> str:
    train_run(norm, seed, config, Path(output_dir), threads=threads, log=lambda m: print(m, flush=True))
    return f"{norm}/{seed}"


def run_study(config: StudyConfig, norms: Sequence[str], seeds: Sequence[int], output_dir: Path,
              threads: int = 1, jobs: int = 1, log: Callable[[str], None] = print) -> dict:
    """Train every (norm, seed) not done yet, `jobs` at a time, then write results.md, the plot and results.json."""
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise ValueError(f"unknown norms {unknown}; choose from {list(NORMS)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # longest runs first, so parallel jobs finish together
    runs = [(n, s) for n in sorted(norms, key=lambda n: -NORMS[n].cost) for s in seeds]
    if jobs <= 1:
        for norm, seed in runs:
            train_run(norm, seed, config, output_dir, threads=threads, log=log)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_train_in_worker, n, s, config, str(output_dir), threads) for n, s in runs]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # finish the runs in progress, start no new ones
                raise
    results = [json.loads(run_paths(output_dir, n, s)[0].read_text()) for n in norms for s in seeds]
    summary = summarize(results, norms, config)
    summary.update(environment_info())
    summary.update({"study_wall_seconds": time.perf_counter() - started, "threads": threads, "jobs": jobs,
                    "seeds": list(seeds)})
    summary["plotted"] = plot_accuracy_curves(results, norms, output_dir / "accuracy_curves.png")
    atomic_write_json(str(output_dir / "results.json"), summary)
    write_results_markdown(summary, output_dir / "results.md")
    log(f"wrote {output_dir / 'results.md'}")
    return summary


def summarize(results: List[dict], norms: Sequence[str], config: StudyConfig) -> dict:
    """Per norm: test accuracy mean and sample std over seeds, per-seed values, timing."""
    rows = []
    for norm in norms:
        runs = [r for r in results if r["norm"] == norm]
        accuracies = [r["final_test_accuracy"] for r in runs]
        spec = NORMS[norm]
        rows.append({
            "norm": norm, "label": norm_label(norm, config),
            "norm_batch": config.norm_batch if spec.micro_batched else (config.batch_size if norm != "gn" else None),
            "conv": "centered" if spec.centered_conv else "plain",
            "seeds": [r["seed"] for r in runs], "accuracies": accuracies,
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "diverged": sum(r["diverged"] for r in runs),
            "seconds_per_iteration": statistics.fmean(r["seconds_per_iteration"] for r in runs),
            "run_wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs),
        })
    first = results[0]
    return {"config": dataclasses.asdict(config), "rows": rows, "total_iters": first["total_iters"],
            "test_images": first["test_images"]}


def write_results_markdown(summary: dict, path: Path) -> None:
    config = summary["config"]
    lines = [
        "# Small-batch study: Fashion-MNIST classification", "",
        f"SmallResNet widths {tuple(config['widths'])}, {config['blocks_per_stage']} blocks/stage; "
        f"SGD batch {config['batch_size']}, {summary['total_iters']} iterations, lr {config['lr']} "
        f"(warm-up {config['warmup_iters']} it., cosine), momentum {config['momentum']}, "
        f"weight decay {config['weight_decay']}. Micro-batched norms: {config['batch_size'] // config['norm_batch']} "
        f"forwards of {config['norm_batch']} per SGD step. MABN: buffer {config['mabn_buffer_size']}, EMA decay "
        f"{config['mabn_ema_decay']}, warm-up {config['mabn_warmup_iters']} / re-norm warm-up "
        f"{config['mabn_renorm_warmup_iters']} norm forwards, clip {config['mabn_renorm_clip']}; "
        f"stem centralized: {config['center_stem']}.",
        f"Test accuracy (%) on {summary['test_images']} test images after the last iteration; "
        "mean ± sample std over seeds.", "",
        "| norm | norm. batch | conv | test acc. | per seed | diverged | s/iter | run wall (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        per_seed = ", ".join(f"{a:.2f}" for a in row["accuracies"])
        batch = row["norm_batch"] if row["norm_batch"] is not None else "per sample"
        lines.append(
            f"| {row['label']} | {batch} | {row['conv']} | {row['mean']:.2f} ± {row['std']:.2f} | {per_seed} | "
            f"{row['diverged']} | {row['seconds_per_iteration']:.3f} | {row['run_wall_seconds'] / 60:.1f} |"
        )
    lines += [
        "", f"torch {summary.get('torch_version')}, git commit {summary.get('git_commit') or 'unknown'}, "
        f"{summary.get('jobs')} job(s) x {summary.get('threads')} thread(s); "
        f"study wall time {summary.get('study_wall_seconds', 0) / 60:.1f} min "
        "(this invocation; finished runs are not retrained).", "",
        "![test accuracy curves](accuracy_curves.png)", "",
    ]
    atomic_write_text(str(path), "\n".join(lines))


def plot_accuracy_curves(results: List[dict], norms: Sequence[str], path: Path) -> List[str]:
    """Curve-subset test accuracy against epochs, mean over seeds per norm (band: min to max).

    Returns the legend labels drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = []
    for norm in norms:
        runs = [r for r in results if r["norm"] == norm]
        length = min(len(r["history"]) for r in runs)
        if length == 0:
            continue
        epochs = [h["epoch"] for h in runs[0]["history"][:length]]
        curves = np.array([[h["curve_test_accuracy"] for h in r["history"][:length]] for r in runs])
        line, = ax.plot(epochs, curves.mean(0), marker="o", ms=3, label=f"{runs[0]['label']} (n={len(runs)})")
        drawn.append(line.get_label())
        ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test accuracy (%) on {results[0]['curve_test_images']} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(str(path), lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return drawn
