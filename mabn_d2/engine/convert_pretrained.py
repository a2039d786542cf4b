"""Turn an ImageNet ResNet checkpoint with BatchNorm into MABN's detectron2 layout.

What the conversion approximates: MABN's convolutions are weight-centralized, which removes
each filter's response to the local mean of its input, and MABN normalizes by the second
moment without subtracting a mean. The converted layer assumes that the centered
convolution's output is zero-mean with the variance BN measured, i.e. it keeps gamma, beta and
running_var, sets the mean to zero and restarts MABN's counters (warm-ups run again). The
converted network is therefore not numerically equal to the BN network; it is a starting
point for fine-tuning, as in the paper's fine-tuning experiments.

The input must be a whole ResNet: every stage, every block, and BatchNorm statistics for
every norm (Caffe2 files store frozen norms as a bare affine; those become running_var 1,
which computes the same affine up to eps, and the summary counts them). Anything else,
a partial file, statistics that are missing, or keys of a whole detector, is refused with a
`ConversionError` that lists what is wrong, before anything is written.
"""
import os
import pickle
import re
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

from ..utils.atomic_io import atomic_write
from .checkpoint import CONVERTED_AUTHOR, CONVERTED_PREFIX, describe_unreadable

__all__ = [
    "ConversionError",
    "RESNET_DEPTHS",
    "bn_to_mabn",
    "check_resnet_layout",
    "check_values",
    "convert_checkpoint",
    "load_checkpoint_state",
    "torchvision_to_detectron2_names",
]

BACKBONE_PREFIX = CONVERTED_PREFIX  # where a detectron2 FPN model keeps its ResNet
STAGES = ("res2", "res3", "res4", "res5")
# (bottleneck blocks?, blocks in res2..res5) -> depth, as detectron2's build_resnet_backbone builds them
RESNET_DEPTHS: Dict[Tuple[bool, Tuple[int, ...]], int] = {
    (False, (2, 2, 2, 2)): 18,
    (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50,
    (True, (3, 4, 23, 3)): 101,
    (True, (3, 8, 36, 3)): 152,
}
STATISTICS = ("running_mean", "running_var")
_CLASSIFIER_PREFIXES = ("fc.", "linear.", "fc1000.")  # torchvision, detectron2, Caffe2 ImageNet heads
_DETECTOR_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.", "sem_seg_head.", "head.")
_SHOWN = 4


class ConversionError(ValueError):
    """The input is not a checkpoint this converter can turn into MABN weights; says why."""


def load_checkpoint_state(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state_dict of tensors, source format) from a .pth/.pt (torch) or .pkl (detectron2/c2) file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or not a checkpoint at all
        raise ConversionError(describe_unreadable(path, error)) from error
    if isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    elif isinstance(data, Mapping) and "blobs" in data:
        data = data["blobs"]
    if not isinstance(data, Mapping) or not data:
        raise ConversionError(f"{path} holds no state_dict (expected a mapping of parameter names to arrays)")
    try:
        state = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in data.items()
                 if not k.endswith("_momentum")}
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{path} holds values that are not arrays ({error})") from error
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return state, "torchvision"
    if any(re.match(r"res\d_\d+_branch", k) for k in keys) or "conv1_w" in state:
        return dict(zip(_c2_to_detectron2_names(keys), state.values())), "caffe2"
    if any(k.startswith(("stem.", "res2.", BACKBONE_PREFIX)) for k in keys):
        return state, "detectron2"
    raise ConversionError(
        f"{path}: unrecognised checkpoint layout (first keys: {keys[:4]}); expected torchvision "
        "ResNet names (conv1, bn1, layer1...) or detectron2 names (stem.conv1, res2.0.conv1...)"
    )


def _c2_to_detectron2_names(keys):
    return [k.replace("backbone.bottom_up.", "") for k in convert_basic_c2_names(keys)]


