"""The paper's training geometry in one process: 8 virtual GPUs x 2 images, one SGD step of 16.

The paper trains COCO on 8 GPUs with 2 images each: BN normalizes over 2 images while every SGD
step averages the gradients of 16, and each GPU's MABN buffer spans 16 steps of the 16-image
batch. One process at 2 images per step is a different regime (normalization batch = SGD batch).
This module reproduces the paper's geometry on one CPU process:

- a step draws 16 images, splits them into 8 micro-batches of 2, runs forward and backward on
  each and accumulates the gradients (each micro-batch's loss divided by 8, as DDP averages the
  per-GPU gradients), then takes one optimizer step;
- norm state is either per virtual GPU (`ReplicaNormStates`: 8 copies of every norm buffer and
  MABN's host counter, swapped in before each micro-batch, as DDP with broadcast_buffers=False
  keeps one state per rank) or shared (one state advancing 8 times per step);
- SyncBN(16) is one forward over all 16 images: BN over the whole SGD batch is what
  synchronized statistics over 8 GPUs compute.

Evaluation and checkpoints see virtual GPU 0's state, which is what rank 0 saves. A resumed run
restarts virtual GPUs 1-7 from that state. Optionally, per-image photometric jitter (brightness
and contrast) gives the images the per-image scale variation that real photos have.

Run one arm: ``python -m research.paper_setting --arm MABN_per_gpu --output-dir D [KEY VALUE ...]``;
the whole study: ``tools/detection_study.py --virtual-gpus 8``.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.engine import SimpleTrainer
from detectron2.utils.env import seed_all_rng
from torch import nn

from mabn_d2.engine.trainer import MABNTrainer, setup_cfg
from mabn_d2.layers import MABN2d
from mabn_d2.layers.base import HostIterationCounter
from demo_datasets.builtin import register_demo_datasets
from .recipe import RECIPES, Schedule, official_schedule, variant_schedule

__all__ = ["Arm", "ARMS", "DEFAULT_ARMS", "RECIPES", "Schedule", "official_schedule", "variant_schedule", "ReplicaNormStates",
           "MicroBatchTrainer", "VirtualGPUTrainer", "Chi2Recorder", "summarize_chi2", "main"]

logger = logging.getLogger(__name__)

_DEMO = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_{}.yaml"
# Layers whose buffers hold per-replica normalization state (SyncBatchNorm is not a BatchNorm2d).
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, HostIterationCounter)
# Layers whose chi2 lag the study reports by name (R-18 FPN demo model), plus the median over all.
CHI2_LAYERS = {
    "stem": "backbone.bottom_up.stem.conv1.norm",
    "res4.1.conv2": "backbone.bottom_up.res4.1.conv2.norm",
    "box_head.conv4": "roi_heads.box_head.conv4.norm",
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: a demo config, how micro-batches share norm state, and at most one change to the recipe.

    The one-change fields: `renorm=False` keeps re-normalization off; `sma_after_lr_warmup` moves
    the switch to moving averages past the LR warm-up (5/4 of it); `jitter` replaces the recipe's.
    """

    description: str
    config: str
    norm_state: str  # "sync" (one forward of the whole step), "per_gpu" or "shared"
    renorm: bool = True
    sma_after_lr_warmup: bool = False
    jitter: Optional[float] = None

    def is_mabn(self) -> bool:
        return "mabn" in os.path.basename(self.config)

    def jitter_for(self, schedule: Schedule) -> float:
        return schedule.jitter if self.jitter is None else self.jitter

    def phase_steps(self, schedule: Schedule) -> Tuple[int, int]:
        """(moving averages from, re-normalization from) in SGD steps; re-normalization past the end when off."""
        sma = int(round(schedule.lr_warmup * 5 / 4)) if self.sma_after_lr_warmup else schedule.sma_start
        renorm = schedule.renorm_start if self.renorm else 1_000_000
        return sma, renorm

    def opts(self, schedule: Schedule) -> List[str]:
        """The recipe's solver overrides plus MABN's warm-ups in the layers' own iterations."""
        result = list(schedule.solver_opts)
        if self.is_mabn():
            per_step = 8 if self.norm_state == "shared" else 1
            sma, renorm = self.phase_steps(schedule)
            result += ["MODEL.MABN.WARMUP_FRACTION", "-1.0", "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0",
                       "MODEL.MABN.WARMUP_ITERS", str(sma * per_step),
                       "MODEL.MABN.RENORM_WARMUP_ITERS", str(renorm * per_step)]
        return result


