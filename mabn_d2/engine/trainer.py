"""The trainer: detectron2's DefaultTrainer with what MABN training needs on top.

- the evaluator by the dataset's evaluator_type (`mabn_d2.engine.evaluation`), as detectron2's train_net;
- DATALOADER.SAMPLER_TRAIN honoured (exact resume with the default TrainingSampler);
- weight decay of MABN / BRN affine parameters follows SOLVER.WEIGHT_DECAY_NORM like BN's (through
  detectron2's own build_optimizer, which `import mabn_d2` teaches the two norms; see
  `mabn_d2.modeling.optimizer_params`);
- DDP works on CPU processes (gloo): no device_ids for CPU modules;
- `--resume` continues exactly, on any number of processes: seeded, position-addressed data
  stream, and every process's own MABN state and RNG states in the checkpoint
  (`mabn_d2.engine.checkpoint.MABNCheckpointer`, which also writes checkpoints atomically and checks
  what a resume starts from);
- a config is validated before anything is written to its OUTPUT_DIR;
- MABN's health (`mabn/` scalars in metrics.json and TensorBoard, phase changes and the serving
  backend in log.txt: `mabn_d2.engine.health.MABNHealthHook`);
- SIGTERM / SIGINT during training save a checkpoint at the current iteration in every process
  and stop with status 143 / 130 (`mabn_d2.engine.preemption`).
"""
import logging
import os
import weakref
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import (
    AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, default_setup, hooks,
)
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_mabn_config, float_keys_take_integers, long_renorm_warmup_message, validate_mabn_config
from ..layers import MABN2d
from .checkpoint import CheckpointError, MABNCheckpointer, read_checkpoint
from .evaluation import build_evaluator_for_dataset
from .health import MABNHealthHook
from .preemption import PreemptionCheckpointer
from .preflight import UsageError, check_device, check_norm_names, check_writable_dir, first_line
from .train_stream import SeededStreamDataset, StreamPositionSampler

__all__ = ["FINAL_CHECKPOINT", "MABNTrainer", "ensure_final_checkpoint", "read_cfg", "setup_cfg", "setup_run",
           "TrainingStreamState"]

logger = logging.getLogger(__name__)


FINAL_CHECKPOINT = "model_final"  # what detectron2's PeriodicCheckpointer writes at MAX_ITER
HEALTH_PERIOD = 20  # DefaultTrainer's PeriodicWriter period: the mabn/ scalars land in every write


class TrainingStreamState:
    """Checkpointable: the seed of the data stream, shared by all processes (each process's RNG
    states are saved per process by MABNCheckpointer)."""

    def __init__(self, dataset: Optional[SeededStreamDataset]):
        self.dataset = dataset

    def state_dict(self) -> Dict:
        return {"data_seed": None if self.dataset is None else self.dataset.seed}

    def load_state_dict(self, state: Dict) -> None:
        if self.dataset is not None and state.get("data_seed") is not None:
            self.dataset.seed = int(state["data_seed"])


