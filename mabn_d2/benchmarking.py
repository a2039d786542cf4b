"""Timing and memory helpers shared by the benchmark scripts in tools/.

Timings are medians of interleaved rounds (every candidate once per round), so a load change
on the machine hits all candidates alike; report ratios to a baseline timed in the same run.
"""
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["interleaved_medians", "saved_tensor_bytes", "markdown_table", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, float]:
    """Median wall time (seconds) of each candidate, timed round-robin."""
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward while running `fn`.

    Storages are counted once (a parameter saved twice is one tensor); the returned output
    is kept alive until the count is done so nothing is freed early.
    """
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn()
    del output
    return sum(storages.values())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