ARMS: Dict[str, Arm] = {
    "SyncBN16": Arm("BN over all 16 images of the step (SyncBN over 8 GPUs x 2)", _DEMO.format("bn"), "sync"),
    "BN2": Arm("BN over each micro-batch of 2, one state per virtual GPU", _DEMO.format("bn"), "per_gpu"),
    "MABN_per_gpu": Arm("MABN, one state per virtual GPU (its buffer spans 16 steps)", _DEMO.format("mabn"),
                        "per_gpu"),
    "MABN_shared": Arm("MABN, one state for all 8 micro-batches (its buffer spans 2 steps)", _DEMO.format("mabn"),
                       "shared"),
    "GN": Arm("GroupNorm(32)", _DEMO.format("gn"), "shared"),
    # One-change attribution arms of MABN_per_gpu.
    "MABN_per_gpu_no_renorm": Arm("MABN per virtual GPU, re-normalization off", _DEMO.format("mabn"), "per_gpu",
                                  renorm=False),
    "MABN_per_gpu_late_switch": Arm("MABN per virtual GPU, moving averages from after the LR warm-up",
                                    _DEMO.format("mabn"), "per_gpu", sma_after_lr_warmup=True),
    "MABN_per_gpu_jitter": Arm("MABN per virtual GPU, brightness/contrast jitter 0.4", _DEMO.format("mabn"),
                               "per_gpu", jitter=0.4),
}
# What `tools/detection_study.py --virtual-gpus 8` trains without --variants: the three arms of the
# question, then the one-change attribution arms of MABN_per_gpu.
DEFAULT_ARMS = ("SyncBN16", "BN2", "MABN_per_gpu", "MABN_per_gpu_no_renorm", "MABN_per_gpu_late_switch",
                "MABN_per_gpu_jitter", "MABN_shared")


class ReplicaNormStates:
    """One copy of every norm buffer (and MABN's host counter) per virtual GPU.

    `use(k)` points the model's norm modules at replica k's tensors (no copy) for the duration of
    a micro-batch's forward and backward; replica 0 is the model's own tensors, so evaluation,
    checkpoints and loads see (and write) replica 0.
    """

    def __init__(self, model: nn.Module, replicas: int):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.modules = [m for m in model.modules() if isinstance(m, NORM_TYPES) and any(
            True for _ in m.named_buffers(recurse=False))]
        self._buffers: List[List[Dict[str, torch.Tensor]]] = [
            [dict(m.named_buffers(recurse=False)) for m in self.modules]]
        self._iterations: List[List[int]] = [[getattr(m, "_iteration", 0) for m in self.modules]]
        for _ in range(1, replicas):
            self._buffers.append([{n: b.clone() for n, b in state.items()} for state in self._buffers[0]])
            self._iterations.append(list(self._iterations[0]))
        self.active = 0

    @property
    def replicas(self) -> int:
        return len(self._buffers)

    def _activate(self, k: int) -> None:
        for i, m in enumerate(self.modules):
            if hasattr(m, "_iteration"):
                self._iterations[self.active][i] = m._iteration
                m._iteration = self._iterations[k][i]
            for name, buffer in self._buffers[k][i].items():
                setattr(m, name, buffer)  # a registered buffer name: Module.__setattr__ swaps it
        self.active = k

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator[None]:
        """Replica k's state inside the block, replica 0's afterwards."""
        self._activate(k)
        try:
            yield
        finally:
            self._activate(0)


