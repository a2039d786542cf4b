"""Re-estimate MABN's running_var at fixed weights, detectron2's PreciseBN for MABN.

MABN evaluates with running_var, an EMA of the statistics training normalized with. When the
weights move fast (short schedules, high learning rates) that EMA lags the final weights. Here
the second moment each MABN layer sees in training-mode forwards of the final model is averaged
over a number of batches and written into running_var; nothing else changes. Comparing the
evaluation before and after isolates the train/eval mismatch from what the weights learned.
"""
import copy
import itertools
import logging
from typing import Dict, Iterable

import torch
from torch import nn

from ..layers import MABN2d
from ..layers.channel_ops import channel_sum_of_squares

__all__ = ["update_mabn_running_var"]

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
