"""A device-side count of the training batches whose MABN statistics were skipped as non-finite.

A NaN or infinite chi2_B (forward) or Psi_B (backward) is not written into the ring buffers or
running_var (`keep_finite`), so training goes on; the count makes such batches visible in the
training log (`mabn/nonfinite_skipped`, see `engine.health`) instead of silent.

The record is a 2-element int64 tensor on the layer's device, updated with tensor operations
only (no host read per step): [0] the batches skipped so far, [1] the latest iteration counted.
The second entry makes a step count once, whichever of its channels, channel blocks (Triton) or
passes (forward and backward) met the non-finite statistic. The Triton kernels keep the same
record with atomics (`triton/mabn_kernels.py`), so both implementations count alike.
"""
from typing import Optional, Union

import torch

__all__ = ["NONFINITE_RECORD_SIZE", "new_nonfinite_record", "count_nonfinite_"]

NONFINITE_RECORD_SIZE = 2  # [batches skipped, latest iteration counted]


def new_nonfinite_record(device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """A zeroed record: nothing skipped, no iteration counted."""
    return torch.zeros(NONFINITE_RECORD_SIZE, dtype=torch.int64, device=device)


def count_nonfinite_(record: torch.Tensor, statistic: torch.Tensor, iteration: int) -> None:
    """Add 1 to record[0] when any entry of `statistic` is not finite and `iteration` is not counted yet.

    In place and on the statistic's device: a handful of small tensor operations, no host read.
    """
    fresh = torch.isfinite(statistic).all().logical_not_().logical_and_(record[1] < iteration)
    record[0].add_(fresh)
    record[1].copy_(torch.where(fresh, iteration, record[1]))
