"""What each training process holds for itself and an exact resume must restore, per process.

DDP runs with broadcast_buffers=False, so every process keeps its own MABN statistics (ring
buffers, running_var) computed from its own images, and every process draws from its own RNG
streams. A checkpoint written by process 0 alone would give every process process 0's state
on resume. The checkpointer therefore stores one entry per process: its buffers and its RNG
states (torch CPU and CUDA, numpy, python).

Resuming on another number of processes (M != N): process r takes the buffers of saved process
r mod N and keeps the RNG states it was seeded with at start; training continues, but not
bit for bit as it would have on N processes (`restore_rank_state` says so in the log).
"""
import logging
import random
from typing import Dict, List

import numpy as np
import torch
from torch import nn

__all__ = ["capture_rank_state", "capture_rng_state", "restore_rank_state", "restore_rng_state"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> Dict:
    """This process's RNG states as plain tensors and numbers (loadable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict) -> None:
    """Set this process's RNG states from `capture_rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    parameters = {name for name, _ in model.named_parameters()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in parameters}


def capture_rank_state(model: nn.Module) -> Dict:
    """This process's buffers (MABN statistics and counters among them) and RNG states."""
    return {"buffers": _buffers(model), "rng": capture_rng_state()}


def restore_rank_state(model: nn.Module, saved: List[Dict], rank: int, world_size: int, source: str = "") -> None:
    """Restore process `rank`'s share of `saved` (one entry per process that wrote it).

    Same number of processes: buffers and RNG states of the same rank, exactly. Another
    number: buffers of rank `rank % len(saved)`, RNG states as seeded at start, and a warning.
    """
    if not saved:
        return
    same_world = len(saved) == world_size
    entry = saved[rank % len(saved)]
    unexpected = model.load_state_dict(entry["buffers"], strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"per-process state in {source or 'the checkpoint'} does not match the model: "
                         f"{len(unexpected)} unknown buffers ({', '.join(unexpected[:3])})")
    if same_world:
        restore_rng_state(entry["rng"])
    elif rank == 0:
        logger.warning(
            "%s was written by %d processes and this run has %d: process r continues from the MABN "
            "statistics of saved process r mod %d and its own freshly seeded RNG, so the resume is not "
            "exact (it is with %d processes).", source or "The checkpoint", len(saved), world_size, len(saved),
            len(saved),
        )
