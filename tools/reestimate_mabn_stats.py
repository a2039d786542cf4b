#!/usr/bin/env python
"""Re-estimate MABN's running_var at a run's checkpoints and evaluate again (PreciseBN for MABN).

For each chosen checkpoint of a finished or running detectron2 run: load it, average the second
moment every MABN layer sees over N training batches, write it into running_var, evaluate on
cfg.DATASETS.TEST and append the metrics to OUTPUT_DIR/metrics.json (detectron2's format, so the
study tools read it like a training run's). Checkpoints already evaluated there are skipped.

  python tools/reestimate_mabn_stats.py --run-dir output/demo_mabn --output-dir output/demo_mabn_precise
  python tools/reestimate_mabn_stats.py --run-dir RUN --output-dir OUT --all-evaluated --num-batches 100
"""
import argparse
import os
import sys
from typing import List, Optional

from detectron2.utils.logger import setup_logger

import mabn_d2  # noqa: F401  (registers the norm strings)
from mabn_d2.engine.checkpoint import CheckpointError
from mabn_d2.engine.reestimation import reestimate_run_checkpoints

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/
from demo_datasets.builtin import register_demo_datasets  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a detectron2 run directory (config.yaml + checkpoints)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-batches", type=int, default=100, help="training batches averaged per layer")
    parser.add_argument("--all-evaluated", action="store_true",
                        help="every checkpoint whose iteration the run evaluated (default: model_final.pth only)")
    args = parser.parse_args(argv)
    setup_logger(name="mabn_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        done = reestimate_run_checkpoints(args.run_dir, args.output_dir, args.num_batches, args.all_evaluated,
                                          register_datasets=register_demo_datasets)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        print(f"reestimate_mabn_stats: {error}", file=sys.stderr)
        return 2
    for iteration, metrics in done.items():
        print(f"iteration {iteration}: box AP {metrics['bbox/AP']:.1f}, mask AP {metrics['segm/AP']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
