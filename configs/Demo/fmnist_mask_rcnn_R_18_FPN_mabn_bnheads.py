"""LazyConfig equivalent of fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.yaml: the demo's Mask R-CNN R-18 FPN.

MABN in the backbone and FPN, BN in the box and mask heads, under the authors' solver scaled to 450
iterations (LR warm-up 90 from 1/3, LR x 0.1 at 300 and 400, bias LR x 2 without decay, gamma
decayed, no clipping; moving averages from 22, re-normalization from 180). The same model, solver
and datasets as the YAML; tests/test_lazy_config.py builds both and compares them.

  python tools/train_net.py --config-file configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.py \\
      [train.max_iter=100 train.output_dir=out dataloader.train.dataset.names=fmnist_coco_tiny_train ...]

`model` is the detector (overrides read `model.roi_heads.num_classes=10`); the tools build it with
`mabn_d2.engine.lazy.build_lazy_model` (`instantiate`, then `prepare_mabn_model`). The demo datasets
(`fmnist_coco_*`) are built and registered by the tools (`register_lazy_demo_datasets`).
"""
from functools import partial

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from mabn_d2 import MABN2d

# MODEL.MABN's defaults, written out, with the warm-ups of the scaled recipe.
mabn_norm = partial(
    MABN2d, buffer_size=16, ema_decay=0.98, warmup_iters=22, renorm_warmup_iters=180, renorm_clip=5.0, eps=1e-5
)

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

# R-18 (BasicBlock: no stride_in_1x1), trained from scratch: no frozen stage.
bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = mabn_norm
bottom_up.stages.depth = 18
bottom_up.stages.norm = mabn_norm
del bottom_up.stages.stride_in_1x1
bottom_up.freeze_at = 0
model.backbone.out_channels = 128
model.backbone.norm = mabn_norm

rpn = model.proposal_generator
rpn.head.in_channels = 128
rpn.head.num_anchors = 6  # 2 sizes x 3 aspect ratios per level
rpn.anchor_generator.sizes = [[24, 32], [40, 48], [64, 80], [96, 128], [160, 192]]
rpn.batch_size_per_image = 128
rpn.pre_nms_topk = (400, 400)
rpn.post_nms_topk = (200, 100)

heads = model.roi_heads
heads.num_classes = 10
heads.batch_size_per_image = 64
heads.positive_fraction = 0.25
heads.box_head = L(FastRCNNConvFCHead)(
    input_shape=ShapeSpec(channels=128, height=7, width=7), conv_dims=[128] * 4, fc_dims=[512], conv_norm="BN",
)
heads.box_predictor.input_shape = ShapeSpec(channels=512)
heads.box_predictor.test_topk_per_image = 20  # TEST.DETECTIONS_PER_IMAGE
heads.mask_head.input_shape = ShapeSpec(channels=128, width=14, height=14)
heads.mask_head.conv_dims = [128] * 5  # 4 convolutions and the deconvolution
heads.mask_head.conv_norm = "BN"
model.pixel_mean = [30.0, 30.0, 30.0]
model.pixel_std = [70.0, 70.0, 70.0]
del bottom_up, rpn, heads

# Fashion-MNIST canvases (128 px) upscaled to 192, bitmask masks, in the main process.
dataloader.train.dataset.names = "fmnist_coco_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(192,), sample_style="choice", max_size=192),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "fmnist_coco_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(192, 192), sample_style="choice", max_size=192),
]
dataloader.test.num_workers = 0

optimizer.lr = 0.02
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4
optimizer.params.base_lr = 0.02  # bias_lr_factor needs it
optimizer.params.weight_decay_norm = 1e-4  # gamma (and MABN's beta) decayed, as the authors do
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0
# LR x 0.1 at 2/3 and 8/9 of the schedule after a linear warm-up from 1/3 over its first fifth.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[300, 400], num_updates=450),
    warmup_length=90 / 450,
    warmup_factor=1 / 3,
    warmup_method="linear",
)

train.output_dir = "output/demo_mabn_bnheads_lazy"
train.init_checkpoint = ""
train.max_iter = 450
train.device = "cpu"
train.seed = 0
train.eval_period = 0  # evaluation once, after training
train.checkpointer = dict(period=100000)
train.clip_gradients = dict(enabled=False, clip_type="norm", clip_value=10.0, norm_type=2.0)  # no clipping
