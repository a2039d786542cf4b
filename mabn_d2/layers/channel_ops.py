"""Per-channel sums and the per-channel affine of (N, C, H, W) tensors, from public PyTorch ops.

The moving-average norms need sum(x^2), sum(dy) and sum(dy * x) over N, H and W, and the
elementwise scale * (x - mean) / sqrt(var + eps) + shift. Each helper reads the activations once
where PyTorch has a public operation that does so, accumulates sums in at least float32 (for
bf16/fp16 activations), and computes the same numbers, up to rounding, on every device.
"""
from typing import Optional

import torch

__all__ = [
    "channel_view", "keep_finite",
    "accumulation_dtype", "channel_sum", "channel_sum_of_squares", "channel_sum_of_products", "channel_normalize",
]

CHANNEL_REDUCTION_DIMS = (0, 2, 3)


def accumulation_dtype(x: torch.Tensor, state: torch.Tensor) -> torch.dtype:
    """The dtype sums over `x` accumulate in: the wider of the input's and the state's, at least float32."""
    return torch.promote_types(torch.promote_types(x.dtype, state.dtype), torch.float32)


def channel_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_{N,H,W} x per channel, accumulated in `dtype`."""
    if x.is_contiguous():
        return x.view(x.shape[0], x.shape[1], -1).sum(-1, dtype=dtype).sum(0)
    return x.sum(CHANNEL_REDUCTION_DIMS, dtype=dtype)


def channel_sum_of_squares(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_{N,H,W} x^2 per channel in one read of `x` (a 2-norm, squared), accumulated in `dtype`."""
    if x.is_contiguous():
        per_sample = torch.linalg.vector_norm(x.view(x.shape[0], x.shape[1], -1), 2, dim=-1, dtype=dtype)
        return per_sample.square().sum(0)
    return torch.linalg.vector_norm(x, 2, dim=CHANNEL_REDUCTION_DIMS, dtype=dtype).square()


def channel_sum_of_products(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_{N,H,W} a * b per channel, accumulated in `dtype`.

    On the CPU, for contiguous NCHW tensors already in `dtype`, it is a batch of N*C dot
    products (one read of each input, nothing materialised). Everywhere else the product is
    materialised and summed in `dtype`: channels_last or strided inputs, bf16/fp16 (a matrix
    product would round its sums to the input dtype), autocast (which would lower the matrix
    product's precision), and accelerators, whose float32 matrix products may run in TF32
    (`torch.backends.cuda.matmul`), which would cost the statistic about three digits.
    """
    if _batched_dot_applies(a, b, dtype):
        n, c = a.shape[:2]
        return torch.bmm(a.view(n * c, 1, -1), b.view(n * c, -1, 1)).view(n, c).sum(0)
    return torch.mul(a, b).sum(CHANNEL_REDUCTION_DIMS, dtype=dtype)


def _batched_dot_applies(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        a.device.type == "cpu"
        and a.dtype == b.dtype == dtype
        and a.is_contiguous()
        and b.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
    )


def channel_normalize(
    x: torch.Tensor,
    var: torch.Tensor,
    scale: torch.Tensor,
    shift: Optional[torch.Tensor],
    eps: float,
    mean: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """scale * (x - mean) / sqrt(var + eps) + shift per channel, in one pass over `x`.

    Eval-mode batch norm with the given statistics (a zero tensor when `mean` is None), so it
    keeps x's dtype and memory format; the statistics may be wider than x (float32 state for
    bf16/fp16 activations).
    """
    if mean is None:
        mean = torch.zeros_like(var)
    return torch.nn.functional.batch_norm(x, mean, var, scale, shift, False, 0.0, eps)


def channel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def keep_finite(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-channel guard: a non-finite statistic leaves the stored value unchanged."""
    return torch.where(torch.isfinite(new), new, old)
