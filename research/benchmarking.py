"""Timing and memory helpers shared by the benchmark scripts in tools/.

Timings are medians of interleaved rounds (every candidate once per round), so a load change
on the machine hits all candidates alike; report ratios to a baseline timed in the same run.
"""
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["interleaved_medians", "timed_call", "saved_tensor_bytes", "markdown_table", "synchronize"]


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, float]:
    """Median time (seconds) of each candidate, timed round-robin.

    On CUDA a call is timed with CUDA events recorded around it on the current stream (what
    the GPU spent, idle gaps waiting for launches included); elsewhere with the wall clock.
    Either way every call starts with the device idle.
    """
    device = torch.device(device)
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            seconds = timed_call(fn, device)
            if round_index >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes on `device` (CUDA events on CUDA, else the wall clock)."""
    device = torch.device(device)
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


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
