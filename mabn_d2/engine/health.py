"""MABN's health in the training log: scalars under `mabn/` in detectron2's EventStorage, phase changes
and the serving backend in log.txt.

What the detection studies had to measure by hand, available in every run (metrics.json and
TensorBoard through detectron2's writers):

- `mabn/phase`: the phase of the least advanced MABN layer (0 batch statistics, 1 moving averages,
  2 moving averages with re-normalization);
- `mabn/r_clipped_fraction`: the share of channels whose re-normalization factor r is at its clip;
- `mabn/chi2_log_ratio_abs_median` and `mabn/chi2_log_ratio_median`: the median over layers and
  channels of |log(chi2_B / SMA)| and of the signed log ratio, chi2_B being the latest batch's
  statistic (its ring-buffer row) and SMA the buffer's mean, what the layer divides by;
- `mabn/nonfinite_skipped`: training batches whose chi2_B or Psi_B was NaN or infinite, and which
  the layers therefore kept out of their moving averages, a running total since the layers were
  built (this process: the count is not checkpointed, a resumed run counts from 0). It is the
  largest per-layer count, i.e. the batches skipped by the most affected layer: a NaN batch that
  reaches every layer counts once, not once per layer. A rising value flags fp16 gradient
  overflows under AMP or bad inputs, which training otherwise survives silently.

Cost: the scalars are computed from the layers' state once per `period` iterations, one host
read per period; between periods the hook reads only host integers (the layers' iteration counts),
so a training step spends no synchronisation on it. The layers count skipped batches on the
device (`layers/nonfinite.py`, in both implementations of the step), so that count too is read
once per period. tools/benchmark_train.py --health-overhead measures what the hook costs a step.
"""
import logging
from typing import List, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage
from torch import nn

from ..layers import MABN2d
from ..layers.backend import selected_backend

__all__ = ["MABNHealthHook", "mabn_health_scalars", "layer_phase"]

logger = logging.getLogger(__name__)

PHASE_NAMES = ("batch statistics", "moving averages", "moving averages with re-normalization")


def layer_phase(layer: MABN2d) -> int:
    """0, 1 or 2: the phase of the layer's latest training iteration (0 before any; host integers only)."""
    done = layer.iteration
    if done > max(layer.renorm_warmup_iters, layer.warmup_iters):
        return 2
    if done <= layer.buffer_size or done < layer.warmup_iters:
        return 0
    return 1


def _skip_count(layers: List[MABN2d]) -> Optional[torch.Tensor]:
    """The largest `nonfinite_skipped` count of the layers, on their device (None if none keeps one)."""
    counts = [record[0] for record in (layer._buffers.get("nonfinite_skipped") for layer in layers)
              if record is not None]
    return torch.stack(counts).max() if counts else None


@torch.no_grad()
def mabn_health_scalars(layers: List[MABN2d]) -> dict:
    """{name: float} of the `mabn/` scalars for these layers, from their state (one host read)."""
    phases = [layer_phase(layer) for layer in layers]
    ratios, clipped, channels = [], [], 0
    for layer, phase in zip(layers, phases):
        filled = min(layer.iteration, layer.buffer_size)
        if filled == 0:
            continue
        buffer = layer.x2_buffer[:filled].float() if layer.iteration < layer.buffer_size else layer.x2_buffer.float()
        latest = layer.x2_buffer[layer.iteration % layer.buffer_size].float()
        sma = buffer.mean(dim=0)
        ratios.append((latest.clamp_min(1e-20) / sma.clamp_min(1e-20)).log())
        if phase == 2:
            r = ((sma + layer.eps) / (layer.running_var.float() + layer.eps)).sqrt()
            clipped.append(((r <= 1.0 / layer.renorm_clip) | (r >= layer.renorm_clip)).sum())
        channels += layer.num_features
    scalars = {"mabn/phase": float(min(phases)) if phases else 0.0}
    names, reads = [], []
    if ratios:
        log_ratio = torch.cat(ratios)
        finite = log_ratio[torch.isfinite(log_ratio)]
        names += ["mabn/chi2_log_ratio_abs_median", "mabn/chi2_log_ratio_median", "mabn/r_clipped_fraction"]
        reads += [
            finite.abs().median() if finite.numel() else log_ratio.new_tensor(float("nan")),
            finite.median() if finite.numel() else log_ratio.new_tensor(float("nan")),
            torch.stack(clipped).sum().float() / channels if clipped else log_ratio.new_tensor(0.0),
        ]
    skipped = _skip_count(layers)
    if skipped is not None:
        names.append("mabn/nonfinite_skipped")
        reads.append(skipped)
    if reads:
        values = torch.stack([value.float() for value in reads]).tolist()  # the one host read
        scalars.update(zip(names, values))
    return scalars


def _serving_backend(layers: List[MABN2d]) -> str:
    """Which implementation the layers' training steps ran on, from their own per-geometry decisions."""
    decided = [value for layer in layers for value in layer.__dict__.get("_backend_decisions", {}).values()]
    device = next((layer.running_var.device for layer in layers), torch.device("cpu"))
    if decided and all(decided):
        served = "Triton kernels"
    elif any(decided):
        served = "Triton kernels for some inputs, PyTorch operations for the others"
    else:
        served = "PyTorch operations"
    return f"{served} (MABN_D2_BACKEND={selected_backend()}, {len(layers)} layers on {device})"


class MABNHealthHook(HookBase):
    """Puts the `mabn/` scalars into EventStorage every `period` iterations and logs MABN's phase changes.

    MABNTrainer registers it; with a stock DefaultTrainer add it in one line:
    ``trainer.register_hooks([MABNHealthHook(period=cfg.SOLVER.get("LOG_PERIOD", 20))])`` before the
    writer hook, or anywhere (scalars put after the writer ran appear at the next write).
    """

    def __init__(self, period: int = 20, model: Optional[nn.Module] = None):
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = period
        self._model = model
        self._layers: List[MABN2d] = []
        self._phase: Optional[int] = None
        self._backend_logged = False

    def before_train(self) -> None:
        model = self._model if self._model is not None else self.trainer.model
        model = getattr(model, "module", model)  # DDP
        self._layers = [m for m in model.modules() if isinstance(m, MABN2d)]
        if self._layers:
            self._phase = self._least_phase()
            logger.info("MABN: %d layers, starting in the %s phase at iteration %d", len(self._layers),
                        PHASE_NAMES[self._phase], self.trainer.iter)

    def _least_phase(self) -> int:
        return min(layer_phase(layer) for layer in self._layers)

    def after_step(self) -> None:
        if not self._layers:
            return
        iteration = self.trainer.iter
        if not self._backend_logged:
            logger.info("MABN layers served by %s", _serving_backend(self._layers))
            self._backend_logged = True
        phase = self._least_phase()
        if phase != self._phase:
            logger.info("MABN: from iteration %d every MABN layer normalizes with %s", iteration, PHASE_NAMES[phase])
            self._phase = phase
        if (iteration + 1) % self.period == 0 or iteration + 1 == self.trainer.max_iter:
            get_event_storage().put_scalars(**mabn_health_scalars(self._layers), smoothing_hint=False)