class Chi2Recorder:
    """The batch statistic each norm layer divides by, against what it could divide by, per SGD step.

    For every micro-batch k, each tracked layer's per-channel statistic of its input: chi2_B (mean
    square) for MABN, the biased variance for BatchNorm. Per step, on virtual GPU 0's micro-batch,
    one JSON line holds per layer the median over channels of |log ratio| and of the signed log
    ratio for:

    - "sma": chi2_B / SMA, where SMA is MABN's buffer mean after the forward wrote chi2_B into it
      (what the layer divides by once moving averages are on), once the buffer is full;
    - "step": chi2_B / chi2_step, where chi2_step is the mean of the 8 micro-batches' statistics,
      the statistic pooled over the step's 16 images at the same weights: nothing in it is stale,
      so it is the control for the first.

    With one forward over the whole step (SyncBN16), a layer whose batch splits into 8 equal parts
    (images in the backbone and FPN, 64 ROIs per image in the box head) gets the same "step" value
    from its first 1/8 against the whole; other layers are skipped.
    """

    def __init__(self, model: nn.Module, path: str, micro_batches: int):
        self.path = path
        self.micro_batches = micro_batches
        self.active = False
        self.micro = 0
        self.iteration = 0
        self._moments: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._variance: Dict[str, bool] = {}
        self._sma: Dict[str, Tuple[float, float]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                         if isinstance(m, (MABN2d, nn.BatchNorm2d))]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if not (self.active and module.training):
                return
            with torch.no_grad():
                x = inputs[0].detach().float()
                if x.dim() != 4 or x.shape[0] == 0:
                    return
                self._variance[name] = not isinstance(module, MABN2d)
                if self.micro_batches > 1 and self._single_forward:
                    if x.shape[0] % self.micro_batches:
                        return
                    parts = x.reshape(self.micro_batches, x.shape[0] // self.micro_batches, *x.shape[1:])
                    means, squares = parts.mean(dim=(1, 3, 4)), parts.pow(2).mean(dim=(1, 3, 4))
                    self._moments[name] = list(zip(means.unbind(0), squares.unbind(0)))
                    return
                mean, square = x.mean(dim=(0, 2, 3)), x.pow(2).mean(dim=(0, 2, 3))
                self._moments.setdefault(name, []).append((mean, square))
                if self.micro == 0 and isinstance(module, MABN2d) and module.iteration > module.buffer_size:
                    sma = module.x2_buffer.float().mean(dim=0).clamp_min(1e-20)
                    self._sma[name] = _medians((square.clamp_min(1e-20) / sma).log())
        return hook

    _single_forward = False

    def start_step(self, iteration: int, single_forward: bool) -> None:
        self.iteration, self._single_forward, self.active = iteration, single_forward, True
        self._moments, self._sma = {}, {}

    def flush(self) -> None:
        """Append this step's row to the JSON-lines file (layers seen on every micro-batch only).

        Pooled over equal micro-batches, the mean square is the mean of theirs, and the variance is
        the mean square of all less the square of the mean of all.
        """
        self.active = False
        step = {}
        for name, moments in self._moments.items():
            if len(moments) != self.micro_batches or any(m[0].shape != moments[0][0].shape for m in moments):
                continue
            means = torch.stack([m[0] for m in moments])
            squares = torch.stack([m[1] for m in moments])
            if self._variance.get(name):
                first = squares[0] - means[0].pow(2)
                pooled = squares.mean(dim=0) - means.mean(dim=0).pow(2)
            else:
                first, pooled = squares[0], squares.mean(dim=0)
            step[name] = _medians((first.clamp_min(1e-20) / pooled.clamp_min(1e-20)).log())
        if step or self._sma:
            with open(self.path, "a") as f:
                f.write(json.dumps({"iteration": self.iteration, "sma": self._sma, "step": step}) + "\n")
        self._moments, self._sma = {}, {}


def _medians(log_ratio: torch.Tensor) -> Tuple[float, float]:
    """(median |log ratio|, median log ratio) over channels."""
    return float(log_ratio.abs().median()), float(log_ratio.median())


class MicroBatchTrainer(SimpleTrainer):
    """SimpleTrainer whose step is `micro_batches` forward/backward passes with accumulated gradients."""

    def __init__(self, model, data_loader, optimizer, micro_batches: int, norm_state: str,
                 chi2_recorder: Optional[Chi2Recorder] = None):
        super().__init__(model, data_loader, optimizer)
        if norm_state not in ("sync", "per_gpu", "shared"):
            raise ValueError(f"norm_state must be 'sync', 'per_gpu' or 'shared', got {norm_state!r}")
        self.micro_batches = micro_batches
        self.norm_state = norm_state
        self.replicas = ReplicaNormStates(model, micro_batches) if norm_state == "per_gpu" else None
        self.chi2_recorder = chi2_recorder

    def _chunks(self, data: List[Dict]) -> List[List[Dict]]:
        if self.norm_state == "sync":
            return [data]
        if len(data) % self.micro_batches:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={len(data)} does not split into {self.micro_batches} "
                             "equal micro-batches")
        size = len(data) // self.micro_batches
        return [data[k * size:(k + 1) * size] for k in range(self.micro_batches)]

    def run_step(self) -> None:
        assert self.model.training, "[MicroBatchTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        chunks = self._chunks(data)
        self.optimizer.zero_grad()
        summed: Dict[str, torch.Tensor] = {}
        if self.chi2_recorder is not None:
            self.chi2_recorder.start_step(self.iter, single_forward=len(chunks) == 1)
        for k, chunk in enumerate(chunks):
            if self.chi2_recorder is not None:
                self.chi2_recorder.micro = k
            with self.replicas.use(k) if self.replicas is not None else contextlib.nullcontext():
                loss_dict = self.model(chunk)
                (sum(loss_dict.values()) / len(chunks)).backward()
            for name, value in loss_dict.items():
                summed[name] = summed.get(name, 0) + value.detach() / len(chunks)
        if self.chi2_recorder is not None:
            self.chi2_recorder.flush()
        self._write_metrics(summed, data_time)
        self.optimizer.step()


