"""The trainer: detectron2's DefaultTrainer with what MABN training needs on top.

- COCOEvaluator for COCO-format datasets;
- weight decay of MABN / BRN affine parameters follows SOLVER.WEIGHT_DECAY_NORM like BN's;
- DDP works on CPU processes (gloo): no device_ids for CPU modules;
- `--resume` continues exactly: seeded, position-addressed data stream and RNG states in the
  checkpoint.
"""
import contextlib
import logging
import os
import random
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.utils import comm

from .config import add_mabn_config
from .data.stream import SeededStreamDataset, StreamPositionSampler
from .layers import BatchRenorm2d, MABN2d

__all__ = ["MABNTrainer", "setup_cfg", "TrainingStreamState"]

logger = logging.getLogger(__name__)
_NORM_TYPES = (MABN2d, BatchRenorm2d)


@contextlib.contextmanager
def _ddp_without_device_ids_on_cpu() -> Iterator[None]:
    """detectron2 passes device_ids=[local_rank] to DDP, which CPU modules reject."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if all(p.device.type == "cpu" for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class TrainingStreamState:
    """Checkpointable: the data-stream seed and the RNG states a resumed run must continue from."""

    def __init__(self, dataset: Optional[SeededStreamDataset]):
        self.dataset = dataset

    def state_dict(self) -> Dict:
        # Plain tensors and numbers only: checkpoints are read with torch.load(weights_only=True).
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        return {
            "data_seed": None if self.dataset is None else self.dataset.seed,
            "torch": torch.get_rng_state(),
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
            "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        }

    def load_state_dict(self, state: Dict) -> None:
        if self.dataset is not None and state.get("data_seed") is not None:
            self.dataset.seed = int(state["data_seed"])
        torch.set_rng_state(state["torch"])
        np_state = state["numpy"]
        np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        py_state = state["python"]
        random.setstate((py_state["version"], tuple(py_state["state"].tolist()), py_state["gauss"]))


def _reassign_norm_weight_decay(groups: List[Dict], model: torch.nn.Module, weight_decay_norm: float) -> List[Dict]:
    """Give MABN/BRN parameters the norm weight decay that detectron2 gives BN's."""
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)
    }
    result = []
    for group in groups:
        norm = [p for p in group["params"] if id(p) in norm_params]
        other = [p for p in group["params"] if id(p) not in norm_params]
        if other:
            result.append({**group, "params": other})
        if norm:
            result.append({**group, "params": norm, "weight_decay": weight_decay_norm})
    return result


class MABNTrainer(DefaultTrainer):
    """DefaultTrainer for configs that use NORM "MABN"/"BRN"; usable for any detectron2 config."""

    def __init__(self, cfg: CfgNode):
        self._stream_dataset: Optional[SeededStreamDataset] = None
        self._stream_sampler: Optional[StreamPositionSampler] = None
        with _ddp_without_device_ids_on_cpu():
            super().__init__(cfg)
        self.checkpointer.add_checkpointable("training_stream", TrainingStreamState(self._stream_dataset))

    def train(self):
        """Train, then return the final evaluation results (DefaultTrainer drops them)."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def build_train_loader(self, cfg: CfgNode):
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        self._stream_dataset = SeededStreamDataset(dicts, DatasetMapper(cfg, True), seed)
        self._stream_sampler = StreamPositionSampler()
        # A loader-owned generator: creating the loader iterator must not draw from the global
        # torch RNG, whose state a resumed run restores from the checkpoint.
        return build_detection_train_loader(
            cfg, dataset=self._stream_dataset, sampler=self._stream_sampler, mapper=_identity, seed=seed
        )

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self._stream_sampler is not None:
            per_rank_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            self._stream_sampler.start = self.start_iter * per_rank_batch

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = d2_build_optimizer(cfg, model)
        groups = _reassign_norm_weight_decay(optimizer.param_groups, model, cfg.SOLVER.WEIGHT_DECAY_NORM)
        return type(optimizer)(groups, **optimizer.defaults)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        metadata = MetadataCatalog.get(dataset_name)
        if not hasattr(metadata, "json_file"):
            raise NotImplementedError(
                f"No evaluator for dataset {dataset_name!r}: MABNTrainer evaluates COCO-format datasets "
                "(registered with a json_file); set DATASETS.TEST accordingly or subclass build_evaluator."
            )
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def _identity(sample):
    return sample


def setup_cfg(config_file: str, opts: List[str], args=None) -> CfgNode:
    """get_cfg + MABN keys + file + command-line opts, frozen; default_setup when args given."""
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg
