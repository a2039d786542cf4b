"""Record the batch statistics that BN uses in its forward and backward pass, per layer and iteration.

MABN's premise is that at small batches four batch statistics are noisy: mu_B and sigma2_B in
the forward, g_B and Psi_B in the backward (docs/algorithm.md). `BatchStatsRecorder` measures
them on any model's norm layers with hooks, without changing training, so the noise can be
plotted and quantified (`relative_fluctuation`). It syncs with the host on every step: it is a
diagnostics tool, not something to leave attached to a training run.
"""
import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mabn_d2.utils.atomic_io import atomic_write, atomic_write_text
from .ablations import MABNCentered2d
from mabn_d2.layers import BatchRenorm2d, MABN2d
from mabn_d2.layers.channel_ops import CHANNEL_REDUCTION_DIMS as _DIMS

__all__ = [
    "BATCH_STATISTICS",
    "NORM_TYPES",
    "BatchStatsRecorder",
    "moving_average",
    "absolute_fluctuation",
    "relative_fluctuation",
    "plot_batch_statistics",
]

BATCH_STATISTICS = ("mu_B", "sigma2_B", "g_B", "Psi_B")
# Ring buffers of MABN-style layers -> name of their moving average (mean over rows) in a record.
_MOVING_AVERAGE_BUFFERS = {
    "x2_buffer": "chi2_sma",
    "gz_buffer": "psi_sma",
    "mean_buffer": "mu_sma",
    "grad_mean_buffer": "g_sma",
}
_BACKWARD_STATISTICS = ("g_B", "Psi_B", "psi_sma", "g_sma")
# Layers recorded when no names are given (BatchNorm2d covers detectron2's NaiveSyncBatchNorm).
NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, BatchRenorm2d, MABN2d, MABNCentered2d,
)


