#!/usr/bin/env python
"""Fold a trained MABN model into a checkpoint and config that stock detectron2 loads.

  python tools/fold_mabn.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
      --weights output/model_final.pth --output-dir output/folded [--fuse] [--export torchscript|onnx] \
      [--verify N] [--images a.jpg b.jpg] [--overwrite] [KEY VALUE ...]
  python tools/fold_mabn.py --config-file configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.py \
      --weights output/model_final.pth --output-dir output/folded [key=value ...]   # a LazyConfig

Writes OUTPUT/model_folded.pth and OUTPUT/config_folded.yaml: every NORM "MABN" becomes
"FrozenBN" (the RetinaNet head keeps per-level statistics as "BN" when they differ by level) and
the MABN keys are gone, so `get_cfg()`, `build_model` and `DetectionCheckpointer` load them
without mabn_d2. From a LazyConfig (.py, detectron2's key=value overrides), config_folded.yaml
is that LazyConfig with every MABN norm "FrozenBN" and train.init_checkpoint the folded weights,
which stock `LazyConfig.load` and `instantiate(cfg.model)` load. --fuse also writes
model_fused.pth, whose norms are folded into the convolutions: it matches no config and is what
--export exports. --verify N compares predictions of the original (eval mode) and the folded
model(s) on N images of DATASETS.TEST / dataloader.test (or --images) and fails above the
tolerances in `mabn_d2.deploy.verify.TOLERANCES`. Nothing is written unless every check passes.

OUTPUT ends up holding exactly this run's files: a folder that is not empty is refused unless
--overwrite is given, and then replaced as a whole (only if it holds nothing but fold outputs).
The files are staged in a hidden folder beside OUTPUT, removed on any failure, SIGTERM or
SIGINT. Every error is one line on stderr, exit status 1.
"""
import os
import argparse
import logging
import sys

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

import mabn_d2  # noqa: F401  (registers the "MABN" norm string)
from mabn_d2.config import add_mabn_config, float_keys_take_integers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from demo_datasets.builtin import register_demo_datasets, register_lazy_demo_datasets
from mabn_d2.deploy import ExportError
from mabn_d2.deploy.export_formats import EXPORT_FORMATS
from mabn_d2.deploy.output_dir import check_output_dir
from mabn_d2.deploy.pipeline import fold_checkpoint
from mabn_d2.deploy.verify import TOLERANCES
from mabn_d2.engine.lazy import is_lazy_config, load_lazy_config
from mabn_d2.engine.preflight import UsageError, check_device, first_line

logger = logging.getLogger("mabn_d2.fold_mabn")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="config the checkpoint was trained with")
    parser.add_argument("--weights", required=True, help="checkpoint of the MABN model")
    parser.add_argument("--output-dir", required=True, help="folder for the folded files")
    parser.add_argument("--fuse", action="store_true", help="also fold the norms into the convolutions")
    parser.add_argument("--export", choices=EXPORT_FORMATS, help="also write a TorchScript or ONNX model")
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="compare predictions on N images")
    parser.add_argument("--images", nargs="+", default=[], help="image files for --verify / --export")
    parser.add_argument("--device", default="cpu", help="device to fold, verify and export on")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output-dir that holds an earlier fold's files")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides: KEY VALUE ... (a .py LazyConfig: key=value ...)")
    return parser.parse_args(argv)


def _yaml_config(args: argparse.Namespace):
    """The YAML config with MABN keys and the overrides; ExportError naming the file or the key."""
    cfg = get_cfg()
    add_mabn_config(cfg)
    try:
        with float_keys_take_integers():
            cfg.merge_from_file(args.config_file)
    except Exception as e:  # missing file, bad YAML, unknown keys
        raise ExportError(f"cannot read config {args.config_file} ({first_line(e)})") from e
    try:
        with float_keys_take_integers():
            cfg.merge_from_list(args.opts)
    except Exception as e:  # unknown key, odd number of items
        raise ExportError(f"bad config override: {first_line(e)}") from e  # yacs names the key
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="mabn_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        check_output_dir(args.output_dir, args.overwrite)
        check_device(args.device)
        if is_lazy_config(args.config_file):
            cfg = load_lazy_config(args.config_file, args.opts)  # UsageError naming the file or the key
            if (args.verify > 0 or args.export) and not args.images:
                register_lazy_demo_datasets(cfg)
        else:
            cfg = _yaml_config(args)
            if (args.verify > 0 or args.export) and not args.images:
                register_demo_datasets(cfg)
        result = fold_checkpoint(
            cfg, args.weights, args.output_dir, fuse=args.fuse, export=args.export, verify=args.verify,
            images=args.images, device=args.device, config_name=f"config {args.config_file}",
            overwrite=args.overwrite,
        )
    except (ExportError, UsageError) as e:
        print(f"fold_mabn: error: {e}", file=sys.stderr)
        return 1
    print(result.report.summary())
    if result.report.per_level_norms:
        print("per-level norms kept per level (config_folded.yaml: MODEL.RETINANET.NORM 'BN', eval only): "
              + ", ".join(result.report.per_level_norms))
    for form, diff in result.verified.items():
        print(f"verify {form} vs original: {diff} (tolerances {TOLERANCES})")
    for fmt, how in result.exported.items():
        print(f"export {fmt}: {how}")
    for path in result.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
