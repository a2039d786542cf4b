"""LazyConfig equivalent of mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml.

MABN hyper-parameters other than the paper defaults go through
`mabn_d2.mabn_build_context(**kwargs)` around `instantiate(cfg.model)`.
"""
import mabn_d2  # noqa: F401  (registers the "MABN" norm string)
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

_base = get_config("common/models/mask_rcnn_fpn.py")
model = _base.model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

model.backbone.bottom_up.stem.norm = "MABN"
model.backbone.bottom_up.stages.norm = "MABN"
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.backbone.bottom_up.freeze_at = 0
model.backbone.norm = "MABN"
model.roi_heads.box_head = L(FastRCNNConvFCHead)(
    input_shape=model.roi_heads.box_head.input_shape,
    conv_dims=[256, 256, 256, 256],
    fc_dims=[1024],
    conv_norm="MABN",
)
model.roi_heads.mask_head.conv_norm = "MABN"
model.pixel_std = [57.375, 57.120, 58.395]

train.init_checkpoint = ""
train.max_iter = 180000  # 2x at 16 images per iteration
dataloader.train.total_batch_size = 16
optimizer.lr = 0.02
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[120000, 160000], num_updates=180000),
    warmup_length=1000 / 180000,
    warmup_factor=0.001,
)
