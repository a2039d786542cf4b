#!/usr/bin/env python
"""Training-step time and activation memory of Mask R-CNN R50-FPN at 2 images/iteration.

One process, interleaved rounds, the same synthetic batch for every model: NORM MABN
(backbone, FPN, 4conv1fc box head, mask head) vs BN vs GN (and BRN, on request) in the same
positions, and the stock fine-tuning layout (FrozenBN backbone, no norm elsewhere). MABN layers
are put past their warm-ups so the steady state is timed. Memory: bytes autograd saves for
backward (the activation memory of a step); on CUDA also the allocator's peak.
"""
import argparse
from typing import List, Optional

import torch

import mabn_d2  # noqa: F401  (registers the "MABN" and "BRN" norm strings)
from mabn_d2.research.benchmarking import markdown_table
from mabn_d2.research.maskrcnn_benchmark import VARIANTS, measure_training_steps

DEFAULT_VARIANTS = ["MABN", "BN", "GN", "FrozenBN backbone"]


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:N] (default: cuda when available; CUDA times are CUDA-event medians)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    args = parser.parse_args(argv)
    if "BN" not in args.variants:
        parser.error("--variants must include BN (ratios are taken against it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = measure_training_steps(args.variants, args.height, args.width, args.repeats, args.device)
    times = {name: r["seconds"] for name, r in results.items()}
    saved = {name: r["saved_bytes"] for name, r in results.items()}
    peaks = {name: r["peak_bytes"] for name, r in results.items() if "peak_bytes" in r}
    rows = []
    for name in args.variants:
        row = [name, f"{times[name]:.3f}", f"{times[name] / times['BN']:.2f}",
               f"{saved[name] / 2**20:.0f}", f"{saved[name] / saved['BN']:.2f}"]
        if peaks:
            row += [f"{peaks[name] / 2**20:.0f}", f"{peaks[name] / peaks['BN']:.2f}"]
        rows.append(row)
    header = ["norm", "step s", "vs BN", "saved for bwd MiB", "vs BN"] + (["peak MiB", "vs BN"] if peaks else [])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = (
        f"Mask R-CNN R50-FPN, 2 images of {args.height}x{args.width}, {where}, torch {torch.__version__}, "
        f"median of {args.repeats} steps\n\n" + markdown_table(header, rows)
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
