#!/usr/bin/env python
"""Speed and saved-for-backward memory of MABN2d against BN, GN, FrozenBN and BatchRenorm2d.

Shapes are those of ResNet-50 FPN Mask R-CNN at 2 images per GPU plus two ROI-head shapes.
MABN2d is timed in its last phase (moving averages + clipped re-normalization), its most
expensive one. Prints a Markdown table of medians and ratios to nn.BatchNorm2d (wall clock on
the CPU, CUDA events with --device cuda).

  python tools/benchmark_layers.py --host-overhead   # host cost of the Triton steps, launches stubbed
"""
import os
import argparse
import statistics
import sys
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.benchmarking import markdown_table
from research.norm_benchmark import DETECTION_SHAPES, NORMS, QUICK_SHAPES, benchmark_shape


def run(shapes, norms: List[str], repeats: int, device: str = "cpu") -> str:
    rows = []
    train_ratios, eval_ratios, saved_ratios = [], [], []
    for shape in shapes:
        result = benchmark_shape(shape, norms, repeats, device)
        bn_train, frozen_eval = result["train"]["BatchNorm2d"], result["eval"]["FrozenBN"]
        for name in norms:
            t, e = result["train"][name], result["eval"][name]
            saved = result["saved"][name] / result["activation_bytes"]
            rows.append([
                "x".join(map(str, shape)), name, f"{t * 1e3:.2f}", f"{t / bn_train:.2f}",
                f"{e * 1e3:.2f}", f"{e / frozen_eval:.2f}", f"{saved:.2f}",
            ])
        train_ratios.append(result["train"]["MABN2d"] / bn_train)
        eval_ratios.append(result["eval"]["MABN2d"] / frozen_eval)
        saved_ratios.append(result["saved"]["MABN2d"] / result["activation_bytes"])
        print(f"done {shape}", file=sys.stderr, flush=True)
    table = markdown_table(
        ["shape", "norm", "train fwd+bwd ms", "vs BN", "eval fwd ms", "vs FrozenBN", "saved for bwd (activations)"],
        rows,
    )
    summary = (
        f"\nMABN2d median over shapes: training step {statistics.median(train_ratios):.2f}x BatchNorm2d, "
        f"eval {statistics.median(eval_ratios):.2f}x FrozenBatchNorm2d, "
        f"saves at most {max(saved_ratios):.2f} activation-sized tensors for backward."
    )
    return table + "\n" + summary


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (smoke test)")
    parser.add_argument("--norms", nargs="+", default=NORMS, choices=NORMS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA times are CUDA-event medians)")
    parser.add_argument("--host-overhead", action="store_true",
                        help="time the Triton steps' host work (launches stubbed) against BatchNorm2d's whole step")
    args = parser.parse_args(argv)
    if args.host_overhead:
        from research.host_overhead import host_overhead_report

        if args.threads:
            torch.set_num_threads(args.threads)
        report = host_overhead_report(args.repeats)
        print(report)
        return report
    for required in ("MABN2d", "BatchNorm2d", "FrozenBN"):
        if required not in args.norms:
            parser.error(f"--norms must include {required} (the ratios are taken against it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else DETECTION_SHAPES
    repeats = 3 if args.quick else args.repeats
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads, CPU"
    print(f"torch {torch.__version__}, {where}", file=sys.stderr)
    report = run(shapes, args.norms, repeats, args.device)
    print(report)
    return report


if __name__ == "__main__":
    main()