class MABNTrainer(DefaultTrainer):
    """DefaultTrainer for configs that use NORM "MABN"/"BRN"; usable for any detectron2 config."""

    def __init__(self, cfg: CfgNode):
        """DefaultTrainer.__init__'s steps in its order, with the checkpointer and DDP of `build_checkpointer`
        and `build_ddp_model` (subclass hooks): MABNCheckpointer saves each process's MABN and RNG state
        atomically, and CPU modules get DDP without device_ids (detectron2 passes [local_rank], which
        CPU modules reject)."""
        TrainerBase.__init__(self)
        setup_package_logger(cfg.OUTPUT_DIR)
        self._stream_dataset: Optional[SeededStreamDataset] = None
        self._stream_sampler: Optional[StreamPositionSampler] = None
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self.build_ddp_model(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        self.checkpointer.add_checkpointable("training_stream", TrainingStreamState(self._stream_dataset))
        if any(isinstance(m, MABN2d) for m in self.model.modules()):
            message = long_renorm_warmup_message(cfg)
            if message:
                logger.warning(message)

    @staticmethod
    def build_ddp_model(model: torch.nn.Module) -> torch.nn.Module:
        """detectron2's create_ddp_model (buffers not broadcast: each rank keeps its MABN state);
        no device_ids for a model on the CPU."""
        kwargs = {"device_ids": None} if all(p.device.type == "cpu" for p in model.parameters()) else {}
        return create_ddp_model(model, broadcast_buffers=False, **kwargs)

    def build_checkpointer(self, cfg: CfgNode, model: torch.nn.Module) -> MABNCheckpointer:
        """The run's checkpointer (atomic, per-process MABN and RNG state, verified resume)."""
        return MABNCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """`mabn_d2.build_model`: the MABN hyper-parameters of cfg, then the MABN pass."""
        from ..modeling.registry import build_model

        model = build_model(cfg)
        logging.getLogger(__name__).info("Model:\n%s", model)
        return model

    def train(self):
        """Train, then return the final evaluation results (DefaultTrainer drops them).

        A run resumed after it had finished first makes sure its final checkpoint loads.
        """
        if self.start_iter >= self.max_iter:
            self._ensure_final_checkpoint()
        super().train()
        return getattr(self, "_last_eval_results", None)

    def _ensure_final_checkpoint(self) -> None:
        ensure_final_checkpoint(self.checkpointer, self.iter, self.max_iter)

    def build_hooks(self) -> List[hooks.HookBase]:
        """DefaultTrainer's hooks, with the checkpoint hook on every process, not only the main one,
        and right after it the checkpoint on SIGTERM / SIGINT.

        Saving is collective (each process contributes its own MABN and RNG state); the hooks
        sit where detectron2 puts its checkpointer, before evaluation, on every process.
        """
        result = super().build_hooks()
        if not comm.is_main_process():
            evaluation = next((i for i, hook in enumerate(result) if isinstance(hook, hooks.EvalHook)), len(result))
            result.insert(evaluation, hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        periodic = next(i for i, hook in enumerate(result) if isinstance(hook, hooks.PeriodicCheckpointer))
        result.insert(periodic + 1, PreemptionCheckpointer(self.checkpointer))
        # MABN's health scalars go into the storage before detectron2's writer (period 20) reads it.
        writer = next((i for i, hook in enumerate(result) if isinstance(hook, hooks.PeriodicWriter)), len(result))
        result.insert(writer, MABNHealthHook(period=HEALTH_PERIOD))
        return result

    def build_train_loader(self, cfg: CfgNode):
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            # Repeat-factor and subset sampling are detectron2's own; the position-addressed
            # stream that makes --resume exact exists only for plain TrainingSampler order.
            logger.info(
                "DATALOADER.SAMPLER_TRAIN=%s: detectron2's train loader; --resume continues the run but "
                "does not replay the exact image order", cfg.DATALOADER.SAMPLER_TRAIN,
            )
            return build_detection_train_loader(cfg)
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        dataset = SeededStreamDataset(dicts, self.build_train_mapper(cfg), seed)
        sampler = StreamPositionSampler()
        if self._stream_dataset is None:  # the training loader; later calls (PreciseBN) build others
            self._stream_dataset, self._stream_sampler = dataset, sampler
        # A loader-owned generator: creating the loader iterator must not draw from the global
        # torch RNG, whose state a resumed run restores from the checkpoint.
        return build_detection_train_loader(cfg, dataset=dataset, sampler=sampler, mapper=_identity, seed=seed)

    @classmethod
    def build_train_mapper(cls, cfg: CfgNode) -> DatasetMapper:
        """The training mapper; a subclass hook for extra augmentations that keeps the exact stream."""
        return DatasetMapper(cfg, True)

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self._stream_sampler is not None:
            per_rank_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            self._stream_sampler.start = self.start_iter * per_rank_batch

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """detectron2's build_optimizer: MABN / BRN parameters get BatchNorm2d's weight decay and LR
        there once mabn_d2 is imported, so DefaultTrainer and this trainer train a config alike."""
        return d2_build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        """By the dataset's evaluator_type, as detectron2's train_net does (COCO for a bare json_file)."""
        return build_evaluator_for_dataset(cfg, dataset_name, output_folder)


def ensure_final_checkpoint(checkpointer: MABNCheckpointer, iteration: int, max_iter: int,
                            max_iter_key: str = "SOLVER.MAX_ITER") -> None:
    """Write model_final.pth again from the resumed state if it is missing or unreadable.

    For a run resumed after it had finished: the resumed checkpoint holds the state at the last
    iteration, which is what model_final.pth holds; a crash while writing it must not end in a
    run that reports success without a usable final model. Collective: every process calls it.
    """
    path = os.path.join(checkpointer.save_dir, f"{FINAL_CHECKPOINT}.pth")
    problem = None
    if comm.is_main_process():
        try:
            read_checkpoint(path, mmap=True)
        except CheckpointError as error:
            problem = str(error)
    problem = comm.all_gather(problem)[0]
    if problem:
        logging.getLogger(__name__).warning(
            "Training already reached %s %d, but %s; writing it again from the resumed state (iteration %d).",
            max_iter_key, max_iter, problem, iteration,
        )
        checkpointer.save(FINAL_CHECKPOINT, iteration=iteration)


def _identity(sample):
    return sample


def setup_cfg(config_file: str, opts: List[str], args=None, check_output: bool = True) -> CfgNode:
    """get_cfg + MABN keys + file + command-line opts, validated and frozen (`read_cfg`).

    With `args` (a training or evaluation run), also `setup_run`: checks MODEL.DEVICE and
    OUTPUT_DIR, then detectron2's default_setup, which writes config.yaml and the log into
    OUTPUT_DIR: every check comes first, so a bad value never overwrites an existing run's
    config.yaml. Raises UsageError (a ValueError) with one line naming the problem.
    """
    cfg = read_cfg(config_file, opts)
    if args is not None:
        setup_run(cfg, args, check_output)
    return cfg


def read_cfg(config_file: str, opts: List[str]) -> CfgNode:
    """get_cfg + MABN keys + file + command-line opts, validated and frozen; UsageError naming the problem.

    The one read of a run's config: tools/train_net.py reads it before it starts the training
    processes and hands each of them the frozen result (`setup_run`).
    """
    cfg = get_cfg()
    add_mabn_config(cfg)
    try:
        with float_keys_take_integers():  # `EPS: 0` means 0.0
            cfg.merge_from_file(config_file)
    except Exception as error:  # missing file, bad YAML, unknown keys
        raise UsageError(f"cannot read config {config_file}: {first_line(error)}") from error
    try:
        with float_keys_take_integers():  # `MODEL.MABN.WARMUP_FRACTION -1` means -1.0
            cfg.merge_from_list(list(opts))
    except Exception as error:  # unknown key, odd number of items, a value of the wrong type
        raise UsageError(f"bad config override: {first_line(error)}") from error  # yacs names the key
    try:
        validate_mabn_config(cfg)
    except ValueError as error:
        raise UsageError(str(error)) from error
    check_norm_names(cfg)
    cfg.freeze()
    return cfg


def setup_run(cfg: CfgNode, args, check_output: bool = True) -> CfgNode:
    """One process's setup for a run of the read `cfg`: detectron2's default_setup (config.yaml,
    log.txt, seed, environment) and the package's logger into the same log.txt.

    `check_output=False`: the caller has checked MODEL.DEVICE and OUTPUT_DIR already, as
    tools/train_net.py does once before it starts the processes.
    """
    if check_output:
        check_device(cfg.MODEL.DEVICE)
        check_writable_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    default_setup(cfg, args)
    setup_package_logger(cfg.OUTPUT_DIR)
    return cfg


def setup_package_logger(output_dir: Optional[str]) -> logging.Logger:
    """The "mabn_d2" logger (and Python warnings) into detectron2's log.txt, with level and time.

    As detectron2's projects do: setup_logger(output, rank, name=...), on every rank (rank 0 also
    prints, the others write log.txt.rankN). setup_logger is cached, so calling it again is free.
    """
    rank = comm.get_rank()
    logging.captureWarnings(True)  # warnings.warn (deprecations) -> the "py.warnings" logger
    setup_logger(output_dir, distributed_rank=rank, name="py.warnings", abbrev_name="warn")
    return setup_logger(output_dir, distributed_rank=rank, name="mabn_d2", abbrev_name="mabn_d2")
