"""Re-estimate MABN's running_var at fixed weights, detectron2's PreciseBN for MABN.

MABN evaluates with running_var, an EMA of the statistics training normalized with. When the
weights move fast (short schedules, high learning rates) that EMA lags the final weights. Here
the second moment each MABN layer sees in training-mode forwards of the final model is averaged
over a number of batches and written into running_var; nothing else changes. Comparing the
evaluation before and after isolates the train/eval mismatch from what the weights learned.
"""
import copy
import itertools
import json
import logging
import os
from typing import Dict, Iterable

import torch
from torch import nn

from .layers import MABN2d
from .layers.channel_ops import channel_sum_of_squares

__all__ = ["update_mabn_running_var", "reestimate_run_checkpoints"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def update_mabn_running_var(model: nn.Module, data_loader: Iterable, num_iters: int = 100) -> int:
    """Set every MABN2d's running_var to the mean of chi2_B over `num_iters` training batches.

    The batches run through a deep copy of `model` in training mode (so each layer sees the
    inputs training gives it), leaving `model`'s weights, ring buffers and counters untouched;
    only running_var of `model`'s MABN2d layers is replaced. Channels whose statistic is not
    finite in some batch keep their old value. Returns the number of layers updated.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    targets: Dict[str, MABN2d] = {name: m for name, m in model.named_modules() if isinstance(m, MABN2d)}
    if not targets:
        return 0
    work = copy.deepcopy(model).train()
    sums: Dict[str, torch.Tensor] = {}
    finite: Dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, inputs) -> None:
            x = inputs[0]
            if x.numel() == 0:
                return
            chi2 = channel_sum_of_squares(x.detach(), torch.float64) / (x.numel() // x.shape[1])
            ok = torch.isfinite(chi2)
            sums[name] = sums.get(name, torch.zeros_like(chi2)) + torch.where(ok, chi2, torch.zeros_like(chi2))
            finite[name] = finite.get(name, torch.zeros_like(chi2)) + ok.double()

        return hook

    for name, module in work.named_modules():
        if name in targets:
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        batches = 0
        for batch in itertools.islice(data_loader, num_iters):
            work(batch)
            batches += 1
    finally:
        for handle in hooks:
            handle.remove()
    if batches < num_iters:
        logger.warning("update_mabn_running_var: the data loader gave %d of %d batches", batches, num_iters)
    for name, layer in targets.items():
        if name not in sums:
            continue
        count = finite[name]
        estimate = (sums[name] / count.clamp(min=1)).to(layer.running_var.dtype)
        layer.running_var.copy_(torch.where(count > 0, estimate, layer.running_var))
    logger.info("Re-estimated running_var of %d MABN layers from %d batches", len(sums), batches)
    return len(sums)


def _checkpoint_for(run_dir: str, iterations: int, max_iter: int) -> str:
    name = "model_final.pth" if iterations >= max_iter else f"model_{iterations - 1:07d}.pth"
    return os.path.join(run_dir, name)


def evaluation_records(metrics_path: str, max_iter: int) -> Dict[int, Dict]:
    """{iterations trained: record} for every evaluation in a detectron2 metrics.json.

    detectron2 logs a periodic evaluation under the index of its last iteration and the final
    one, run after training, under MAX_ITER itself; both map to the number of iterations trained.
    """
    records: Dict[int, Dict] = {}
    if not os.path.exists(metrics_path):
        return records
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if "bbox/AP" in record or "segm/AP" in record:
                index = int(record["iteration"])
                records[index if index >= max_iter else index + 1] = record
    return records


def reestimate_run_checkpoints(run_dir: str, output_dir: str, num_batches: int = 100,
                               all_evaluated: bool = False) -> Dict[int, Dict[str, float]]:
    """Re-estimate running_var at a run's checkpoints and evaluate; {iterations: flat metrics}.

    Reads run_dir/config.yaml; evaluates model_final.pth, or with `all_evaluated` every
    checkpoint whose iteration the run evaluated. Results are appended to
    output_dir/metrics.json; checkpoints already there are skipped.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from .atomic_io import atomic_write_text
    from .data.builtin import register_demo_datasets
    from .engine import MABNTrainer, setup_cfg

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: --run-dir must be a detectron2 run directory")
    cfg = setup_cfg(config_path, ["OUTPUT_DIR", output_dir])
    register_demo_datasets(cfg)
    max_iter = cfg.SOLVER.MAX_ITER
    source_records = evaluation_records(os.path.join(run_dir, "metrics.json"), max_iter)
    wanted = sorted(source_records) if all_evaluated else [max_iter]
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "config.yaml"), cfg.dump())
    metrics_path = os.path.join(output_dir, "metrics.json")
    done = set(evaluation_records(metrics_path, max_iter))
    results: Dict[int, Dict[str, float]] = {}
    for iterations in wanted:
        if iterations in done:
            continue
        checkpoint = _checkpoint_for(run_dir, iterations, max_iter)
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"{checkpoint} not found (needed for iteration {iterations})")
        model = MABNTrainer.build_model(cfg)
        DetectionCheckpointer(model).load(checkpoint)
        seed_all_rng(cfg.SEED + iterations)
        with EventStorage(iterations):  # detectron2's training forward logs into an event storage
            updated = update_mabn_running_var(model, build_detection_train_loader(cfg), num_batches)
        if updated == 0:
            raise ValueError(f"{run_dir}: the model has no MABN layer to re-estimate")
        evaluation = MABNTrainer.test(cfg, model)
        flat = {f"{task}/{key}": float(value) for task, values in evaluation.items() for key, value in values.items()}
        results[iterations] = flat
        previous = open(metrics_path).read() if os.path.exists(metrics_path) else ""
        index = iterations if iterations >= max_iter else iterations - 1  # detectron2's convention
        record = json.dumps({"iteration": index, "reestimated_from": checkpoint,
                             "reestimate_batches": num_batches, **flat})
        atomic_write_text(metrics_path, previous + record + "\n")
    return results
