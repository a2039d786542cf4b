"""Training and evaluation from a LazyConfig, with what `MABNTrainer` gives a YAML run.

detectron2's tools/lazyconfig_train_net.py builds the model, optimizer and data loader with
`instantiate`, wraps them in SimpleTrainer / AMPTrainer and registers its hooks. `LazyMABNTrainer`
does the same, with the MABN parts of `MABNTrainer`:

- the model through `build_lazy_model` (the MABN pass after `instantiate`);
- `MABNCheckpointer` on every process (each saves its own MABN and RNG state), the checkpoint on
  SIGTERM / SIGINT right after the periodic one, and `MABNHealthHook` before the writer;
- the seeded, position-addressed data stream, so `--resume` continues exactly, when
  dataloader.train is detectron2's `build_detection_train_loader` without a sampler of its own;
- DDP without device_ids for CPU processes;
- optional gradient clipping, `train.clip_gradients = dict(enabled=True, clip_type="norm",
  clip_value=10.0, norm_type=2.0)`, SOLVER.CLIP_GRADIENTS's keys, applied by detectron2's own
  `maybe_add_gradient_clipping` (its lazy script has no clipping).
"""
import logging
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, default_setup
from detectron2.engine import hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf

from ..config import LONG_RENORM_WARMUP_SHARE
from ..layers import MABN2d
from .checkpoint import MABNCheckpointer
from .health import MABNHealthHook
from .lazy import build_lazy_model, load_lazy_config
from .preemption import PreemptionCheckpointer
from .train_stream import SeededStreamDataset, StreamPositionSampler
from .trainer import TrainingStreamState, ensure_final_checkpoint, setup_package_logger

__all__ = ["LazyMABNTrainer", "build_lazy_optimizer", "lazy_test", "run_lazy"]

logger = logging.getLogger(__name__)


def _identity(sample):
    return sample


