"""State shared by the moving-average norms: a host-side iteration counter and MABN's settings.

Phase decisions (warm-ups, ring-buffer slot) are taken from a Python int so that a training
step never reads the device; the count is mirrored in the `num_batches_tracked` buffer so a
checkpoint restores it, and read back once at load time.
"""
from typing import Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .functional import MABNPhase, mabn_phase

__all__ = ["HostIterationCounter", "MovingAverageNorm", "check_moving_average_arguments", "frozen_batchnorm_from"]


class HostIterationCounter(nn.Module):
    """Counts training forwards on the host, mirrored in the `num_batches_tracked` buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._iteration = 0

    @property
    def iteration(self) -> int:
        """Training forwards so far (host-side; equals num_batches_tracked)."""
        return self._iteration

    def _advance_iteration(self) -> int:
        self._iteration += 1
        self.num_batches_tracked.add_(1)
        return self._iteration

    def _reset_iteration(self) -> None:
        self._iteration = 0
        self.num_batches_tracked.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        counter = state_dict.get(prefix + "num_batches_tracked")
        if counter is not None:
            self._iteration = int(counter)  # one host read per load, never per step


class MovingAverageNorm(HostIterationCounter):
    """MABN's hyper-parameters, affine parameters, running statistics and ring buffers.

    Subclasses name their ring buffers (each [buffer_size, C]) in `ring_buffers` and implement
    the training step; eval mode and the phase schedule are shared.
    """

    ring_buffers: Tuple[str, ...] = ()

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
        check_moving_average_arguments(
            type(self).__name__, num_features, buffer_size, momentum, warmup_iters, renorm_warmup_iters, renorm_clip, eps
        )
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
        for name in self.ring_buffers:
            self.register_buffer(name, torch.zeros(buffer_size, num_features))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        for name in self.ring_buffers:
            getattr(self, name).zero_()
        self._reset_iteration()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def _next_phase(self) -> MABNPhase:
        """Advance the counter and decide this training iteration's phase, on the host."""
        return mabn_phase(self._advance_iteration(), self.buffer_size, self.warmup_iters, self.renorm_warmup_iters)

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{name}({self.num_features}) got an input with {x.shape[1]} channels, shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, momentum={self.momentum}, "
            f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
            f"renorm_clip={self.renorm_clip}, eps={self.eps}"
        )


def check_moving_average_arguments(
    owner: str, num_features, buffer_size, momentum, warmup_iters, renorm_warmup_iters, renorm_clip, eps
) -> None:
    """ValueError naming the bad argument, before any state is allocated."""

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{owner}: {message}")

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


def frozen_batchnorm_from(norm: nn.Module, cls: type = FrozenBatchNorm2d) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d computing `norm`'s eval-mode affine (MABN: its running_mean is 0).

    Works for any norm with weight, bias, running_mean, running_var and eps; the copies keep
    the source's device and dtype.
    """
    frozen = cls(norm.num_features, eps=norm.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(frozen, name, getattr(norm, name).detach().clone())
    return frozen
