"""MABN2d: Moving Average Batch Normalization (Yan et al., ICLR 2020) as a thin module."""
import torch
from torch import nn

from .functional import MABNFunction, mabn_inference, mabn_phase

__all__ = ["MABN2d"]


class MABN2d(nn.Module):
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

    def __init__(
        self,
        num_features: int,
        buffer_size: int = 16,
        momentum: float = 0.98,
        warmup_iters: int = 100,
        renorm_warmup_iters: int = 1000,
        renorm_clip: float = 5.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        _check_arguments(num_features, buffer_size, momentum, warmup_iters, renorm_warmup_iters, renorm_clip, eps)
        self.num_features = num_features
        self.buffer_size = buffer_size
        self.momentum = momentum
        self.warmup_iters = warmup_iters
        self.renorm_warmup_iters = renorm_warmup_iters
        self.renorm_clip = renorm_clip
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("x2_buffer", torch.zeros(buffer_size, num_features))
        self.register_buffer("gz_buffer", torch.zeros(buffer_size, num_features))
        # Host-side mirror of num_batches_tracked: phase decisions never read the device.
        self._iteration = 0

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.x2_buffer.zero_()
        self.gz_buffer.zero_()
        self._iteration = 0

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    @property
    def iteration(self) -> int:
        """Training forwards so far (host-side; equals num_batches_tracked)."""
        return self._iteration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"MABN2d expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"MABN2d({self.num_features}) got an input with {x.shape[1]} channels, shape {tuple(x.shape)}"
            )
        if not self.training or x.numel() == 0:
            # An empty batch carries no statistics: it must not advance or touch the state.
            return mabn_inference(x, self.running_var, self.weight, self.bias, self.eps, self.running_mean)
        self._iteration += 1
        self.num_batches_tracked.add_(1)
        phase = mabn_phase(self._iteration, self.buffer_size, self.warmup_iters, self.renorm_warmup_iters)
        return MABNFunction.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.x2_buffer,
            self.gz_buffer, phase, self.momentum, self.eps, self.renorm_clip,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        counter = state_dict.get(prefix + "num_batches_tracked")
        if counter is not None:
            self._iteration = int(counter)  # one host read per load, never per step

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, momentum={self.momentum}, "
            f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
            f"renorm_clip={self.renorm_clip}, eps={self.eps}"
        )


def _check_arguments(num_features, buffer_size, momentum, warmup_iters, renorm_warmup_iters, renorm_clip, eps):
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"MABN2d: {message}")

    require(isinstance(num_features, int) and num_features >= 1, f"num_features must be a positive int, got {num_features!r}")
    require(isinstance(buffer_size, int) and buffer_size >= 1, f"buffer_size must be an int >= 1, got {buffer_size!r}")
    require(0.0 <= momentum < 1.0, f"momentum must be in [0, 1) (decay of the EMA), got {momentum!r}")
    require(isinstance(warmup_iters, int) and warmup_iters >= 0, f"warmup_iters must be an int >= 0, got {warmup_iters!r}")
    require(
        isinstance(renorm_warmup_iters, int) and renorm_warmup_iters >= 0,
        f"renorm_warmup_iters must be an int >= 0, got {renorm_warmup_iters!r}",
    )
    require(renorm_clip >= 1.0, f"renorm_clip must be >= 1, got {renorm_clip!r}")
    require(eps > 0.0, f"eps must be > 0, got {eps!r}")
