#!/usr/bin/env python
"""Train or evaluate a detectron2 model that uses MABN (or any stock norm).

Same conventions as detectron2's tools/train_net.py:
  python tools/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
      --num-gpus 8 [--resume] [--eval-only MODEL.WEIGHTS path.pth] [KEY VALUE ...]
A LazyConfig (.py) takes detectron2's lazyconfig_train_net.py conventions, key=value overrides:
  python tools/train_net.py --config-file configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.py \
      [--resume] [--eval-only train.init_checkpoint=path.pth] [train.max_iter=100 train.output_dir=out ...]
(mabn_d2.engine.lazy, mabn_d2.engine.lazy_trainer: the model gets the MABN pass after `instantiate`).
On a machine without GPUs, --num-gpus N starts N CPU processes that train with gloo. Processes
of one machine meet on a free local port unless --dist-url is given.

Before any process starts or anything is written, the config, MODEL.DEVICE, $MABN_D2_BACKEND,
OUTPUT_DIR, the SOLVER values and the checkpoint to start from (the one --resume continues, or
MODEL.WEIGHTS: that it loads and fits the model the config builds) are checked; a problem ends
the command with one line on stderr and exit status 2, and an existing run's files stay as they were.

SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) during training saves a checkpoint at the
current iteration in every process and ends the command with status 143 / 130; --resume
continues from it (mabn_d2.engine.preemption). The launching process passes either signal on to
the training processes it started and waits for them. When one training process dies (killed, or
failed), the others are stopped and the command ends with one line naming its rank, pid and how it
ended, on stderr and in log.txt (mabn_d2.engine.rank_failure).
"""
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from typing import Iterator, List, Optional

import torch.multiprocessing
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import mabn_d2  # noqa: F401  (registers the "MABN" and "BRN" norm strings)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from demo_datasets.builtin import register_demo_datasets, register_lazy_demo_datasets
from mabn_d2.engine import MABNTrainer
from mabn_d2.engine.trainer import read_cfg, setup_run
from mabn_d2.engine.checkpoint import CheckpointError, MABNCheckpointer, read_resume_point
from mabn_d2.engine.lazy import check_lazy_before_start, is_lazy_config, load_lazy_config
from mabn_d2.engine.lazy_trainer import run_lazy
from mabn_d2.engine.preemption import PREEMPTION_SIGNALS
from mabn_d2.engine.preflight import UsageError, check_backend, check_device, check_solver, check_writable_dir
from mabn_d2.engine.rank_failure import report_rank_failure
from mabn_d2.engine.weights_fit import check_resume_fits, check_weights_fit

logger = logging.getLogger("mabn_d2.train_net")
USAGE_ERROR_STATUS = 2


def main(args, cfg: Optional[CfgNode] = None):
    """One training process. `cfg`: the YAML config as `check_before_start` read and checked it
    (read here when None). A LazyConfig is loaded in each process, as detectron2 does: it may hold
    objects that do not pickle."""
    if is_lazy_config(args.config_file):
        return run_lazy(args, register_datasets=register_lazy_demo_datasets)
    if cfg is None:
        cfg = read_cfg(args.config_file, args.opts)
    setup_run(cfg, args, check_output=False)  # check_before_start checked MODEL.DEVICE and OUTPUT_DIR
    register_demo_datasets(cfg)
    if args.eval_only:
        model = MABNTrainer.build_model(cfg)
        MABNCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = MABNTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_before_start(args) -> Optional[CfgNode]:
    """The checks every process would otherwise fail on, done once, before anything is written;
    returns the YAML config read (None for a LazyConfig), which the training processes are given.

    Cheapest first; the checkpoint comes last, as it is compared with a model built on the CPU.
    A LazyConfig gets the same checks under its own keys (`check_lazy_before_start`).
    """
    if is_lazy_config(args.config_file):
        check_lazy_before_start(args.config_file, args.opts, training_processes(args), eval_only=args.eval_only,
                                resume=args.resume)
        return None
    cfg = read_cfg(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE, args.num_gpus if cfg.MODEL.DEVICE.startswith("cuda") else 1)
    check_backend(cfg)
    check_writable_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    if not args.eval_only:
        check_solver(cfg, training_processes(args))
    resume_point = read_resume_point(cfg.OUTPUT_DIR) if args.resume else None
    if resume_point:  # MODEL.WEIGHTS is not used; the checkpoint is read once
        path, contents = resume_point
        check_resume_fits(cfg, path, contents=contents)
        return cfg
    check_weights_fit(cfg, cfg.MODEL.WEIGHTS, eval_only=args.eval_only)  # reads MODEL.WEIGHTS once
    return cfg


