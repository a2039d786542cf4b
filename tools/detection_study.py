#!/usr/bin/env python
"""Compare NORM BN, GN and MABN on the Fashion-MNIST COCO demo: the demo's small Mask R-CNN,
2 images/iteration, same schedule and seeds. Resumable: finished runs are skipped, interrupted
ones resume from their last checkpoint. Writes a Markdown table to OUTPUT_DIR/results.md.

  python tools/detection_study.py --output-dir output/detection_study --seeds 0 [KEY VALUE ...]
"""
import argparse
import os
from typing import List, Optional

from mabn_d2.atomic_io import atomic_write_text
from mabn_d2.detection_study import DEMO_NORM_CONFIGS, results_table, run_detection_study

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/detection_study")
    parser.add_argument("--norms", nargs="+", default=list(DEMO_NORM_CONFIGS), choices=list(DEMO_NORM_CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args(argv)
    results = run_detection_study(args.output_dir, args.norms, args.seeds, args.opts, repo_root=REPO_ROOT)
    table = results_table(results)
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "results.md"), table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
