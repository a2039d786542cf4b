#!/usr/bin/env python
"""Detection study on the Fashion-MNIST COCO demo: norms and MABN settings, same model, data,
learning rate and schedule for every run, evaluated every EVAL_PERIOD iterations.

Two settings:
- default: one process at 2 images per SGD step (the demo's), variants of `--list`;
- `--virtual-gpus 8`: the paper's, each SGD step is 8 micro-batches of 2 images with gradients
  accumulated (SGD batch 16, LR 0.02), arms SyncBN16, BN2, MABN_per_gpu and one-change MABN arms,
  under the authors' solver scaled to --steps (`--recipe official`, the default) or the earlier
  variant (`--recipe variant`).

Resumable: finished runs are skipped, interrupted ones resume from their last checkpoint. Every
finished run's metrics go into a small committed record, RECORDS_DIR/<variant>_seed<k>.json
(default results/detection_study or results/paper_setting); the report and the curves are
rendered from those records, as `tools/make_results.py` does for docs/results.md.

  python tools/detection_study.py --variants BN GN MABN_warmups_2_10 --seeds 0 1 2 --eval-period 150
  python tools/detection_study.py --report-only
  python tools/detection_study.py --virtual-gpus 8 --variants SyncBN16 BN2 MABN_per_gpu --seeds 0 1 2 \
      --steps 400 --eval-period 100
  python tools/detection_study.py --virtual-gpus 8 --recipe variant --variants SyncBN16 BN2 --steps 240 \
      --eval-period 60 --output-dir output/paper_setting_240 --records-dir results/paper_setting_240
"""
import sys
import argparse
import os
from typing import List, Optional

from mabn_d2.utils.atomic_io import atomic_write_text
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.detection_report import detection_report, plot_records
from research.detection_study import VARIANTS, evaluation_curve, final_metrics, run_detection_study
from research.paper_setting import ARMS, DEFAULT_ARMS, RECIPES, run_study
from research.paper_setting_report import export_arm_record, paper_setting_table
from research.run_records import load_records, record_from_run, write_record

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LOSS_EDGES = (0, 50, 100, 200, 338, 450)


def _paper_setting(args: argparse.Namespace) -> str:
    arms = args.variants or list(DEFAULT_ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--virtual-gpus: unknown arms {unknown}; choose from {sorted(ARMS)}")
    default_folder = "paper_recipe" if args.recipe == "official" else "paper_setting"
    records_dir = args.records_dir or os.path.join(REPO_ROOT, "results", default_folder)
    output_dir = args.output_dir or os.path.join("output", default_folder)
    if not args.report_only or args.export_unfinished:
        runs = ({arm: {seed: os.path.join(output_dir, f"{arm}_seed{seed}") for seed in args.seeds} for arm in arms}
                if args.report_only else
                run_study(output_dir, arms, args.seeds, steps=args.steps, eval_period=args.eval_period,
                          recipe=args.recipe, jobs=args.jobs, virtual_gpus=args.virtual_gpus, opts=args.opts,
                          repo_root=REPO_ROOT))
        schedule = RECIPES[args.recipe](args.steps, args.eval_period)
        for arm, by_seed in runs.items():
            for seed, run_dir in by_seed.items():
                finished = final_metrics(run_dir) is not None
                if finished or (args.export_unfinished and evaluation_curve(run_dir)):
                    write_record(records_dir, export_arm_record(run_dir, arm, seed, schedule, args.virtual_gpus,
                                                                args.opts, finished=finished))
    report = paper_setting_table(load_records(records_dir))
    print(report)
    return report


def _demo_setting(args: argparse.Namespace) -> str:
    variants = args.variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown study variants {unknown}; choose from {sorted(VARIANTS)} (or see --list)")
    records_dir = args.records_dir or os.path.join(REPO_ROOT, "results", "detection_study")
    output_dir = args.output_dir or "output/detection_study"
    if not args.report_only:
        results = run_detection_study(output_dir, variants, args.seeds, args.opts, eval_period=args.eval_period,
                                      reestimate_batches=args.reestimate_batches, repo_root=REPO_ROOT)
        for name, by_seed in results.items():
            variant = VARIANTS[name]
            for seed, curve in by_seed.items():
                run_dir = os.path.join(output_dir, f"{name}_seed{seed}")
                opts = ([variant.config] if variant.config else []) + list(variant.opts) + list(args.opts)
                write_record(records_dir, record_from_run(run_dir, "detection_study", name, seed, variant.description,
                                                          curve, args.loss_edges, opts))
    records = load_records(records_dir)
    report = detection_report(records)
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(os.path.join(output_dir, "results.md"), report + "\n")
    plot_records(records, os.path.join(output_dir, "ap_curves.png"))
    print(report)
    return report


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="detectron2 run folders (default output/<study>)")
    parser.add_argument("--records-dir", default=None, help="committed records (default results/<study>)")
    parser.add_argument("--variants", nargs="+", default=None, help="variants (or arms with --virtual-gpus)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval-period", type=int, default=300, help="iterations (steps) between evaluations")
    parser.add_argument("--reestimate-batches", type=int, default=100,
                        help="training batches for the running_var re-estimation variant")
    parser.add_argument("--loss-edges", nargs="+", type=int, default=list(DEFAULT_LOSS_EDGES),
                        help="iterations bounding the training-loss windows kept in each record")
    parser.add_argument("--virtual-gpus", type=int, default=0,
                        help="the paper's setting: this many micro-batches of 2 images per SGD step")
    parser.add_argument("--steps", type=int, default=400, help="SGD steps with --virtual-gpus")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="official",
                        help="with --virtual-gpus: the authors' solver scaled to --steps (official), or the earlier "
                             "variant (cosine, clipping, jitter 0.4; records in results/paper_setting*)")
    parser.add_argument("--export-unfinished", action="store_true",
                        help="with --virtual-gpus and --report-only: also record runs stopped before their last step "
                             "(marked finished: false; their curve ends at the last evaluation)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time with --virtual-gpus (one thread each)")
    parser.add_argument("--list", action="store_true", help="print the variants and arms, and exit")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the committed records")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.list:
        listing = "\n".join([f"{name}: {v.description}" for name, v in VARIANTS.items()]
                            + [f"--virtual-gpus arm {name}: {a.description}" for name, a in ARMS.items()])
        print(listing)
        return listing
    return _paper_setting(args) if args.virtual_gpus else _demo_setting(args)


if __name__ == "__main__":
    main()
