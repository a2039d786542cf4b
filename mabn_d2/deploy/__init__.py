"""Deployment: fold a trained MABN model into frozen affine layers, verify it and export it.

- `fold`: MABN (and its centered convolutions) to FrozenBatchNorm2d or into the convolutions;
- `pipeline.fold_checkpoint`: the whole job behind tools/fold_mabn.py, built from
  `strict_load` (checkpoint must match the config), `frozen_config` (a config stock detectron2
  builds), `verify` (prediction differences against tolerances), `export_formats` (TorchScript,
  ONNX) and `output_dir` (all files appear at once or not at all).
"""
from .errors import ExportError
from .fold import FoldReport, fold_mabn

__all__ = ["ExportError", "FoldReport", "fold_mabn"]
