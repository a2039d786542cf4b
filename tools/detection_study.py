#!/usr/bin/env python
"""Detection study on the Fashion-MNIST COCO demo: norms and MABN settings, same model, data,
learning rate and schedule for every run, evaluated every EVAL_PERIOD iterations.

Resumable: finished runs are skipped, interrupted ones resume from their last checkpoint.
Writes OUTPUT_DIR/results.md (final AP per variant, mean ± std over seeds, and AP at every
evaluation) and OUTPUT_DIR/ap_curves.png (AP against iteration, one line per variant).

  python tools/detection_study.py --output-dir output/detection_study --seeds 0 [KEY VALUE ...]
  python tools/detection_study.py --variants BN GN MABN_warmups_2_10 --seeds 0 1 2
  python tools/detection_study.py --report-only --seeds 0 1 2 --loss-edges 0 50 100 200 338 450
Variants: see `--list`.
"""
import argparse
import os
from typing import List, Optional

from mabn_d2.atomic_io import atomic_write_text
from mabn_d2.research.detection_study import (
    VARIANTS, collect_results, curves_table, plot_curves, results_table, run_detection_study, training_loss_table,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/detection_study")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval-period", type=int, default=300, help="iterations between evaluations")
    parser.add_argument("--reestimate-batches", type=int, default=100,
                        help="training batches for the running_var re-estimation variant")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the finished runs among --variants x --seeds")
    parser.add_argument("--loss-edges", nargs="+", type=int, default=None,
                        help="iterations bounding the training-loss windows, for every seed (default: quarters, "
                             "first seed)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.list:
        listing = "\n".join(f"{name}: {variant.description}" for name, variant in VARIANTS.items())
        print(listing)
        return listing
    if args.report_only:
        results = collect_results(args.output_dir, args.variants, args.seeds)
    else:
        results = run_detection_study(args.output_dir, args.variants, args.seeds, args.opts,
                                      eval_period=args.eval_period, reestimate_batches=args.reestimate_batches,
                                      repo_root=REPO_ROOT)
    if args.loss_edges:
        losses = (f"Mean training loss (total_loss) between iterations {', '.join(map(str, args.loss_edges))}, "
                  "every run:\n\n" + training_loss_table(args.output_dir, list(results), edges=args.loss_edges,
                                                         seeds=args.seeds))
    else:
        losses = (f"Mean training loss (total_loss) over quarters of the schedule (seed {args.seeds[0]}):\n\n"
                  + training_loss_table(args.output_dir, list(results), args.seeds[0]))
    report = (
        "Final evaluation, mean ± sample std over seeds:\n\n" + results_table(results)
        + f"\n\nBox / mask AP at each evaluation (seed {args.seeds[0]}):\n\n" + curves_table(results, args.seeds[0])
        + "\n\n" + losses
    )
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "results.md"), report + "\n")
    plot_curves(results, os.path.join(args.output_dir, "ap_curves.png"), seed=args.seeds[0])
    print(report)
    return report


if __name__ == "__main__":
    main()
