"""LazyConfig equivalent of mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml.

Every norm is `mabn_norm`, a callable building MABN2d with its hyper-parameters written out
(the YAML's MODEL.MABN). `model` is the detector, as in detectron2's LazyConfigs, so overrides
read `model.roi_heads.num_classes=10`. tools/train_net.py and tools/fold_mabn.py build it with
`mabn_d2.engine.lazy.build_lazy_model`: `instantiate(model)`, then `prepare_mabn_model` on it
(centralized convolutions, frozen stages, per-level shared heads), as `build_model` does for
YAML configs; a script of your own does the same.
"""
from functools import partial

from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from mabn_d2 import MABN2d

# The paper's hyper-parameters.
mabn_norm = partial(
    MABN2d, buffer_size=16, ema_decay=0.98, warmup_iters=100, renorm_warmup_iters=1000, renorm_clip=5.0, eps=1e-5
)

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

model.backbone.bottom_up.stem.norm = mabn_norm
model.backbone.bottom_up.stages.norm = mabn_norm
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.backbone.bottom_up.freeze_at = 0
model.backbone.norm = mabn_norm
model.roi_heads.box_head = L(FastRCNNConvFCHead)(
    input_shape=model.roi_heads.box_head.input_shape,
    conv_dims=[256, 256, 256, 256],
    fc_dims=[1024],
    conv_norm=mabn_norm,
)
model.roi_heads.mask_head.conv_norm = mabn_norm
model.pixel_std = [57.375, 57.120, 58.395]

train.init_checkpoint = ""
train.max_iter = 180000  # 2x at 16 images per iteration
dataloader.train.total_batch_size = 16
# The authors' solver, as the YAML's (docs/algorithm.md, "The training recipe"): bias LR x 2 with no
# weight decay, every other parameter (norm gamma included) weight decay 1e-4, no clipping.
optimizer.lr = 0.02
optimizer.momentum = 0.9
optimizer.weight_decay = 1e-4
optimizer.params.base_lr = 0.02
optimizer.params.weight_decay_norm = 1e-4
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[120000, 160000], num_updates=180000),
    warmup_length=500 / 180000,
    warmup_factor=1.0 / 3,
    warmup_method="linear",
)