class VirtualGPUTrainer(MABNTrainer):
    """MABNTrainer whose step is 8 micro-batches (set `arm`, `micro_batches`, `jitter` before building)."""

    arm: Arm = ARMS["MABN_per_gpu"]
    micro_batches: int = 8
    jitter: float = 0.0  # brightness and contrast drawn uniformly from [1 - jitter, 1 + jitter] per image

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        recorder = None
        if any(isinstance(m, (MABN2d, nn.BatchNorm2d)) for m in self.model.modules()):
            recorder = Chi2Recorder(self.model, os.path.join(cfg.OUTPUT_DIR, "chi2.jsonl"), self.micro_batches)
        self._trainer = MicroBatchTrainer(self.model, self.data_loader, self.optimizer, self.micro_batches,
                                          self.arm.norm_state, recorder)

    @classmethod
    def build_train_mapper(cls, cfg: CfgNode) -> DatasetMapper:
        args = DatasetMapper.from_config(cfg, True)
        if cls.jitter > 0:
            low, high = 1.0 - cls.jitter, 1.0 + cls.jitter
            args["augmentations"] = list(args["augmentations"]) + [T.RandomBrightness(low, high),
                                                                  T.RandomContrast(low, high)]
        return DatasetMapper(**args)


def summarize_chi2(path: str, edges: Sequence[int]) -> Dict[str, Dict[str, Dict[str, Tuple[float, float]]]]:
    """{"sma" | "step": {window "a-b": {layer label: (median |log ratio|, median log ratio)}}} over the
    steps in each window (Chi2Recorder's rows).

    Layer labels are CHI2_LAYERS' plus "all layers" (the median over every layer's per-step values).
    """
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    summary: Dict[str, Dict[str, Dict[str, Tuple[float, float]]]] = {}
    for kind in ("sma", "step"):
        for a, b in zip(edges, edges[1:]):
            window = [r[kind] for r in rows if a <= r["iteration"] < b and r.get(kind)]
            if not window:
                continue
            cells: Dict[str, Tuple[float, float]] = {}
            for label, name in CHI2_LAYERS.items():
                values = [layers[name] for layers in window if name in layers]
                if values:
                    cells[label] = _window_medians(values)
            cells["all layers"] = _window_medians([v for layers in window for v in layers.values()])
            summary.setdefault(kind, {})[f"{a}-{b}"] = cells
    return summary


