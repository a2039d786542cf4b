#!/usr/bin/env python
"""Convert an ImageNet ResNet BatchNorm checkpoint (torchvision .pth, detectron2 or Caffe2 .pkl)
into the layout of a detectron2 ResNet whose norms are MABN, for the *_mabn_finetune configs.

What it approximates: the BN layers become MABN layers with gamma, beta and running_var kept,
the mean set to zero and the warm-up counters reset. MABN's weight-centralized convolutions drop
each filter's response to the local input mean, so the converted network assumes that the
centered convolution output is zero-mean with BN's variance. It is not numerically equal to the
BN network: it is a starting point for fine-tuning, not a drop-in replacement.

The input must be a whole ResNet (R18/34/50/101/152): every stage and block, and BatchNorm
statistics for every norm. A partial file, missing statistics, or a whole detector checkpoint is
refused with one line listing what is wrong (exit status 2), and nothing is written. The source
format is recognised from the keys.

  python tools/convert_pretrained.py --input resnet50-torchvision.pth --output pretrained/R-50-torchvision-mabn.pth
"""
import argparse
import json
import sys
from typing import List, Optional

from mabn_d2.engine.convert_pretrained import ConversionError, convert_checkpoint


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="BN checkpoint: torchvision .pth or detectron2/Caffe2 .pkl")
    parser.add_argument("--output", required=True, help="where to write the MABN checkpoint (.pth)")
    args = parser.parse_args(argv)
    try:
        summary = convert_checkpoint(args.input, args.output)
    except (FileNotFoundError, ConversionError) as error:
        print(f"convert_pretrained: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output cannot be written
        print(f"convert_pretrained: error: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