class BatchStatsRecorder:
    """Hooks chosen norm layers and records, per training forward of each layer:

    forward (from the layer input x, per channel over N, H, W):
      mu_B = mean(x), sigma2_B = var(x) (biased), chi2_B = mean(x^2)
    backward (from dy = dL/dy of the layer output, weight = the layer's gamma):
      g = dy * gamma (= dL/dx_hat),  g_B = mean(g),  Psi_B = mean(g * x_hat),
      x_hat = (x - mu_B) / sqrt(sigma2_B + eps)   (eps: the layer's, else 1e-5)
    and, for layers with MABN ring buffers, the moving averages after the step: chi2_sma and
    psi_sma (means over the rows of x2_buffer and gz_buffer), plus mu_sma and g_sma where the
    layer keeps them. These are BN's statistics whatever the layer normalizes with, so layers
    of different kinds are compared on the same quantities.

    One record per training-mode forward ("iteration" in MABN's sense): a layer applied to
    16 micro-batches per optimizer step gives 16 records. Forwards without a backward (no grad)
    get NaN backward statistics. Use as a context manager or with attach()/detach().
    """

    def __init__(self, model: nn.Module, layer_names: Optional[Sequence[str]] = None):
        modules = dict(model.named_modules())
        if layer_names is None:
            layer_names = [name for name, m in modules.items() if isinstance(m, NORM_TYPES)]
        missing = [name for name in layer_names if name not in modules]
        if missing:
            raise KeyError(f"BatchStatsRecorder: no module named {missing}; norm layers: "
                           f"{[n for n, m in modules.items() if isinstance(m, NORM_TYPES)]}")
        if not layer_names:
            raise ValueError("BatchStatsRecorder: the model has no norm layers to record")
        self.layers: Dict[str, nn.Module] = {name: modules[name] for name in layer_names}
        self.records: Dict[str, List[Dict[str, torch.Tensor]]] = {name: [] for name in layer_names}
        self._handles: List = []

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "BatchStatsRecorder":
        if not self._handles:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BatchStatsRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _forward_hook(self, name: str):
        def hook(layer: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            if not layer.training or x.dim() != 4 or x.numel() == 0:
                return
            with torch.no_grad():
                x = x.detach().float()
                var, mu = torch.var_mean(x, dim=_DIMS, correction=0)
                record = {"mu_B": mu.cpu(), "sigma2_B": var.cpu(), "chi2_B": (x * x).mean(_DIMS).cpu()}
                record.update(self._buffer_averages(layer, ("x2_buffer", "mean_buffer")))
                eps = float(getattr(layer, "eps", 1e-5))
                x_hat = (x - mu.view(1, -1, 1, 1)) / (var + eps).sqrt().view(1, -1, 1, 1)
                gamma = getattr(layer, "weight", None)
                gamma = None if gamma is None else gamma.detach().float().clone()
            self.records[name].append(record)
            node = output.grad_fn if isinstance(output, torch.Tensor) else None
            if node is not None:
                # A post-hook on the layer's own autograd node runs after its backward, when the
                # ring buffers hold this step's Psi_B; grad_outputs is dL/dy even if y is later
                # modified in place (e.g. relu_).
                node.register_hook(self._backward_hook(layer, record, x_hat, gamma, output.output_nr))

        return hook

    def _backward_hook(self, layer: nn.Module, record: Dict, x_hat: torch.Tensor,
                       gamma: Optional[torch.Tensor], output_nr: int):
        def hook(grad_inputs, grad_outputs) -> None:
            dy = grad_outputs[output_nr]
            if dy is None:
                return
            with torch.no_grad():
                g = dy.detach().float()
                if gamma is not None:
                    g = g * gamma.view(1, -1, 1, 1)
                record["g_B"] = g.mean(_DIMS).cpu()
                record["Psi_B"] = (g * x_hat).mean(_DIMS).cpu()
                record.update(self._buffer_averages(layer, ("gz_buffer", "grad_mean_buffer")))

        return hook

    @staticmethod
    def _buffer_averages(layer: nn.Module, buffer_names: Iterable[str]) -> Dict[str, torch.Tensor]:
        out = {}
        for buffer_name in buffer_names:
            buffer = getattr(layer, buffer_name, None)
            if isinstance(buffer, torch.Tensor):
                out[_MOVING_AVERAGE_BUFFERS[buffer_name]] = buffer.detach().float().mean(0).cpu()
        return out

    # ------------------------------------------------------------------ results
    def series(self, layer_name: str, statistic: str) -> torch.Tensor:
        """[iterations, channels] float32; NaN where a forward had no backward."""
        rows = []
        for record in self.records[layer_name]:
            value = record.get(statistic)
            if value is None:
                if statistic not in _BACKWARD_STATISTICS:
                    raise KeyError(f"layer {layer_name!r} records no statistic {statistic!r}")
                value = torch.full_like(record["mu_B"], float("nan"))
            rows.append(value)
        return torch.stack(rows) if rows else torch.empty(0, 0)

    def statistics(self, layer_name: str) -> List[str]:
        """Names recorded for the layer: BATCH_STATISTICS, chi2_B, and any moving averages."""
        names = list(BATCH_STATISTICS) + ["chi2_B"]
        for record in self.records[layer_name]:
            names += [k for k in record if k not in names]
        return names

    def to_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{layer name: {statistic: [iterations, channels] float32 tensor}}."""
        return {name: {stat: self.series(name, stat) for stat in self.statistics(name)} for name in self.layers}

    def save(self, path: Union[str, Path]) -> Path:
        """Writes to_dict() as .pt (tensors) or .json (nested lists; NaN as null)."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix == ".json":
            def plain(t: torch.Tensor):
                return [[None if v != v else v for v in row] for row in t.tolist()]

            atomic_write_text(str(path), json.dumps({n: {s: plain(t) for s, t in d.items()} for n, d in data.items()}))
        elif path.suffix == ".pt":
            atomic_write(str(path), lambda f: torch.save(data, f))
        else:
            raise ValueError(f"BatchStatsRecorder.save: use a .pt or .json path, got {path}")
        return path


def moving_average(series: torch.Tensor, window: int = 16) -> torch.Tensor:
    """Trailing simple moving average along dim 0, including the current value (as MABN's SMA).

    Entry t averages series[t - window + 1 .. t]; the first window - 1 entries average what
    exists so far.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    s = series.double()
    cumsum = torch.cumsum(s, dim=0)
    shifted = torch.cat([torch.zeros_like(cumsum[:window]), cumsum[:-window]], dim=0)[: s.shape[0]]
    counts = torch.arange(1, s.shape[0] + 1, dtype=torch.float64).clamp(max=window)
    counts = counts.view(-1, *([1] * (s.dim() - 1)))
    return ((cumsum - shifted) / counts).to(series.dtype)


def absolute_fluctuation(series: torch.Tensor, window: int = 16) -> float:
    """mean_{t, c} |s[t, c] - SMA[t, c]| over full windows, in the statistic's own units.

    The numerator of `relative_fluctuation`. For statistics that fluctuate around zero (g_B,
    Psi_B) the relative value barely depends on the noise level, since |SMA| grows with it;
    comparing this absolute value between runs (e.g. BN(2) / BN(32)) shows the difference.
    """
    if series.shape[0] < window:
        raise ValueError(f"need at least {window} iterations, got {series.shape[0]}")
    s = series.double()
    return float((s[window - 1:] - moving_average(s, window)[window - 1:]).abs().mean())


def relative_fluctuation(series: torch.Tensor, window: int = 16) -> float:
    """How far a statistic strays from its own moving average, relative to that average's size.

        rel = mean_{t, c} |s[t, c] - SMA[t, c]|  /  mean_{t, c} |SMA[t, c]|

    with SMA the trailing `moving_average` over `window` iterations, and t restricted to full
    windows (t >= window - 1). `series` is [iterations] or [iterations, channels] and must be
    finite. 0 means the statistic equals its moving average; ~1 means its deviations are as
    large as the average itself. Statistics whose average is near zero (mu_B after a centred
    convolution, g_B, Psi_B) give large values by construction, and for pure noise around zero
    the ratio does not depend on the noise level: compare those with `absolute_fluctuation`.
    """
    if series.shape[0] < window:
        raise ValueError(f"need at least {window} iterations, got {series.shape[0]}")
    sma = moving_average(series.double(), window)[window - 1:]
    return absolute_fluctuation(series, window) / float(sma.abs().mean())


def plot_batch_statistics(
    runs: Mapping[str, Tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    path: Union[str, Path],
    channel: int = 0,
    window: int = 16,
    title: str = "",
) -> Path:
    """One column per run, one row per statistic in BATCH_STATISTICS: values of `channel` and their SMA.

    `runs` maps a label to (x values, {statistic: [iterations, channels]}); x is typically the
    number of training images seen, so runs with different normalization batches line up.
    Rows share their y-axis so noise levels compare at a glance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    fig, axes = plt.subplots(len(BATCH_STATISTICS), len(labels), figsize=(4.2 * len(labels), 9),
                             sharey="row", squeeze=False)
    for col, label in enumerate(labels):
        x, stats = runs[label]
        for row, stat in enumerate(BATCH_STATISTICS):
            ax = axes[row][col]
            values = stats[stat][:, channel]
            ax.plot(x.numpy(), values.numpy(), lw=0.6, alpha=0.7, label=stat)
            ax.plot(x.numpy(), moving_average(values, window).numpy(), lw=1.2, color="k", label=f"SMA({window})")
            if row == 0:
                ax.set_title(label)
            if col == 0:
                ax.set_ylabel(stat)
            if row == len(BATCH_STATISTICS) - 1:
                ax.set_xlabel("training images seen")
        axes[0][col].legend(loc="upper right", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(str(path), lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return path
