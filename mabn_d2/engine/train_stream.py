"""A training data stream that resumes exactly.

detectron2's TrainingSampler restarts its shuffle on `--resume` and augmentations draw from the
process-global numpy RNG, so a resumed run sees different data than an uninterrupted one.
Here every sample is addressed by its position in an infinite stream: the position fixes the
image (a per-epoch permutation derived from the seed) and the augmentation RNG (seeded from
seed and position). Resuming at iteration i means starting the stream at i * batch.
"""
import copy
import itertools
import random
from typing import Callable, Dict, Iterator, List

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededStreamDataset", "StreamPositionSampler"]


class SeededStreamDataset(Dataset):
    """Maps a stream position to a mapped sample, deterministically."""

    def __init__(self, dataset_dicts: List[Dict], mapper: Callable[[Dict], Dict], seed: int):
        if not dataset_dicts:
            raise ValueError("SeededStreamDataset: the training dataset is empty")
        self._dicts = dataset_dicts
        self._mapper = mapper
        self.seed = int(seed)
        self._permutations: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._dicts)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self._dicts))
        permutation = self._permutations.get(epoch)
        if permutation is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            permutation = torch.randperm(len(self._dicts), generator=generator)
            self._permutations = {epoch: permutation}  # one epoch cached at a time
        return int(permutation[offset])

    def __getitem__(self, position: int) -> Dict:
        record = copy.deepcopy(self._dicts[self.index_at(position)])
        np_state, py_state = np.random.get_state(), random.getstate()
        sample_seed = (self.seed * 2_654_435_761 + position) % (2**32)
        np.random.seed(sample_seed)
        random.seed(sample_seed)
        try:
            return self._mapper(record)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class StreamPositionSampler(Sampler):
    """Yields this rank's stream positions: rank, rank + world, ... from a settable start."""

    def __init__(self):
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()
        self.start = 0  # positions already consumed by this rank

    def __iter__(self) -> Iterator[int]:
        for k in itertools.count(self.start):
            yield self._rank + k * self._world_size