def build_lazy_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`instantiate(cfg.optimizer)` for `model` (detectron2's convention: optimizer.params.model), with
    train.clip_gradients applied as SOLVER.CLIP_GRADIENTS would be."""
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    clip = OmegaConf.select(cfg, "train.clip_gradients", default=None)
    if clip is None or not clip.get("enabled", False):
        return optimizer
    solver = CfgNode({"CLIP_GRADIENTS": CfgNode({
        "ENABLED": True, "CLIP_TYPE": clip.get("clip_type", "value"), "CLIP_VALUE": float(clip.clip_value),
        "NORM_TYPE": float(clip.get("norm_type", 2.0)),
    })})
    return maybe_add_gradient_clipping(CfgNode({"SOLVER": solver}), optimizer)


def lazy_test(cfg: DictConfig, model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """detectron2's lazy `do_test`: dataloader.test through dataloader.evaluator; None without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


class LazyMABNTrainer(DefaultTrainer):
    """DefaultTrainer's step, state and properties for a LazyConfig run; built as lazyconfig_train_net builds one.

    Only DefaultTrainer's methods that do not read a YAML cfg are used (run_step, state_dict,
    load_state_dict, the model / optimizer / data_loader properties); the others are replaced here.
    """

    def __init__(self, cfg: DictConfig):
        TrainerBase.__init__(self)
        self.cfg = cfg
        self.output_dir = cfg.train.output_dir
        setup_package_logger(self.output_dir)
        self._stream_dataset: Optional[SeededStreamDataset] = None
        self._stream_sampler: Optional[StreamPositionSampler] = None
        model = build_lazy_model(cfg)
        logger.info("Model:\n%s", model)
        optimizer = build_lazy_optimizer(cfg, model)
        data_loader = self._build_train_loader(cfg)
        model = self._ddp_model(cfg, model)
        amp = bool(OmegaConf.select(cfg, "train.amp.enabled", default=False))
        self._trainer = (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
        self.checkpointer = MABNCheckpointer(model, self.output_dir, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = int(cfg.train.max_iter)
        self.register_hooks(self.build_hooks())
        self.checkpointer.add_checkpointable("training_stream", TrainingStreamState(self._stream_dataset))
        self._warn_long_renorm_warmup()

    @staticmethod
    def _ddp_model(cfg: DictConfig, model: torch.nn.Module) -> torch.nn.Module:
        """create_ddp_model with cfg.train.ddp (each rank keeps its MABN buffers unless it says otherwise);
        no device_ids for a model on the CPU."""
        kwargs = dict(OmegaConf.select(cfg, "train.ddp", default=None) or {"broadcast_buffers": False})
        if all(p.device.type == "cpu" for p in model.parameters()):
            kwargs["device_ids"] = None
        return create_ddp_model(model, **kwargs)

    def _build_train_loader(self, cfg: DictConfig):
        """dataloader.train, reading its samples from the seeded stream when it is detectron2's plain train loader."""
        node = cfg.dataloader.train
        target = node.get("_target_")
        plain = target is build_detection_train_loader or target == "detectron2.data.build_detection_train_loader"
        if not plain or node.get("sampler") is not None or "dataset" not in node or "mapper" not in node:
            logger.info("dataloader.train is not detectron2's build_detection_train_loader without a sampler: "
                        "instantiated as it is; --resume continues the run but does not replay the exact image order")
            return instantiate(node)
        dicts = instantiate(node.dataset)
        if not isinstance(dicts, list):
            return instantiate(node)
        seed = OmegaConf.select(cfg, "train.seed", default=-1)
        seed = seed if seed is not None and seed >= 0 else comm.shared_random_seed()
        self._stream_dataset = SeededStreamDataset(dicts, instantiate(node.mapper), seed)
        self._stream_sampler = StreamPositionSampler()
        others = {k: instantiate(v) for k, v in node.items() if k not in ("_target_", "dataset", "mapper", "sampler")}
        return build_detection_train_loader(
            dataset=self._stream_dataset, sampler=self._stream_sampler, mapper=_identity, seed=seed, **others
        )

    def build_hooks(self) -> List[hooks.HookBase]:
        """lazyconfig_train_net's hooks, with MABNTrainer's changes: the checkpointer on every process
        (saving is collective), the checkpoint on SIGTERM / SIGINT after it, the MABN health hook
        before the writer."""
        cfg = self.cfg
        log_period = int(OmegaConf.select(cfg, "train.log_period", default=20))
        checkpointer_args = dict(OmegaConf.select(cfg, "train.checkpointer", default=None) or {"period": 5000})
        result = [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(self.checkpointer, **checkpointer_args),
            PreemptionCheckpointer(self.checkpointer),
            hooks.EvalHook(int(OmegaConf.select(cfg, "train.eval_period", default=0)), self._test_and_keep_results),
            MABNHealthHook(period=log_period),
        ]
        if comm.is_main_process():
            result.append(hooks.PeriodicWriter(default_writers(self.output_dir, self.max_iter), period=log_period))
        return result

    def _test_and_keep_results(self) -> Optional[Dict[str, Any]]:
        self._last_eval_results = lazy_test(self.cfg, self.model)
        return self._last_eval_results

    def resume_or_load(self, resume: bool = True) -> None:
        """train.init_checkpoint, or with `resume` the run's last checkpoint, whose next iteration starts."""
        self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint or "", resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1
        if self._stream_sampler is not None:
            per_rank_batch = int(self.cfg.dataloader.train.total_batch_size) // comm.get_world_size()
            self._stream_sampler.start = self.start_iter * per_rank_batch

    def train(self) -> Optional[Dict[str, Any]]:
        """Train, then return the final evaluation results (None without an evaluator)."""
        if self.start_iter >= self.max_iter:
            ensure_final_checkpoint(self.checkpointer, self.iter, self.max_iter, "train.max_iter")
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    def _warn_long_renorm_warmup(self) -> None:
        """MABNTrainer's warning when re-normalization starts late in the schedule, from the layers themselves."""
        layers = [m for m in self.model.modules() if isinstance(m, MABN2d)]
        start = max((max(m.warmup_iters, m.renorm_warmup_iters) for m in layers), default=0)
        if start > LONG_RENORM_WARMUP_SHARE * self.max_iter:
            logger.warning(
                "MABN re-normalization starts after iteration %d, %.0f%% of train.max_iter=%d (more than %.0f%%): "
                "until then training normalizes with batch statistics or short moving averages and evaluation with "
                "running_var, a slower EMA. The norms' warmup_iters / renorm_warmup_iters size the warm-ups "
                "(docs/algorithm.md, 'Sizing the warm-ups to the schedule').",
                start, 100.0 * min(start, self.max_iter) / self.max_iter, self.max_iter, 100 * LONG_RENORM_WARMUP_SHARE,
            )


def run_lazy(args, register_datasets: Callable[[DictConfig], Any] = lambda cfg: None) -> Optional[Dict[str, Any]]:
    """tools/train_net.py's `main` for a LazyConfig: train, or with --eval-only evaluate train.init_checkpoint.

    `register_datasets(cfg)` runs in every process before any data loader is built, for datasets
    detectron2 does not register itself (the demo's, in tools/train_net.py).
    """
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_package_logger(cfg.train.output_dir)
    register_datasets(cfg)
    if args.eval_only:
        model = build_lazy_model(cfg)
        logger.info("Model:\n%s", model)
        MABNCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint or "", resume=args.resume)
        return lazy_test(cfg, model)
    trainer = LazyMABNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
