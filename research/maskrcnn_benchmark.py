"""Mask R-CNN R50-FPN training-step measurement at 2 images per iteration, per norm.

The same synthetic batch for every model; the norm in the backbone, FPN, 4conv1fc box head
and mask head (or the stock fine-tuning layout: FrozenBN backbone, no norm elsewhere). MABN
layers are put past their warm-ups so the steady state is measured.
"""
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.config import get_cfg
from detectron2.model_zoo import get_config_file
from mabn_d2.modeling.registry import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from .benchmarking import interleaved_medians, saved_tensor_bytes, synchronize
from mabn_d2.config import add_mabn_config
from mabn_d2.deploy.fold import fold_mabn
from mabn_d2.layers import MABN2d

__all__ = [
    "VARIANTS", "build_variant", "prime_steady_state", "give_frozen_backbone_real_statistics",
    "synthetic_batch", "training_step", "measure_training_steps",
]

VARIANTS = {
    "MABN": dict(RESNETS="MABN", FPN="MABN", HEADS="MABN"),
    "BN": dict(RESNETS="BN", FPN="BN", HEADS="BN"),
    "GN": dict(RESNETS="GN", FPN="GN", HEADS="GN"),
    "BRN": dict(RESNETS="BRN", FPN="BRN", HEADS="BRN"),
    "FrozenBN backbone": dict(RESNETS="FrozenBN", FPN="", HEADS=""),
}


def build_variant(norms: Dict[str, str], device: str):
    cfg = get_cfg()
    add_mabn_config(cfg)
    cfg.merge_from_file(get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device), "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.RESNETS.NORM", norms["RESNETS"], "MODEL.FPN.NORM", norms["FPN"],
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_CONV", 4,
        "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "MODEL.ROI_BOX_HEAD.NORM", norms["HEADS"],
        "MODEL.ROI_MASK_HEAD.NORM", norms["HEADS"],
    ])
    model = build_model(cfg)
    model.train()
    return model


def prime_steady_state(model, batch) -> None:
    """Put every MABN layer past its warm-ups with ring buffers and EMA filled from one real step.

    Only setting the counter would average mostly empty ring buffers, shrink chi2 and blow up
    the activations of a deep network; the timed phase must see realistic statistics.
    """
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    if not layers:
        return
    sum(model(batch).values()).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for layer in layers:
            slot = layer.iteration % layer.buffer_size
            for buffer in (layer.x2_buffer, layer.gz_buffer):
                buffer.copy_(buffer[slot].expand_as(buffer))
            layer.running_var.copy_(layer.x2_buffer[0])
            layer._iteration = 2 * max(layer.renorm_warmup_iters, layer.warmup_iters)
            layer.num_batches_tracked.fill_(layer._iteration)


def give_frozen_backbone_real_statistics(model, batch, device: str) -> None:
    """A random-init FrozenBN backbone does not normalize at all and diverges within steps;
    give it the statistics of a primed MABN backbone (folded), as a fine-tuned model would have."""
    donor = build_variant(VARIANTS["MABN"], device)
    prime_steady_state(donor, batch)
    folded, _ = fold_mabn(donor.eval(), "frozen")
    model.backbone.bottom_up.load_state_dict(folded.backbone.bottom_up.state_dict())


def synthetic_batch(height: int, width: int, device: str, images: int = 2, objects: int = 5) -> List[Dict]:
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(images):
        xy = torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        wh = 32 + torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.3, height * 0.3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(objects, height, width, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 80, (objects,), generator=generator)
        instances.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        batch.append({"image": image.to(device), "instances": instances.to(device), "height": height, "width": width})
    return batch


def training_step(model, batch, optimizer) -> Callable[[], None]:
    def step() -> None:
        losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def measure_training_steps(
    variants: Sequence[str], height: int, width: int, repeats: int, device: str
) -> Dict[str, Dict[str, float]]:
    """{variant: {"seconds": median step time, "saved_bytes": saved for backward, "peak_bytes": CUDA only}}."""
    device = torch.device(device)
    torch.manual_seed(0)
    batch = synthetic_batch(height, width, str(device))
    models = {name: build_variant(VARIANTS[name], str(device)) for name in variants}
    steps = {
        name: training_step(model, batch, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9))
        for name, model in models.items()
    }
    results: Dict[str, Dict[str, float]] = {name: {} for name in variants}
    with EventStorage(0):
        for model in models.values():
            prime_steady_state(model, batch)
        if "FrozenBN backbone" in models:
            give_frozen_backbone_real_statistics(models["FrozenBN backbone"], batch, str(device))
        times = interleaved_medians(steps, repeats, warmup=1, device=device)
        for name, model in models.items():
            results[name]["seconds"] = times[name]
            results[name]["saved_bytes"] = saved_tensor_bytes(lambda m=model: sum(m(batch).values()))
        if device.type == "cuda":
            for name, step in steps.items():
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                synchronize(device)
                results[name]["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return results
