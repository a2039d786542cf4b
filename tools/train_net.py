#!/usr/bin/env python
"""Train or evaluate a detectron2 model that uses MABN (or any stock norm).

Same conventions as detectron2's tools/train_net.py:
  python tools/train_net.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
      --num-gpus 8 [--resume] [--eval-only MODEL.WEIGHTS path.pth] [KEY VALUE ...]
On a machine without GPUs, --num-gpus N starts N CPU processes that train with gloo.
"""
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import mabn_d2  # noqa: F401  (registers the "MABN" and "BRN" norm strings)
from mabn_d2.data.builtin import register_demo_datasets
from mabn_d2.engine import MABNTrainer, setup_cfg

logger = logging.getLogger("mabn_d2.train_net")


def main(args):
    cfg = setup_cfg(args.config_file, args.opts, args)
    register_demo_datasets(cfg)
    if args.eval_only:
        model = MABNTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = MABNTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = MABNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    logger.info("Command Line Args: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