def torchvision_to_detectron2_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torchvision ResNet keys -> detectron2 ResNet keys (the fc classifier is dropped)."""
    converted = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        new = re.sub(r"^conv1\.", "stem.conv1.", key)
        new = re.sub(r"^bn1\.", "stem.conv1.norm.", new)
        new = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", new)
        new = new.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        converted[new] = value
    return converted


def _torchvision_stage(stage: str) -> str:
    return f"layer{int(stage[3:]) - 1}"


def _some(items: Sequence[str]) -> str:
    items = list(items)
    return ", ".join(items[:_SHOWN]) + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "")


def _blocks_per_stage(keys: Sequence[str]) -> Tuple[int, ...]:
    counts = []
    for stage in STAGES:
        blocks = {int(m.group(1)) for k in keys for m in [re.match(rf"{stage}\.(\d+)\.", k)] if m}
        counts.append(max(blocks) + 1 if blocks else 0)
    return tuple(counts)


def _expected_keys(bottleneck: bool, blocks: Sequence[int]) -> Tuple[List[str], List[str]]:
    """(convolution weights, norm prefixes) of a detectron2 ResNet with these blocks."""
    convs, norms = ["stem.conv1"], []
    for index, (stage, count) in enumerate(zip(STAGES, blocks)):
        for block in range(count):
            names = ["conv1", "conv2", "conv3"] if bottleneck else ["conv1", "conv2"]
            if block == 0 and (bottleneck or index > 0):  # channels or stride change: projection shortcut
                names.append("shortcut")
            convs += [f"{stage}.{block}.{name}" for name in names]
    norms = [f"{conv}.norm" for conv in convs]
    return [f"{conv}.weight" for conv in convs], norms


def check_resnet_layout(state: Mapping[str, torch.Tensor], source: str, path: str = "the checkpoint") -> int:
    """The depth of the ResNet `state` holds (detectron2 names, no prefix), or ConversionError.

    Checks that every stage and block is there, nothing else is, and that every norm has
    BatchNorm statistics (Caffe2's bare affine norms excepted).
    """
    keys = list(state)
    problems = []
    outside = [k for k in keys if not k.startswith(("stem.",) + tuple(f"{s}." for s in STAGES))]
    if outside:
        detector = any(k.startswith(_DETECTOR_PREFIXES) for k in outside)
        problems.append(
            f"{len(outside)} keys are not part of a ResNet ({_some(outside)})"
            + ("; this is a whole detectron2 model, not an ImageNet ResNet: fine-tune it with "
               "MODEL.WEIGHTS directly, or convert the ResNet it was initialized from" if detector else "")
        )
    blocks = _blocks_per_stage(keys)
    missing_stages = [s for s, n in zip(STAGES, blocks) if n == 0]
    if missing_stages:
        problems.append("stages missing: " + ", ".join(f"{s} (torchvision {_torchvision_stage(s)})"
                                                       for s in missing_stages))
        raise ConversionError(f"{path} is not a complete ResNet: {'; '.join(problems)}")
    bottleneck = any(re.match(r"res\d\.\d+\.conv3\.weight$", k) for k in keys)
    depth = RESNET_DEPTHS.get((bottleneck, blocks))
    if depth is None:
        known = "; ".join(f"R{d}: {'bottleneck' if b else 'basic'} {list(n)}" for (b, n), d in RESNET_DEPTHS.items())
        problems.append(f"{'bottleneck' if bottleneck else 'basic'} blocks per stage res2..res5 {list(blocks)} "
                        f"match no ResNet ({known})")
        raise ConversionError(f"{path} is not a complete ResNet: {'; '.join(problems)}")
    weights, norms = _expected_keys(bottleneck, blocks)
    affine = [f"{n}.{p}" for n in norms for p in ("weight", "bias")]
    statistics = [f"{n}.{p}" for n in norms for p in STATISTICS if f"{n}.weight" not in state]
    missing = [k for k in weights + affine + (statistics if source != "caffe2" else []) if k not in state]
    if missing:
        problems.append(f"{len(missing)} keys of R{depth} missing ({_some(missing)})")
    no_statistics = [n for n in norms if f"{n}.weight" in state and any(f"{n}.{s}" not in state for s in STATISTICS)]
    if no_statistics and source != "caffe2":
        problems.append(
            f"{len(no_statistics)} norms without BatchNorm statistics running_mean/running_var "
            f"({_some(no_statistics)}); MABN's running_var is taken from them"
        )
    allowed = set(weights) | set(affine) | {f"{n}.{s}" for n in norms for s in STATISTICS + ("num_batches_tracked",)}
    unexpected = [k for k in keys if k not in allowed and k not in outside]
    if unexpected:
        problems.append(f"{len(unexpected)} keys a detectron2 R{depth} does not have ({_some(unexpected)})")
    if problems:
        raise ConversionError(f"{path} is not a complete ResNet: {'; '.join(problems)}")
    return depth


def _value_problem(key: str, value: torch.Tensor) -> str:
    """Why tensor `key` cannot start MABN training, or "" (integer tensors are counters: not checked)."""
    if not value.is_floating_point():
        return ""
    non_finite = int(torch.count_nonzero(~torch.isfinite(value)))
    if non_finite:
        return f"{key} holds NaN or infinite values ({non_finite} of {value.numel()})"
    if key.endswith("running_var") and bool((value < 0).any()):
        return f"{key} is negative (smallest {float(value.min()):.4g}; a running variance is >= 0)"
    return ""


def check_values(state: Mapping[str, torch.Tensor], path: str = "the checkpoint") -> None:
    """ConversionError naming the tensors that hold NaN or infinity, or a negative running_var.

    MABN keeps running_var and the affine as they are, so such a value would train into NaN
    losses and fold into a model that predicts nothing; it means the file is not a trained ResNet.
    """
    problems = [problem for problem in (_value_problem(k, v) for k, v in state.items()) if problem]
    if problems:
        more = f"; ... ({len(problems)} tensors in all)" if len(problems) > _SHOWN else ""
        raise ConversionError(f"{path} holds values MABN cannot start from: {'; '.join(problems[:_SHOWN])}{more}")


def bn_to_mabn(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], int]:
    """Every BN (weight, bias, running stats) becomes MABN state: zero mean, counters reset."""
    converted = dict(state)
    count = 0
    for key in list(state):
        if not key.endswith(".running_var"):
            continue
        prefix = key[: -len("running_var")]
        converted[prefix + "running_mean"] = torch.zeros_like(state[key])
        converted[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        count += 1
    for key in list(state):  # norms stored as a bare affine (c2 FrozenBN) get unit variance
        if key.endswith(".norm.weight") and key[: -len("weight")] + "running_var" not in state:
            prefix = key[: -len("weight")]
            converted[prefix + "running_var"] = torch.ones_like(state[key])
            converted[prefix + "running_mean"] = torch.zeros_like(state[key])
            converted[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
            count += 1
    return converted, count


def _without_classifier(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    kept = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    return kept, sorted(set(state) - set(kept))


def _without_backbone_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k[len(BACKBONE_PREFIX):] if k.startswith(BACKBONE_PREFIX) else k: v for k, v in state.items()}


def convert_checkpoint(input_path: str, output_path: str) -> Dict[str, object]:
    """Read, check, convert and write atomically a detectron2 checkpoint {"model": ...}. Returns a summary."""
    state, source = load_checkpoint_state(input_path)
    state, dropped = _without_classifier(_without_backbone_prefix(state))
    as_read = state  # the file's names, for messages about values
    if source == "torchvision":
        state = torchvision_to_detectron2_names(state)
    depth = check_resnet_layout(state, source, input_path)
    check_values(as_read, input_path)
    affine_only = sum(1 for k in state if k.endswith(".norm.weight") and k[: -len("weight")] + "running_var" not in state)
    state = {BACKBONE_PREFIX + k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state, norms = bn_to_mabn(state)
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(output_path, lambda f: torch.save(
        {"model": state, "__author__": CONVERTED_AUTHOR, "matching_heuristics": False}, f))
    return {"source_format": source, "depth": depth, "norm_layers": norms, "affine_only_norms": affine_only,
            "dropped_classifier_keys": dropped, "tensors": len(state), "output": output_path}
