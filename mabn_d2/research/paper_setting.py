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

Run one arm: ``python -m mabn_d2.research.paper_setting --arm MABN_per_gpu --output-dir D [KEY VALUE ...]``;
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

from ..engine.trainer import MABNTrainer, setup_cfg
from ..layers import MABN2d
from ..layers.base import HostIterationCounter
from ..data.builtin import register_demo_datasets

__all__ = ["Arm", "ARMS", "ReplicaNormStates", "MicroBatchTrainer", "VirtualGPUTrainer", "Chi2LagRecorder",
           "arm_opts", "summarize_chi2_lag", "main"]

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
    """One arm: a demo config, how micro-batches share norm state, and MABN overrides."""

    description: str
    config: str
    norm_state: str  # "sync" (one forward of the whole step), "per_gpu" or "shared"
    opts: Tuple[str, ...] = ()


# MABN's moving averages start after SMA_WARMUP_STEPS SGD steps (past the LR warm-up of a short
# schedule; the paper's 100 of 180k steps is earlier still). Re-normalization stays off within the
# study's schedule: by the warm-up rule (5 / (1 - EMA_DECAY) = 250 iterations after the moving
# averages start) it cannot start in a few hundred steps, so the study measures the moving
# averages in the forward and backward pass, with r = 1.
SMA_WARMUP_STEPS = 30
RENORM_WARMUP_STEPS = 1000


def _mabn_warmups(layer_iterations_per_step: int) -> Tuple[str, ...]:
    """The warm-ups in SGD steps, expressed in the layer's own iterations (8 per step when shared)."""
    k = layer_iterations_per_step
    return ("MODEL.MABN.WARMUP_FRACTION", "-1.0", "MODEL.MABN.RENORM_WARMUP_FRACTION", "-1.0",
            "MODEL.MABN.WARMUP_ITERS", str(SMA_WARMUP_STEPS * k),
            "MODEL.MABN.RENORM_WARMUP_ITERS", str(RENORM_WARMUP_STEPS * k))


ARMS: Dict[str, Arm] = {
    "SyncBN16": Arm("BN over all 16 images of the step (SyncBN over 8 GPUs x 2)", _DEMO.format("bn"), "sync"),
    "BN2": Arm("BN over each micro-batch of 2, one state per virtual GPU", _DEMO.format("bn"), "per_gpu"),
    "MABN_per_gpu": Arm("MABN, one state per virtual GPU (its buffer spans 16 steps)",
                        _DEMO.format("mabn"), "per_gpu", _mabn_warmups(1)),
    "MABN_shared": Arm("MABN, one state for all 8 micro-batches (its buffer spans 2 steps)",
                       _DEMO.format("mabn"), "shared", _mabn_warmups(8)),
    "GN": Arm("GroupNorm(32)", _DEMO.format("gn"), "shared"),
}


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


class Chi2LagRecorder:
    """log(chi2_B / SMA) of every MABN layer on virtual GPU 0's micro-batch, once its buffer is full.

    chi2_B is the batch's mean square per channel; SMA is the buffer's mean after the forward
    wrote chi2_B into it (what the layer divides by once moving averages take over). Per step and
    layer it keeps the median over channels of |log ratio| (scatter) and of the signed log ratio
    (bias), written as one JSON line per step.
    """

    def __init__(self, model: nn.Module, path: str):
        self.path = path
        self.active = False
        self.iteration = 0
        self._rows: Dict[str, Tuple[float, float]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                         if isinstance(m, MABN2d)]

    def _hook(self, name: str):
        def hook(module: MABN2d, inputs, output) -> None:
            if not (self.active and module.training and module.iteration > module.buffer_size):
                return
            with torch.no_grad():
                x = inputs[0].float()
                chi2_b = x.pow(2).mean(dim=(0, 2, 3)).clamp_min(1e-20)
                sma = module.x2_buffer.float().mean(dim=0).clamp_min(1e-20)
                log_ratio = (chi2_b / sma).log()
                self._rows[name] = (float(log_ratio.abs().median()), float(log_ratio.median()))
        return hook

    def flush(self) -> None:
        """Append this step's row (if any layer reported) to the JSON-lines file."""
        if self._rows:
            with open(self.path, "a") as f:
                f.write(json.dumps({"iteration": self.iteration, "layers": self._rows}) + "\n")
        self._rows = {}


