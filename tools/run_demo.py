#!/usr/bin/env python
"""The demo, an end-to-end check of the plugin on a short schedule: Mask R-CNN (R-18 FPN, MABN in
backbone and FPN, BN in the heads) trained from scratch on Fashion-MNIST canvases at 2
images/iteration on the CPU, evaluated (COCO box and mask AP), predictions drawn to a PNG, then
folded into FrozenBN, verified, exported to TorchScript and timed against the unfolded model.

  python tools/run_demo.py [--config-file CFG] [--output-dir DIR] [--resume] [KEY VALUE ...]
"""
import sys
import os
import argparse
from typing import List, Optional

from detectron2.utils.logger import setup_logger

import mabn_d2  # noqa: F401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.demo import format_summary, run_demo

DEFAULT_CONFIG = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.yaml"


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output-dir", default="output/demo_mabn_bnheads")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_logger(output=args.output_dir)
    setup_logger(name="mabn_d2")
    summary = run_demo(args.config_file, args.output_dir, args.opts, resume=args.resume)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
