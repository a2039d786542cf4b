"""Turn an ImageNet ResNet checkpoint with BatchNorm into MABN's detectron2 layout.

What the conversion approximates: MABN's convolutions are weight-centralized, which removes
each filter's response to the local mean of its input, and MABN normalizes by the second
moment without subtracting a mean. The converted layer assumes that the centered
convolution's output is zero-mean with the variance BN measured, i.e. it keeps gamma, beta and
running_var, sets the mean to zero and restarts MABN's counters (warm-ups run again). The
converted network is therefore not numerically equal to the BN network; it is a starting
point for fine-tuning, as in the paper's fine-tuning experiments.
"""
import os
import pickle
import re
from typing import Dict, Mapping, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

from .atomic_io import atomic_write

__all__ = ["load_checkpoint_state", "torchvision_to_detectron2_names", "bn_to_mabn", "convert_checkpoint"]

BACKBONE_PREFIX = "backbone.bottom_up."


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
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    elif isinstance(data, Mapping) and "blobs" in data:
        data = data["blobs"]
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{path} holds no state_dict (expected a mapping of parameter names to arrays)")
    state = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in data.items()
             if not k.endswith("_momentum")}
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return state, "torchvision"
    if any(re.match(r"res\d_\d+_branch", k) for k in keys) or "conv1_w" in state:
        return dict(zip(_c2_to_detectron2_names(keys), state.values())), "caffe2"
    if any(k.startswith(("stem.", "res2.", BACKBONE_PREFIX)) for k in keys):
        return state, "detectron2"
    raise ValueError(
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


def convert_checkpoint(input_path: str, output_path: str) -> Dict[str, object]:
    """Read, convert and write atomically a detectron2 checkpoint {"model": ...}. Returns a summary."""
    state, source = load_checkpoint_state(input_path)
    if source == "torchvision":
        state = torchvision_to_detectron2_names(state)
    state = {k if k.startswith(BACKBONE_PREFIX) else BACKBONE_PREFIX + k: v.float() if v.is_floating_point() else v
             for k, v in state.items()}
    state, norms = bn_to_mabn(state)
    if norms == 0:
        raise ValueError(f"{input_path}: no BatchNorm statistics found to convert")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(output_path, lambda f: torch.save(
        {"model": state, "__author__": "mabn_d2.convert", "matching_heuristics": False}, f))
    return {"source_format": source, "norm_layers": norms, "tensors": len(state), "output": output_path}