def _window_medians(values: Sequence[Sequence[float]]) -> Tuple[float, float]:
    return (round(statistics.median(v[0] for v in values), 4), round(statistics.median(v[1] for v in values), 4))


def run_study(output_dir: str, arms: Sequence[str], seeds: Sequence[int], steps: int, eval_period: int,
              recipe: str = "official", jobs: int = 2, virtual_gpus: int = 8, opts: Sequence[str] = (),
              repo_root: str = ".", python: str = sys.executable) -> Dict[str, Dict[int, str]]:
    """Train every (arm, seed) not finished yet, `jobs` at a time, one thread each; {arm: {seed: run dir}}.

    Each run is a subprocess in output_dir/<arm>_seed<k>, resumed if it was interrupted; the
    commit it trained at and its wall time are written beside detectron2's metrics.json.
    """
    import subprocess

    from .detection_study import _append_wall_time, _record_commit, final_metrics

    pending, runs = [], {}
    for seed in seeds:
        for arm in arms:
            run_dir = os.path.join(output_dir, f"{arm}_seed{seed}")
            runs.setdefault(arm, {})[seed] = run_dir
            if final_metrics(run_dir) is None:
                pending.append((arm, seed, run_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: List[Tuple[subprocess.Popen, str, float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            arm, seed, run_dir = pending.pop(0)
            _record_commit(run_dir, repo_root)
            command = [python, "-m", "research.paper_setting", "--arm", arm, "--output-dir", run_dir,
                       "--seed", str(seed), "--virtual-gpus", str(virtual_gpus), "--recipe", recipe,
                       "--steps", str(steps), "--eval-period", str(eval_period)]
            command += ["--resume"] if os.path.exists(os.path.join(run_dir, "last_checkpoint")) else []
            command += list(opts)
            log = open(os.path.join(run_dir, "stdout.txt"), "a")
            running.append((subprocess.Popen(command, cwd=repo_root, env=env, stdout=log, stderr=log), run_dir,
                            time.time()))
            logger.info("started %s", " ".join(command))
        time.sleep(5)
        for entry in list(running):
            process, run_dir, start = entry
            if process.poll() is not None:
                running.remove(entry)
                _append_wall_time(run_dir, time.time() - start)
                if process.returncode != 0 or final_metrics(run_dir) is None:
                    logger.error("%s failed (exit %s); see %s/stdout.txt", run_dir, process.returncode, run_dir)
    return runs


def arm_config(arm: Arm, schedule: Schedule, opts: Sequence[str] = ()) -> List[str]:
    """Every override of one arm's run: the recipe's solver, the arm's MABN phases, then the caller's."""
    return [*arm.opts(schedule), *opts]


def main(argv: Optional[Sequence[str]] = None, repo_root: str = ".") -> Dict:
    parser = argparse.ArgumentParser(description="Train one arm of the paper-setting study.")
    parser.add_argument("--arm", required=True, choices=list(ARMS))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--virtual-gpus", type=int, default=8)
    parser.add_argument("--recipe", choices=list(RECIPES), default="official")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-period", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    arm = ARMS[args.arm]
    schedule = RECIPES[args.recipe](args.steps, args.eval_period)
    cfg = setup_cfg(os.path.join(repo_root, arm.config),
                    [*arm_config(arm, schedule, args.opts), "OUTPUT_DIR", args.output_dir, "SEED", str(args.seed)],
                    args=_D2Args())
    register_demo_datasets(cfg)
    seed_all_rng(cfg.SEED)
    logger.info("%s, arm %s: %s", schedule.describe(), args.arm, arm.description)
    trainer_class = type("ArmTrainer", (VirtualGPUTrainer,), {
        "arm": arm, "micro_batches": args.virtual_gpus, "jitter": arm.jitter_for(schedule)})
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train() or {}
    return results


class _D2Args:
    """What detectron2's default_setup reads from a command line."""

    config_file = ""
    eval_only = False
    resume = False


if __name__ == "__main__":
    main(sys.argv[1:])
