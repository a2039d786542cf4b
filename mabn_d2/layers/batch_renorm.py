"""Batch Renormalization (Ioffe, NeurIPS 2017), the paper's main small-batch baseline."""
import torch
from torch import nn

from .backend import refuse_graph_capture, use_triton
from .base import HostIterationCounter
from .channel_ops import CHANNEL_REDUCTION_DIMS
from .hyperparams import BRN_HYPERPARAMETERS, check_arguments, check_num_features, defaults
from .triton.batch_renorm import TritonBatchRenormFunction, triton_brn_unsupported_reason
from .triton.first_use_check import first_use_check_batch_renorm

__all__ = ["BatchRenorm2d", "renorm_limits", "batch_renorm_step"]

_DEFAULTS = defaults(BRN_HYPERPARAMETERS)


def renorm_limits(
    iteration: int, r_max: float, d_max: float, warmup_iters: int, r_max_ramp_iters: int, d_max_ramp_iters: int
) -> tuple:
    """(r_max, d_max) at `iteration`: plain BN (1, 0) during warm-up, then linear ramps."""

    def ramp(final: float, start: float, length: int) -> float:
        if iteration <= warmup_iters:
            return start
        if length <= 0:
            return final
        progress = min(1.0, (iteration - warmup_iters) / length)
        return start + (final - start) * progress

    return ramp(r_max, 1.0, r_max_ramp_iters), ramp(d_max, 0.0, d_max_ramp_iters)


def batch_renorm_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, ema_update_rate: float, eps: float, r_max: float, d_max: float,
) -> torch.Tensor:
    """One training step on public operations (autograd differentiates it; r and d are constants).

    Updates running_mean / running_var in place; a channel whose update is not finite keeps both.
    """
    x_work = x.to(torch.promote_types(x.dtype, running_mean.dtype))  # bf16 -> f32, f64 stays
    var_b, mean_b = torch.var_mean(x_work, dim=CHANNEL_REDUCTION_DIMS, correction=0)
    std_b = (var_b + eps).sqrt()
    with torch.no_grad():
        std_run = (running_var + eps).sqrt()
        r = (std_b / std_run).clamp(1.0 / r_max, r_max)
        d = ((mean_b - running_mean) / std_run).clamp(-d_max, d_max)
        count = x.numel() // x.shape[1]
        unbiased_var = var_b * (count / max(count - 1, 1))
        new_mean = torch.lerp(running_mean, mean_b, ema_update_rate)
        new_var = torch.lerp(running_var, unbiased_var, ema_update_rate)
        finite = torch.isfinite(new_mean) & torch.isfinite(new_var)
        running_mean.copy_(torch.where(finite, new_mean, running_mean))
        running_var.copy_(torch.where(finite, new_var, running_var))
    view = (1, -1, 1, 1)
    scale = (weight * r / std_b).view(view)
    shift = (bias + weight * (d - r * mean_b / std_b)).view(view)
    return (x_work * scale + shift).to(x.dtype)


def _first_use_check(x: torch.Tensor, state_dtype: torch.dtype):
    return first_use_check_batch_renorm(x, state_dtype, public_step=batch_renorm_step)


class BatchRenorm2d(HostIterationCounter):
    """BN whose training output is corrected towards the running statistics.

    y = weight * ((x - mu_B) / sigma_B * r + d) + bias, with r = clip(sigma_B / sigma, 1/r_max, r_max)
    and d = clip((mu_B - mu) / sigma, -d_max, d_max) treated as constants in backward.
    `ema_update_rate` is the weight of the new batch statistic in the running averages (torch's
    BatchNorm `momentum`).
    r_max and d_max start at 1 and 0 and ramp linearly to their final values after
    `warmup_iters`, over `r_max_ramp_iters` and `d_max_ramp_iters` iterations.
    The training step runs on Triton kernels for CUDA tensors (see `backend`, MABN_D2_BACKEND).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = _DEFAULTS["eps"],
        ema_update_rate: float = _DEFAULTS["ema_update_rate"],
        r_max: float = _DEFAULTS["r_max"],
        d_max: float = _DEFAULTS["d_max"],
        warmup_iters: int = _DEFAULTS["warmup_iters"],
        r_max_ramp_iters: int = _DEFAULTS["r_max_ramp_iters"],
        d_max_ramp_iters: int = _DEFAULTS["d_max_ramp_iters"],
    ):
        super().__init__()
        check_num_features("BatchRenorm2d", num_features)
        check_arguments("BatchRenorm2d", BRN_HYPERPARAMETERS, dict(
            eps=eps, ema_update_rate=ema_update_rate, r_max=r_max, d_max=d_max, warmup_iters=warmup_iters,
            r_max_ramp_iters=r_max_ramp_iters, d_max_ramp_iters=d_max_ramp_iters))
        self.num_features = num_features
        self.eps = eps
        self.ema_update_rate = ema_update_rate
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_iters = warmup_iters
        self.r_max_ramp_iters = r_max_ramp_iters
        self.d_max_ramp_iters = d_max_ramp_iters
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def current_limits(self) -> tuple:
        return renorm_limits(
            self._iteration, self.r_max, self.d_max, self.warmup_iters, self.r_max_ramp_iters, self.d_max_ramp_iters
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchRenorm2d expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if not self.training or x.numel() == 0:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return self._training_step(x)

    @torch.compiler.disable
    def _training_step(self, x: torch.Tensor) -> torch.Tensor:
        """One training iteration, outside any torch.compile graph (host counter and ramps in Python)."""
        refuse_graph_capture(x, "BatchRenorm2d")
        triton_step = use_triton(x, lambda: triton_brn_unsupported_reason(
            x, self.weight, self.bias, self.running_mean, self.running_var), "BatchRenorm2d",
            _first_use_check, self.running_var.dtype, self.__dict__.setdefault("_backend_decisions", {}))
        self._advance_iteration()
        r_max, d_max = self.current_limits()
        if triton_step:
            return TritonBatchRenormFunction.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.ema_update_rate, self.eps,
                r_max, d_max,
            )
        return batch_renorm_step(x, self.weight, self.bias, self.running_mean, self.running_var,
                                 self.ema_update_rate, self.eps, r_max, d_max)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, ema_update_rate={self.ema_update_rate}, r_max={self.r_max}, "
            f"d_max={self.d_max}, warmup_iters={self.warmup_iters}"
        )
