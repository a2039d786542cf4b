#!/usr/bin/env python
"""Plot BN's four batch statistics during training at normalization batch 2 vs 32 (the paper's figure).

    python tools/plot_batch_stats.py --output-dir output/batch_stats [--with-mabn]

Trains the small-batch study's ResNet on Fashion-MNIST once per norm, records mu_B, sigma2_B
(forward) and g_B, Psi_B (backward) of the chosen layers at every norm forward, draws one
column per norm, and prints each statistic's fluctuation around its moving average
(research.batch_stats.relative_fluctuation, and absolute_fluctuation as a ratio to BN(32): g_B and
Psi_B hover around zero, where only the absolute value tells noise levels apart) over the
second half of training, where the weights drift less. The moving average spans `--window`
norm forwards: one SGD step of micro-batches at normalization batch 2, but 16 SGD steps at
batch 32, so at 32 it also absorbs weight drift.
"""
import os
import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from mabn_d2.utils.atomic_io import atomic_write, atomic_write_json
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.batch_stats import BATCH_STATISTICS, absolute_fluctuation, plot_batch_statistics, relative_fluctuation
from research.small_batch_study import NORMS, StudyConfig, norm_label, record_batch_statistics

DEFAULT_LAYER = "stages.0.0.conv1.norm"  # first conv of the first block, like the paper's layer1.0.bn1


def second_half_fluctuation(series: torch.Tensor, window: int) -> dict:
    """Relative and absolute fluctuation over the second half of the records (at least one window)."""
    start = min(series.shape[0] // 2, max(0, series.shape[0] - window))
    tail = series[start:]
    return {"relative": relative_fluctuation(tail, window), "absolute": absolute_fluctuation(tail, window)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/batch_stats")
    parser.add_argument("--quick", action="store_true", help="30 iterations on 2k training images")
    parser.add_argument("--iters", type=int, default=None, help="SGD iterations per norm (default 500; quick 30)")
    parser.add_argument("--norms", default="bn2,bn32", help=f"comma-separated, from {','.join(NORMS)}")
    parser.add_argument("--with-mabn", action="store_true", help="add MABN(2) as a third column")
    parser.add_argument("--layers", default=DEFAULT_LAYER, help="comma-separated norm-layer names to record")
    parser.add_argument("--channel", type=int, default=0, help="channel drawn in the plot")
    parser.add_argument("--window", type=int, default=16, help="moving-average window (norm forwards)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribe a busy 2-core CPU)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    iters = args.iters or (30 if args.quick else 500)
    config = StudyConfig(iters=iters, warmup_iters=min(200, iters // 10), train_images=2048 if args.quick else None)
    if args.lr is not None:
        config = dataclasses.replace(config, lr=args.lr)
    norms = [n for n in args.norms.split(",") if n] + (["mabn2"] if args.with_mabn else [])
    layers = [name for name in args.layers.split(",") if name]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    recorded, fluctuation = {}, {}
    for norm in norms:
        images, stats = record_batch_statistics(norm, config, iters, layers, seed=args.seed)
        label = norm_label(norm, config)
        recorded[norm] = {"label": label, "images": images, "layers": stats}
        fluctuation[label] = {
            layer: {stat: second_half_fluctuation(stats[layer][stat], args.window) for stat in BATCH_STATISTICS}
            for layer in layers
        }
    atomic_write(str(output_dir / "batch_stats.pt"), lambda f: torch.save(recorded, f))
    atomic_write_json(str(output_dir / "fluctuation.json"), fluctuation)
    for layer in layers:
        runs = {recorded[n]["label"]: (recorded[n]["images"], recorded[n]["layers"][layer]) for n in norms}
        path = output_dir / f"batch_stats_{layer.replace('.', '_')}.png"
        plot_batch_statistics(runs, path, channel=args.channel, window=args.window,
                              title=f"{layer}, channel {args.channel}, {iters} SGD iterations of batch 32")
        print(f"wrote {path}")

    reference = norm_label("bn32", config) if "bn32" in norms else next(iter(fluctuation))
    print(f"fluctuation around the SMA over {args.window} norm forwards, second half of training, all channels")
    for kind, title in (("relative", "relative: mean |s - SMA| / mean |SMA|"),
                        ("absolute", f"absolute mean |s - SMA|, divided by {reference}'s")):
        print(title)
        print(f"{'norm':>10} {'layer':>24} " + " ".join(f"{s:>9}" for s in BATCH_STATISTICS))
        for label, per_layer in fluctuation.items():
            for layer, values in per_layer.items():
                row = [values[s][kind] / (fluctuation[reference][layer][s][kind] if kind == "absolute" else 1.0)
                       for s in BATCH_STATISTICS]
                print(f"{label:>10} {layer:>24} " + " ".join(f"{v:9.3f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
