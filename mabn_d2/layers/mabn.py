"""MABN: Moving Average Batch Normalization (Yan et al., ICLR 2020), its autograd Function and module.

One training step is an autograd Function: the forward normalizes by the (moving average of
the) uncentred second moment chi2, the backward replaces the batch statistic Psi_B by its
moving average. MABN's mean is zero by definition, so no mean enters the math.

Every operation of `MABNFunction` is a public PyTorch one with the same meaning on every device
(see `channel_ops`): one reduction and one elementwise pass in the forward, two reductions and
two elementwise passes in the backward, the input as the only activation saved for backward.
No statistic ever leaves the device, so a step never synchronises with the host. On CUDA the
same step runs on Triton kernels (`triton/`), chosen per step by `backend`.
"""
import logging
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .backend import refuse_graph_capture, use_triton
from .base import MABNPhase, MovingAverageNorm, running_var_decay
from .centering_check import ALLOWED, CHECKED, UncenteredInputError, input_centering_problem, uncentered_input_message
from .channel_ops import (
    accumulation_dtype, channel_normalize, channel_sum, channel_sum_of_products, channel_sum_of_squares, channel_view,
    keep_finite,
)
from .nonfinite import count_nonfinite_
from .triton.mabn import TritonMABNFunction, triton_mabn_unsupported_reason
from .triton.first_use_check import first_use_check_mabn

__all__ = ["MABN2d", "MABNFunction", "mabn_inference"]

logger = logging.getLogger(__name__)


