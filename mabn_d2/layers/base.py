"""State shared by the moving-average norms: a host-side iteration counter and MABN's settings.

Phase decisions (warm-ups, ring-buffer slot) are taken from a Python int so that a training
step never reads the device; the count is mirrored in the `num_batches_tracked` buffer (when
the buffer is read or saved) so a checkpoint restores it, and read back once at load time.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .hyperparams import MABN_HYPERPARAMETERS, check_arguments, check_num_features, defaults
from .nonfinite import new_nonfinite_record

_DEFAULTS = defaults(MABN_HYPERPARAMETERS)

__all__ = ["MABNPhase", "mabn_phase", "running_var_decay", "HostIterationCounter", "MovingAverageNorm",
           "frozen_batchnorm_from"]


class MABNPhase(NamedTuple):
    """What one training iteration of an MABN layer does, decided on the host (a tuple: cheap per step)."""

    iteration: int  # 1-based count of training forwards, this one included
    slot: int  # ring-buffer row written by this iteration
    use_batch_statistics: bool  # early phase: chi2_B and Psi_B instead of their moving averages
    renormalize: bool  # apply the clipped re-normalization factor r
    buffer_size: int  # ring-buffer rows (the layer's buffer_size): what `slot` indexes and the averages read


def mabn_phase(
    iteration: int, buffer_size: int, warmup_iters: int, renorm_warmup_iters: int
) -> MABNPhase:
    """The phase of 1-based training iteration `iteration` (see docs/algorithm.md)."""
    if iteration < 1:
        raise ValueError(f"iteration must be >= 1, got {iteration}")
    return MABNPhase(  # iteration, slot, use_batch_statistics, renormalize, buffer_size (positional: built every step)
        iteration,
        iteration % buffer_size,
        iteration <= buffer_size or iteration < warmup_iters,
        iteration > max(renorm_warmup_iters, warmup_iters),
        buffer_size,
    )


def running_var_decay(ema_decay: float, phase: MABNPhase) -> float:
    """EMA decay for running_var in this iteration: 0 at the first, so it starts from data.

    As in the official classification code: an EMA started from the initial 1 would still carry
    ema_decay^t of that 1 when re-normalization starts. The iteration counter is in the state,
    so resume and load stay exact.
    """
    return ema_decay if phase.iteration > 1 else 0.0


class HostIterationCounter(nn.Module):
    """Counts training forwards on the host, mirrored in the `num_batches_tracked` buffer.

    The buffer is brought up to date when it is read (as an attribute or through `state_dict`),
    not written at every step: a training step spends no device write, and on CUDA no kernel
    launch, on its counter. Loading a state_dict sets the host count from the buffer.
    """

    def __init__(self):
        super().__init__()
        self._iteration = 0
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def iteration(self) -> int:
        """Training forwards so far (host-side; equals num_batches_tracked)."""
        return self._iteration

    @property
    def num_batches_tracked(self) -> Optional[torch.Tensor]:
        """The buffer holding the training forwards so far (the checkpoint field), up to date."""
        if "num_batches_tracked" not in self._buffers:  # not registered yet (register_buffer asks hasattr)
            raise AttributeError("num_batches_tracked")
        return self._mirror_iteration()

    def _mirror_iteration(self) -> Optional[torch.Tensor]:
        counter = self._buffers.get("num_batches_tracked")
        if counter is not None:
            counter.fill_(self._iteration)
        return counter

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._mirror_iteration()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _advance_iteration(self) -> int:
        attributes = self.__dict__  # a plain int attribute: skip Module.__setattr__'s checks, once per step
        iteration = attributes["_iteration"] = attributes["_iteration"] + 1
        return iteration

    def _reset_iteration(self) -> None:
        self._iteration = 0
        self._mirror_iteration()

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
        buffer_size: int = _DEFAULTS["buffer_size"],
        ema_decay: float = _DEFAULTS["ema_decay"],
        warmup_iters: int = _DEFAULTS["warmup_iters"],
        renorm_warmup_iters: int = _DEFAULTS["renorm_warmup_iters"],
        renorm_clip: float = _DEFAULTS["renorm_clip"],
        eps: float = _DEFAULTS["eps"],
    ):
        super().__init__()
        owner = type(self).__name__
        check_num_features(owner, num_features)
        check_arguments(owner, MABN_HYPERPARAMETERS, dict(
            buffer_size=buffer_size, ema_decay=ema_decay, warmup_iters=warmup_iters,
            renorm_warmup_iters=renorm_warmup_iters, renorm_clip=renorm_clip, eps=eps))
        self.num_features = num_features
        self.buffer_size = buffer_size
        self.ema_decay = ema_decay
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
        # [batches skipped for non-finite statistics, last iteration counted]: not state, so
        # checkpoints with or without it load and folds never see it (`nonfinite`)
        self.register_buffer("nonfinite_skipped", new_nonfinite_record(), persistent=False)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        for name in self.ring_buffers:
            getattr(self, name).zero_()
        record = self._buffers.get("nonfinite_skipped")  # absent from a layer unpickled from an older version
        if record is not None:
            record.zero_()
        self._reset_iteration()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Refuse NaN or infinite state (and a negative running_var), naming the key.

        Such a value turns the layer's every output into NaN at the first forward, far from the
        file that carried it; training itself never writes one (a non-finite batch is skipped).
        A refused tensor keeps the layer's previous value.
        """
        problems = {}
        for name in ("weight", "bias", "running_var") + tuple(self.ring_buffers):
            problem = _state_problem(name, state_dict.get(prefix + name))
            if problem:
                problems[name] = problem
        kept = {name: getattr(self, name).detach().clone() for name in problems}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        with torch.no_grad():
            for name, value in kept.items():
                getattr(self, name).copy_(value)
        error_msgs.extend(f"{prefix}{name}: {problem}" for name, problem in problems.items())

    def _affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """weight and bias, read per training step without Module.__getattr__ (parameters, or
        constant buffers under CycleMABNList)."""
        weight = self._parameters.get("weight")
        if weight is None:
            return self.weight, self.bias
        return weight, self._parameters["bias"]

    def _next_phase(self) -> MABNPhase:
        """Advance the counter and decide this training iteration's phase, on the host."""
        return mabn_phase(self._advance_iteration(), self.buffer_size, self.warmup_iters, self.renorm_warmup_iters)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels, "
                             f"shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, buffer_size={self.buffer_size}, ema_decay={self.ema_decay}, "
            f"warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}, "
            f"renorm_clip={self.renorm_clip}, eps={self.eps}"
        )


def _state_problem(name: str, value: object) -> Optional[str]:
    """Why a loaded MABN tensor `name` cannot be used, or None (not a tensor, meta: not checked)."""
    if not torch.is_tensor(value) or value.is_meta or not value.is_floating_point():
        return None
    non_finite = int(torch.count_nonzero(~torch.isfinite(value)))
    if non_finite:
        return f"{non_finite} of {value.numel()} values are NaN or infinite; MABN state must be finite"
    if name == "running_var" and bool((value < 0).any()):
        return f"negative values (smallest {float(value.min()):.4g}); a running variance must be >= 0"
    return None


def frozen_batchnorm_from(norm: nn.Module, cls: type = FrozenBatchNorm2d) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d computing `norm`'s eval-mode affine (MABN: its running_mean is 0).

    Works for any norm with weight, bias, running_mean, running_var and eps; the copies keep
    the source's device and dtype.
    """
    frozen = cls(norm.num_features, eps=norm.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        setattr(frozen, name, getattr(norm, name).detach().clone())
    return frozen