def training_processes(args) -> int:
    """How many processes launch() starts (the world size): one when it starts none."""
    return max(1, args.num_gpus * args.num_machines)


def _main_reporting_errors(args, cfg: Optional[CfgNode] = None):
    """`main` in one process; a known problem ends it with one line and status 2, no traceback."""
    try:
        return main(args, cfg)
    except (UsageError, CheckpointError) as error:
        print(f"train_net: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR_STATUS) from None


def parse_args(argv: Optional[List[str]] = None):
    parser = default_argument_parser()
    # detectron2's default is one fixed port per user, which two runs of the same user share.
    parser.set_defaults(dist_url=None)
    args = parser.parse_args(argv)
    if args.dist_url is None:
        if args.num_machines > 1:
            parser.error("--dist-url is required with --num-machines > 1")
        args.dist_url = "auto"  # launch() picks a free local port
    return args


def invoke_main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = check_before_start(args)
    except (UsageError, CheckpointError) as error:
        print(f"train_net: error: {error}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    logger.info("Command Line Args: %s", args)
    received: List[int] = []
    with _signals_passed_on(training_processes(args) > 1, received):
        status = _launch(args, cfg)
    if status == 0 and received:  # a process stopped by the signal before training began ends as 0
        return 128 + received[0]
    return status


def _launch(args, cfg: Optional[CfgNode] = None) -> int:
    try:
        launch(
            _main_reporting_errors,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args, cfg),
        )
    except SystemExit as exit_:  # one process: the error line is printed already, or it was preempted
        return exit_.code if isinstance(exit_.code, int) else 1
    except (torch.multiprocessing.ProcessExitedException, torch.multiprocessing.ProcessRaisedException) as error:
        # One process failed and torch stopped the others: name it, unless it said why itself.
        explained = (USAGE_ERROR_STATUS, *(128 + signum for signum in PREEMPTION_SIGNALS))
        return report_rank_failure(error, _output_dir(args, cfg), args.machine_rank * args.num_gpus, explained)
    return 0


def _output_dir(args, cfg: Optional[CfgNode]) -> Optional[str]:
    """The run's OUTPUT_DIR, for the line on a failed process (None when the config does not load)."""
    if cfg is not None:
        return cfg.OUTPUT_DIR
    try:
        if is_lazy_config(args.config_file):
            return load_lazy_config(args.config_file, args.opts).train.output_dir
        return read_cfg(args.config_file, args.opts).OUTPUT_DIR
    except Exception:  # noqa: BLE001  (the line then goes without the checkpoint to resume from)
        return None


@contextlib.contextmanager
def _signals_passed_on(active: bool, received: List[int]) -> Iterator[None]:
    """While launch() waits for the training processes it started, pass SIGTERM / SIGINT on to them.

    A scheduler may signal only this process. Left to the default, it would end at once (SIGTERM)
    or with a traceback (SIGINT) while the training processes still save their checkpoint; here it
    waits for them and ends with their status. Processes that got the signal directly too see it
    twice, which is the same as once. `received` collects the signals.
    """
    if not active:
        yield
        return

    def pass_on(signum, frame):
        received.append(signum)
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(invoke_main())
