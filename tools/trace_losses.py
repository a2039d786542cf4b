#!/usr/bin/env python
"""Print the training loss of every iteration of a short run, to compare two runs step by step.

Same config, same SEED: the per-iteration losses show where two runs part, e.g. with a different
number of threads (float summation order) or two checkouts of the code:

  OMP_NUM_THREADS=1 python tools/trace_losses.py --config-file configs/Demo/fmnist_mask_rcnn_R_18_FPN_bn.yaml \
      --iterations 16 SOLVER.WARMUP_ITERS 4
  OMP_NUM_THREADS=2 python tools/trace_losses.py ...   (same arguments)

SOLVER.MAX_ITER is set to --iterations, so the LR schedule is that of a run of this length.
"""
import sys
import os
import argparse
import tempfile
from typing import List, Optional

from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

import mabn_d2  # noqa: F401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from demo_datasets.builtin import register_demo_datasets
from mabn_d2.engine import MABNTrainer, setup_cfg


class _LossTrace(HookBase):
    def __init__(self, losses: List[float]):
        self.losses = losses

    def after_step(self):
        self.losses.append(float(self.trainer.storage.history("total_loss").latest()))


def main(argv: Optional[List[str]] = None) -> List[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    losses: List[float] = []
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = setup_cfg(args.config_file, ["SOLVER.MAX_ITER", str(args.iterations), "TEST.EVAL_PERIOD", "0",
                                           "SOLVER.CHECKPOINT_PERIOD", "1000000", *args.opts, "OUTPUT_DIR", output_dir])
        register_demo_datasets(cfg)
        seed_all_rng(cfg.SEED)  # as detectron2's default_setup does in train_net
        trainer = MABNTrainer(cfg)
        trainer.register_hooks([_LossTrace(losses)])
        trainer.resume_or_load(resume=False)
        trainer.train()
    print("iteration total_loss")
    for iteration, loss in enumerate(losses, start=1):
        print(f"{iteration} {loss:.6f}")
    return losses


if __name__ == "__main__":
    main()
