#!/usr/bin/env python
"""A short demo training run whose `mabn/` health scalars are kept for docs/results.md.

Trains a config (default the demo's) with MABNTrainer, exactly as tools/train_net.py does, except
that the health hook writes its scalars every --period iterations (the trainer's own period, 20,
matches detectron2's metrics writer; metrics.json keeps only the value current at each write, so
the scalars are taken from the EventStorage history instead). Writes, atomically, one JSON file:
the command, the settings, every `mabn/` scalar and the total loss by iteration, and the health
hook's lines from the run's log.txt (start phase, backend, phase changes). tools/make_results.py
renders the figure and the section from that file.

  python tools/health_demo.py --threads 1 --period 2 --output results/health_demo/mabn_scalars.json \
      SOLVER.MAX_ITER 100 MODEL.MABN.WARMUP_ITERS 30 MODEL.MABN.RENORM_WARMUP_ITERS 60 \
      DATASETS.TEST "()" OUTPUT_DIR output/health_demo
"""
import argparse
import os
import shlex
import sys
from typing import Any, Dict, List, Optional

import torch

import mabn_d2  # noqa: F401  (registers the "MABN" and "BRN" norm strings)
from mabn_d2.config import mabn_kwargs_from_cfg
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from demo_datasets.builtin import register_demo_datasets
from mabn_d2.engine import MABNHealthHook, MABNTrainer
from mabn_d2.engine.trainer import read_cfg, setup_run
from mabn_d2.utils.atomic_io import atomic_write_json

DEMO_CONFIG = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml"
HOOK_LOGGER = "mabn_d2.engine.health"  # the logger name detectron2 writes into each log.txt line


def hook_log_lines(log_path: str) -> List[str]:
    """The health hook's lines in a detectron2 log.txt, verbatim (time and logger name included)."""
    with open(log_path) as log:
        return [line.strip() for line in log if HOOK_LOGGER in line]


def storage_series(trainer: MABNTrainer, prefix: str = "mabn/", extra=("total_loss",)) -> Dict[str, List[List[float]]]:
    """{name: [[iteration, value], ...]} for the scalars named `prefix`* (and `extra`) in the trainer's storage."""
    histories = trainer.storage.histories()
    names = sorted(n for n in histories if n.startswith(prefix)) + [n for n in extra if n in histories]
    return {name: [[int(it), float(v)] for v, it in histories[name].values()] for name in names}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--period", type=int, default=2, help="health hook period in iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", required=True, help="the JSON file to write (atomically)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = read_cfg(args.config_file, args.opts)
    if os.path.exists(os.path.join(cfg.OUTPUT_DIR, "log.txt")):
        parser.error(f"{cfg.OUTPUT_DIR} holds a run already (log.txt): name a fresh OUTPUT_DIR")
    # default_setup's log.txt and config.yaml, as tools/train_net.py writes them
    setup_run(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False, resume=False, opts=args.opts))
    register_demo_datasets(cfg)
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    hook = next(h for h in trainer._hooks if isinstance(h, MABNHealthHook))
    hook.period = args.period
    trainer.train()
    layer = mabn_kwargs_from_cfg(cfg)
    record = {
        "command": "python tools/health_demo.py " + " ".join(shlex.quote(a) for a in argv),
        "config": args.config_file, "opts": list(args.opts), "period": args.period,
        "max_iter": cfg.SOLVER.MAX_ITER, "buffer_size": layer["buffer_size"],
        "warmup_iters": layer["warmup_iters"], "renorm_warmup_iters": layer["renorm_warmup_iters"],
        "torch": torch.__version__,
        "scalars": storage_series(trainer),
        "log": hook_log_lines(os.path.join(cfg.OUTPUT_DIR, "log.txt")),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write_json(args.output, record)
    print(f"wrote {args.output}: {len(record['scalars'])} series; log lines:\n  " + "\n  ".join(record["log"]))
    return record


if __name__ == "__main__":
    main()
