"""MABN2d: Moving Average Batch Normalization (Yan et al., ICLR 2020) as a thin module."""
import torch

from .backend import refuse_graph_capture, use_triton
from .base import MovingAverageNorm
from .functional import MABNFunction, mabn_inference, running_var_decay
from .triton_mabn import TritonMABNFunction, triton_mabn_unsupported_reason
from .triton_probe import probe_triton_mabn

__all__ = ["MABN2d"]


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
      num_batches_tracked  training forwards so far; drives the warm-up phases
      x2_buffer, gz_buffer ring buffers [buffer_size, C] of chi2_B and Psi_B

    A state_dict whose running_mean is not zero (a BatchNorm checkpoint) is refused with an
    error naming the key, and the buffer stays zero: silently dropping a BatchNorm mean would
    change what the loaded network computes. `tools/convert_pretrained.py` turns BatchNorm
    checkpoints into MABN ones and says what that conversion approximates.
    """

    _version = 1
    ring_buffers = ("x2_buffer", "gz_buffer")

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
        # Triton kernels on CUDA, public operations elsewhere; MABN_D2_BACKEND forces either (see backend).
        parameters, buffers = self._parameters, self._buffers  # direct reads: no Module.__getattr__ per tensor
        state = (parameters["weight"], parameters["bias"], buffers["running_var"], buffers["x2_buffer"],
                 buffers["gz_buffer"])
        triton = use_triton(x, lambda: triton_mabn_unsupported_reason(x, *state), "MABN2d",
                            probe_triton_mabn, state[2].dtype,
                            self.__dict__.setdefault("_backend_decisions", {}))
        phase = self._next_phase()
        return (TritonMABNFunction if triton else MABNFunction).apply(
            x, *state, phase, running_var_decay(self.ema_decay, phase), self.eps, self.renorm_clip
        )

    _training_step_outside_graph = torch.compiler.disable(_training_step)

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
        key = prefix + "running_mean"
        mean = state_dict.get(key)
        if mean is not None and not mean.is_meta and bool(torch.count_nonzero(mean)):
            self.running_mean.zero_()
            error_msgs.append(
                f"{key}: {type(self).__name__}'s mean is zero by definition, got a non-zero running_mean "
                f"(largest magnitude {float(mean.abs().max()):.4g}); convert BatchNorm checkpoints with "
                "tools/convert_pretrained.py (mabn_d2.convert.bn_to_mabn) instead"
            )