class MicroBatchTrainer(SimpleTrainer):
    """SimpleTrainer whose step is `micro_batches` forward/backward passes with accumulated gradients."""

    def __init__(self, model, data_loader, optimizer, micro_batches: int, norm_state: str,
                 chi2_recorder: Optional[Chi2LagRecorder] = None):
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
        for k, chunk in enumerate(chunks):
            if self.chi2_recorder is not None:
                self.chi2_recorder.active = k == 0
                self.chi2_recorder.iteration = self.iter
            with self.replicas.use(k) if self.replicas is not None else contextlib.nullcontext():
                loss_dict = self.model(chunk)
                (sum(loss_dict.values()) / len(chunks)).backward()
            for name, value in loss_dict.items():
                summed[name] = summed.get(name, 0) + value.detach() / len(chunks)
        if self.chi2_recorder is not None:
            self.chi2_recorder.active = False
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
        if any(isinstance(m, MABN2d) for m in self.model.modules()):
            recorder = Chi2LagRecorder(self.model, os.path.join(cfg.OUTPUT_DIR, "chi2_lag.jsonl"))
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


def arm_opts(steps: int, eval_period: int, lr: float = 0.02, images_per_step: int = 16,
             lr_warmup: Optional[int] = None) -> List[str]:
    """The solver of every arm: SGD batch 16 at the paper's LR 0.02, linear warm-up, cosine decay."""
    warmup = lr_warmup if lr_warmup is not None else max(1, steps // 9)
    return ["SOLVER.IMS_PER_BATCH", str(images_per_step), "SOLVER.BASE_LR", str(lr), "SOLVER.MAX_ITER", str(steps),
            "SOLVER.WARMUP_ITERS", str(warmup), "TEST.EVAL_PERIOD", str(eval_period),
            "SOLVER.CHECKPOINT_PERIOD", str(eval_period)]


def summarize_chi2_lag(path: str, edges: Sequence[int]) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """{window "a-b": {layer label: (median |log ratio|, median log ratio)}} over the steps in each window.

    Layer labels are CHI2_LAYERS' plus "all layers" (the median over every MABN layer's per-step values).
    """
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    summary: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for a, b in zip(edges, edges[1:]):
        window = [r for r in rows if a <= r["iteration"] < b]
        if not window:
            continue
        cells: Dict[str, Tuple[float, float]] = {}
        for label, name in CHI2_LAYERS.items():
            values = [r["layers"][name] for r in window if name in r["layers"]]
            if values:
                cells[label] = (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
        every = [v for r in window for v in r["layers"].values()]
        cells["all layers"] = (statistics.median(v[0] for v in every), statistics.median(v[1] for v in every))
        summary[f"{a}-{b}"] = cells
    return summary


def run_study(output_dir: str, arms: Sequence[str], seeds: Sequence[int], steps: int, eval_period: int,
              jitter: float, jobs: int = 2, virtual_gpus: int = 8, opts: Sequence[str] = (),
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
            command = [python, "-m", "mabn_d2.research.paper_setting", "--arm", arm, "--output-dir", run_dir,
                       "--seed", str(seed), "--virtual-gpus", str(virtual_gpus), "--jitter", str(jitter)]
            command += ["--resume"] if os.path.exists(os.path.join(run_dir, "last_checkpoint")) else []
            command += [*arm_opts(steps, eval_period), *opts]
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


def main(argv: Optional[Sequence[str]] = None, repo_root: str = ".") -> Dict:
    parser = argparse.ArgumentParser(description="Train one arm of the paper-setting study.")
    parser.add_argument("--arm", required=True, choices=list(ARMS))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--virtual-gpus", type=int, default=8)
    parser.add_argument("--jitter", type=float, default=0.0, help="per-image brightness/contrast jitter")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    arm = ARMS[args.arm]
    cfg = setup_cfg(os.path.join(repo_root, arm.config),
                    [*arm.opts, *args.opts, "OUTPUT_DIR", args.output_dir, "SEED", str(args.seed)], args=_D2Args())
    register_demo_datasets(cfg)
    seed_all_rng(cfg.SEED)
    trainer_class = type("ArmTrainer", (VirtualGPUTrainer,), {
        "arm": arm, "micro_batches": args.virtual_gpus, "jitter": args.jitter})
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
