#!/usr/bin/env python
"""Small-batch classification study on Fashion-MNIST: BN(32), BN(2), BRN(2), GN, MABN(2) and its ablations.

    python tools/small_batch_study.py --output-dir output/small_batch_study          # the full study
    python tools/small_batch_study.py --quick --output-dir /tmp/study_quick            # a CI-sized check

Rerunning the same command skips finished runs and resumes interrupted ones. The default
(7 norms x 3 seeds, 2 epochs of batch 32, 2 jobs x 1 thread) takes about 1 h on an idle
2-core CPU; the measurements behind it are in research/study.py.
"""
import os
import argparse
import dataclasses
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.small_batch_study import NORMS, StudyConfig, run_study

# A few minutes at most: every norm once, through all of MABN's phases (70 x 16 > 1000 forwards).
QUICK = StudyConfig(iters=70, warmup_iters=10, train_images=2048, test_images=1000, curve_test_images=500, evals=2)

# command-line option -> StudyConfig field
_CONFIG_OPTIONS = {
    "epochs": float, "iters": int, "batch_size": int, "norm_batch": int, "lr": float, "warmup_iters": int,
    "weight_decay": float, "train_images": int, "test_images": int, "curve_test_images": int, "evals": int,
    "mabn_buffer_size": int, "mabn_ema_decay": float, "mabn_warmup_iters": int,
    "mabn_renorm_warmup_iters": int, "mabn_renorm_clip": float,
}


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/small_batch_study")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2k training images, 70 iterations")
    parser.add_argument("--seeds", type=_int_list, default=None, help="comma-separated (default 0,1,2; quick: 0)")
    parser.add_argument("--norms", default=",".join(NORMS), help=f"comma-separated subset of {','.join(NORMS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel processes")
    parser.add_argument("--no-center-stem", action="store_true", help="plain stem conv for the MABN runs")
    for option, kind in _CONFIG_OPTIONS.items():
        default = getattr(StudyConfig(), option)
        parser.add_argument("--" + option.replace("_", "-"), type=kind, default=None,
                            help=f"default {default} (quick: {getattr(QUICK, option)})")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    config = QUICK if args.quick else StudyConfig()
    changes = {option: getattr(args, option) for option in _CONFIG_OPTIONS if getattr(args, option) is not None}
    if args.epochs is not None and args.iters is None:
        changes["iters"] = None  # --epochs replaces the quick iteration count
    if args.no_center_stem:
        changes["center_stem"] = False
    return dataclasses.replace(config, **changes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    norms = [n for n in args.norms.split(",") if n]
    summary = run_study(config, norms, seeds, args.output_dir, threads=args.threads, jobs=args.jobs)
    for row in summary["rows"]:
        print(f"{row['label']:>22}: {row['mean']:.2f} +/- {row['std']:.2f} % over seeds {row['seeds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