def mabn_inference(
    x: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    zero_mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eval-mode MABN: the frozen affine gamma * x / sqrt(running_var + eps) + beta.

    `zero_mean` (the layer's all-zero running_mean) saves allocating a zero mean per call.
    """
    return channel_normalize(x, running_var, weight, bias, eps, mean=zero_mean)


class MABNFunction(torch.autograd.Function):
    """One MABN training step. Updates the layer state in place (ring buffers, running_var).

    `nonfinite` (optional, the layer's `nonfinite_skipped` record) counts the step once when its
    chi2_B or Psi_B had a non-finite channel, which `keep_finite` then kept out of the state.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_var: torch.Tensor,
        x2_buffer: torch.Tensor,
        gz_buffer: torch.Tensor,
        phase: MABNPhase,
        ema_decay: float,
        eps: float,
        renorm_clip: float,
        nonfinite: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        count = x.numel() // x.shape[1]
        sum_x2 = channel_sum_of_squares(x, accumulation_dtype(x, running_var))
        chi2_batch = (sum_x2 / count).to(running_var.dtype)
        x2_buffer[phase.slot] = keep_finite(chi2_batch, x2_buffer[phase.slot])
        if nonfinite is not None:
            count_nonfinite_(nonfinite, chi2_batch, phase.iteration)
        chi2 = chi2_batch if phase.use_batch_statistics else x2_buffer.mean(0)

        r: Optional[torch.Tensor] = None
        if phase.renormalize:
            r = ((chi2 + eps).sqrt() / (running_var + eps).sqrt()).clamp(1.0 / renorm_clip, renorm_clip)
        updated_var = running_var * ema_decay + chi2 * (1.0 - ema_decay)
        running_var.copy_(keep_finite(updated_var, running_var))

        scale = weight if r is None else weight * r
        y = channel_normalize(x, chi2, scale, bias, eps)

        ctx.save_for_backward(x, scale, chi2, r)
        ctx.gz_buffer = gz_buffer
        ctx.nonfinite = nonfinite
        ctx.phase = phase
        ctx.eps = eps
        ctx.count = count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, scale, chi2, r = ctx.saved_tensors
        phase: MABNPhase = ctx.phase
        gz_buffer: torch.Tensor = ctx.gz_buffer

        # With s = sqrt(chi2 + eps) and z = x / s: sum(dy * z) = sum(dy * x) / s.
        accumulate = accumulation_dtype(grad_out, chi2)
        inv_std = (chi2 + ctx.eps).rsqrt()
        sum_dy_z = (channel_sum_of_products(grad_out, x, accumulate) * inv_std).to(chi2.dtype)
        sum_dy = channel_sum(grad_out, accumulate) if ctx.needs_input_grad[2] else None
        psi_batch = (scale * sum_dy_z / ctx.count).to(gz_buffer.dtype)
        gz_buffer[phase.slot] = keep_finite(psi_batch, gz_buffer[phase.slot])
        if ctx.nonfinite is not None:
            count_nonfinite_(ctx.nonfinite, psi_batch, phase.iteration)

        grad_x = None
        if ctx.needs_input_grad[0]:
            psi = psi_batch if phase.use_batch_statistics else gz_buffer.mean(0)
            # dx = (g_z - z * Psi) / s = dy * scale / s - x * Psi / s^2, in two passes.
            grad_x = channel_normalize(grad_out, chi2, scale, None, ctx.eps)
            grad_x.addcmul_(x, channel_view(psi * inv_std.square()), value=-1)
        grad_weight = sum_dy_z if r is None else sum_dy_z * r
        return grad_x, grad_weight, sum_dy, None, None, None, None, None, None, None, None


def _first_use_check(x: torch.Tensor, state_dtype: torch.dtype) -> Optional[str]:
    return first_use_check_mabn(x, state_dtype, public_function=MABNFunction)


class MABN2d(MovingAverageNorm):
    """Batch normalization with moving-average statistics in the forward and backward pass.

    Trains stably at 2 samples per batch when the convolution feeding it is weight-centralized
    (see `CenteredConv2d`). At inference it is a frozen per-channel affine,
    ``weight * x / sqrt(running_var + eps) + bias``.

    State (all in `state_dict`, so a checkpoint restores the layer exactly):
      running_mean         always zero: MABN does not centre, and no computation reads it. It
                           keeps the state a superset of BatchNorm2d's, so it loads as
                           FrozenBatchNorm2d. Loading a non-zero one is refused (see below).
      running_var          EMA of the normalizing statistic (decay `ema_decay`)
      num_batches_tracked  training forwards so far; drives the warm-up phases (a host count,
                           written to the buffer when read or saved; set it with load_state_dict)
      x2_buffer, gz_buffer ring buffers [buffer_size, C] of chi2_B and Psi_B

    Not state (a non-persistent buffer, so checkpoints with or without it load, and folding
    never sees it): `nonfinite_skipped`, int64 [2], the training batches whose chi2_B or Psi_B
    was NaN or infinite and so kept out of the state ([0]; [1] is the latest iteration counted),
    counted on the device by both implementations of the step (see `nonfinite`). It counts from
    construction (or `reset_running_stats`), not across a resume; `MABNHealthHook` reports it.

    A state_dict whose running_mean is not zero (a BatchNorm checkpoint) is refused with an
    error naming the key, and the buffer stays zero: silently dropping a BatchNorm mean would
    change what the loaded network computes. `tools/convert_pretrained.py` turns BatchNorm
    checkpoints into MABN ones and says what that conversion approximates.

    Centralization is enforced, not assumed: a layer that `prepare_mabn_model` did not place
    behind a CenteredConv2d (`input_centering` None) checks at its first training step whether a
    raw-weight convolution feeds it, and raises `UncenteredInputError` naming the fix if so
    (see `centering_check`). A standalone layer fed data trains as before; eval never checks;
    `mabn_d2.allow_uncentered(model)` is the explicit opt-out (``layer.allow_uncentered = True``
    for one layer).
    """

    _version = 1
    ring_buffers = ("x2_buffer", "gz_buffer")
    # How this layer's input is known to suit MABN: CENTERED / ALLOWED (set by prepare_mabn_model
    # and allow_uncentered), CHECKED (its first training step), None (not yet known). Not state.
    input_centering: Optional[str] = None

    @property
    def allow_uncentered(self) -> bool:
        """Whether this layer may train behind a plain convolution (opted out of the centering check)."""
        return self.input_centering == ALLOWED

    @allow_uncentered.setter
    def allow_uncentered(self, allowed: bool) -> None:
        if allowed:
            logger.warning(f"{type(self).__name__}({self.num_features}) may train behind a convolution that is not "
                           "weight-centralized (allow_uncentered).")
        self.input_centering = ALLOWED if allowed else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training or x.numel() == 0:
            # An empty batch carries no statistics: it must not advance or touch the state.
            return mabn_inference(x, self.running_var, self.weight, self.bias, self.eps, self._zero_mean())
        if torch.compiler.is_compiling():
            return self._training_step_outside_graph(x)
        return self._training_step(x)  # eager: no torch.compiler.disable wrapper to pay per step

    def _training_step(self, x: torch.Tensor) -> torch.Tensor:
        """One training iteration; under torch.compile it runs outside the graph (below).

        The step advances a host counter and picks its phase and backend in Python; traced, every
        iteration would change a guard and recompile. Eval (a frozen affine) stays compilable.
        """
        refuse_graph_capture(x, "MABN2d")
        if self.input_centering is None:  # a class attribute read: the check runs until it passes once
            self._check_input_centering(x)
        # Triton kernels on CUDA, public operations elsewhere; MABN_D2_BACKEND forces either (see backend).
        buffers = self._buffers  # direct reads: no Module.__getattr__ per buffer
        running_var = buffers["running_var"]
        state = (*self._affine(), running_var, buffers["x2_buffer"], buffers["gz_buffer"])
        nonfinite = buffers.get("nonfinite_skipped")  # absent from a layer unpickled from an older version
        decisions = self.__dict__.get("_backend_decisions")
        if decisions is None:
            decisions = self.__dict__["_backend_decisions"] = {}
        triton = use_triton(x, lambda: triton_mabn_unsupported_reason(x, *state), "MABN2d",
                            _first_use_check, running_var.dtype, decisions)
        phase = self._next_phase()
        return (TritonMABNFunction if triton else MABNFunction).apply(
            x, *state, phase, running_var_decay(self.ema_decay, phase), self.eps, self.renorm_clip, nonfinite
        )

    _training_step_outside_graph = torch.compiler.disable(_training_step)

    def _check_input_centering(self, x: torch.Tensor) -> None:
        """Refuse to train behind a raw-weight convolution (see `centering_check`).

        Without gradients there is no autograd history to read, so the check waits for a step
        that has one; the state is untouched when it raises.
        """
        if not torch.is_grad_enabled():
            return
        problem = input_centering_problem(x)
        if problem is not None:
            raise UncenteredInputError(uncentered_input_message(self, problem))
        self.input_centering = CHECKED

    def _zero_mean(self) -> torch.Tensor:
        """A zero mean for eval's batch_norm call, allocated once per device and dtype, not per call.

        Not running_mean: that buffer is only a checkpoint field, and what a user writes into it
        must not centre anything.
        """
        running_var = self.running_var
        zero = self.__dict__.get("_zero_mean_cache")
        if zero is None or zero.device != running_var.device or zero.dtype != running_var.dtype \
                or zero.shape != running_var.shape:
            zero = torch.zeros_like(running_var)
            self.__dict__["_zero_mean_cache"] = zero
        return zero

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        record = self._buffers.get("nonfinite_skipped")
        if record is not None:  # the iteration count may go back: forget the latest one counted
            record[1].zero_()
        key = prefix + "running_mean"
        mean = state_dict.get(key)
        if mean is not None and not mean.is_meta and bool(torch.count_nonzero(mean)):
            self.running_mean.zero_()
            error_msgs.append(
                f"{key}: {type(self).__name__}'s mean is zero by definition, got a non-zero running_mean "
                f"(largest magnitude {float(mean.abs().max()):.4g}); convert BatchNorm checkpoints with "
                "tools/convert_pretrained.py (mabn_d2.engine.convert_pretrained.bn_to_mabn) instead"
            )
