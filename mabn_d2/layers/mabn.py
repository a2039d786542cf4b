"""MABN2d: Moving Average Batch Normalization (Yan et al., ICLR 2020) as a thin module."""
import torch

from .base import MovingAverageNorm
from .functional import MABNFunction, mabn_inference

__all__ = ["MABN2d"]


class MABN2d(MovingAverageNorm):
    """Batch normalization with moving-average statistics in the forward and backward pass.

    Trains stably at 2 samples per batch when the convolution feeding it is weight-centralized
    (see `CenteredConv2d`). At inference it is a frozen per-channel affine,
    ``weight * x / sqrt(running_var + eps) + bias``.

    State (all in `state_dict`, so a checkpoint restores the layer exactly):
      running_mean         always zero (MABN does not centre); keeps the state a superset of
                           BatchNorm2d's, so it loads as FrozenBatchNorm2d
      running_var          EMA of the normalizing statistic (decay `momentum`)
      num_batches_tracked  training forwards so far; drives the warm-up phases
      x2_buffer, gz_buffer ring buffers [buffer_size, C] of chi2_B and Psi_B
    """

    _version = 1
    ring_buffers = ("x2_buffer", "gz_buffer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training or x.numel() == 0:
            # An empty batch carries no statistics: it must not advance or touch the state.
            return mabn_inference(x, self.running_var, self.weight, self.bias, self.eps, self.running_mean)
        return MABNFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.x2_buffer,
            self.gz_buffer, self._next_phase(), self.momentum, self.eps, self.renorm_clip,
        )
