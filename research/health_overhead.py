"""What MABNHealthHook costs a training step: the same model trained with the hook on and off.

One process, one model, one optimizer and one cycle of real batches from the config's train loader;
two detectron2 SimpleTrainers share them, one with the hook and one without. They take turns in
blocks of `period` steps (the order alternating per block), so the hook-on block holds exactly
one of the hook's reads of the layers, as in a run, and a load change on the machine hits both
arms alike. Per block pair: ratio = seconds(on) / seconds(off); the median ratio and the spread
of the per-pair ratios are the result. The time spent inside the hook's own calls is measured
as well, which is far less noisy than a ratio of step times on a loaded machine.

MABN layers are put past their warm-ups first (`prime_steady_state`), so the hook does all of
its work (re-normalization factors included) in the timed steps.
"""
import itertools
import statistics
import time
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from mabn_d2.engine.health import MABNHealthHook
from mabn_d2.engine.trainer import MABNTrainer
from .maskrcnn_benchmark import prime_steady_state

__all__ = ["measure_health_overhead"]


class _TimedHook(MABNHealthHook):
    """MABNHealthHook that adds up the seconds its after_step calls take (host time: on CUDA a
    period's read waits for the queued work, which the step time would spend anyway)."""

    def __init__(self, period: int):
        super().__init__(period=period)
        self.seconds: List[float] = []

    def after_step(self) -> None:
        start = time.perf_counter()
        super().after_step()
        self.seconds.append(time.perf_counter() - start)


def _step(trainer: SimpleTrainer) -> float:
    """One training step of `trainer` with its hooks, in seconds; advances its own iteration."""
    start = time.perf_counter()
    trainer.before_step()
    trainer.run_step()
    trainer.after_step()
    seconds = time.perf_counter() - start
    trainer.iter += 1
    return seconds


def measure_health_overhead(cfg: CfgNode, blocks: int, period: int, warmup_steps: int,
                            cached_batches: int = 8) -> Dict[str, Any]:
    """Block timings of hook-on and hook-off training steps and the hook's own time (see the module doc)."""
    if blocks < 1 or period < 1 or warmup_steps < 0:
        raise ValueError(f"blocks and period must be >= 1 and warmup_steps >= 0, got {blocks}, {period}, {warmup_steps}")
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    model = MABNTrainer.build_model(cfg)
    model.train()
    optimizer = MABNTrainer.build_optimizer(cfg, model)
    loader = iter(build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, True)))
    batches = itertools.cycle([next(loader) for _ in range(cached_batches)])  # no data loading in the timings
    hook = _TimedHook(period)
    on, off = SimpleTrainer(model, batches, optimizer), SimpleTrainer(model, batches, optimizer)
    on.register_hooks([hook])
    blocks_seconds: Dict[str, List[float]] = {"on": [], "off": []}
    with EventStorage(0) as storage:
        prime_steady_state(model, next(batches))
        for trainer in (on, off):
            trainer.storage, trainer.iter, trainer.start_iter, trainer.max_iter = storage, 0, 0, 1 << 40
            trainer.before_train()
        for _ in range(warmup_steps):  # untimed: allocator, caches, optimizer state
            _step(off)
        off.iter = 0
        for block in range(blocks):
            arms = (("on", on), ("off", off)) if block % 2 == 0 else (("off", off), ("on", on))
            for name, trainer in arms:
                blocks_seconds[name].append(sum(_step(trainer) for _ in range(period)))
    ratios = [a / b for a, b in zip(blocks_seconds["on"], blocks_seconds["off"])]
    steps_on = blocks * period
    reads = hook.seconds[period - 1::period]  # the steps that read the layers
    return {
        "blocks": blocks, "period": period, "steps_per_arm": steps_on, "warmup_steps": warmup_steps,
        "block_seconds": blocks_seconds,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "step_seconds_median": {name: statistics.median(s) / period for name, s in blocks_seconds.items()},
        "hook_seconds_per_step": sum(hook.seconds) / steps_on,
        "hook_read_seconds_median": statistics.median(reads) if reads else 0.0,
        "hook_share_of_step": sum(hook.seconds) / sum(blocks_seconds["on"]),
        "mabn_layers": len(hook._layers),
        "torch_threads": torch.get_num_threads(),
    }
