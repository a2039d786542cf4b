"""What folding needs from a config, for a YAML config (CfgNode) and a LazyConfig (DictConfig).

`fold_checkpoint` builds the MABN model and loads the checkpoint, writes the folded model's config
for stock detectron2 and builds a model from it to check the folded weights fit, and reads
verification images. Each step reads the config; `config_form` gives the form that does them:

- YAML: `build_model`; `frozen_config` (NORM "MABN" -> "FrozenBN", MODEL.WEIGHTS), dumped as YAML;
  images through detectron2's test loader for DATASETS.TEST[0];
- LazyConfig: `build_lazy_model`; every norm that builds MABN2d (a name, a partial, the class) ->
  "FrozenBN", train.init_checkpoint, saved with `LazyConfig.save` (a YAML file stock
  `LazyConfig.load` reads); the model `instantiate` builds from it; images through
  dataloader.test, or dataloader.test.mapper's augmentations for --images.
"""
import copy
import os
import tempfile
from itertools import islice
from typing import List, Optional, Sequence, Union

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..engine.lazy import build_lazy_model, moving_average_norm_keys
from ..utils.errors import first_line
from ..layers import MABN2d
from ..modeling.prepare import prepare_mabn_model
from ..modeling.registry import build_model
from .errors import ExportError
from .fold import FoldReport
from .frozen_config import frozen_config
from .strict_load import build_and_load, check_finite, load_checkpoint_strict
from .verify import verification_inputs

__all__ = ["LazyForm", "YamlForm", "config_form"]


class YamlForm:
    """The fold steps for a YAML config."""

    def __init__(self, cfg: CfgNode, device: str):
        self.cfg = cfg
        self.build_cfg = cfg.clone()
        self.build_cfg.defrost()
        self.build_cfg.MODEL.DEVICE = device
        self.device = device
        self.folded: Optional[CfgNode] = None

    def build_and_load(self, weights: str, config_name: str) -> nn.Module:
        return build_and_load(self.build_cfg, weights, config_name)

    def folded_config(self, report: FoldReport, weights: str) -> str:
        self.folded = frozen_config(self.cfg, report, weights=weights)
        return self.folded.dump()

    def build_folded(self) -> nn.Module:
        stock = self.folded.clone()
        stock.MODEL.DEVICE = self.device
        return build_model(stock)

    def inputs(self, num_images: int, images: Sequence[str]) -> List[dict]:
        return verification_inputs(self.build_cfg, num_images, images)


class LazyForm:
    """The fold steps for a LazyConfig."""

    def __init__(self, cfg: DictConfig, device: str):
        self.cfg = cfg
        self.device = device
        self.folded: Optional[DictConfig] = None

    def build_and_load(self, weights: str, config_name: str) -> nn.Module:
        try:
            model = build_lazy_model(self.cfg, device=self.device)
        except Exception as error:  # the config's own arguments
            raise ExportError(f"cannot build the model of {config_name}: {type(error).__name__}: "
                              f"{first_line(error)}") from error
        if not any(isinstance(m, MABN2d) for m in model.modules()):
            raise ExportError(f"{config_name} builds no MABN layer: there is nothing to fold")
        load_checkpoint_strict(model, weights, config_name)
        check_finite(model, f"checkpoint {weights}")
        return model.eval()

    def folded_config(self, report: FoldReport, weights: str) -> str:
        folded = copy.deepcopy(self.cfg)
        if getattr(folded.model.get("_target_"), "__wrapped__", folded.model.get("_target_")) is prepare_mabn_model:
            folded.model = folded.model.model  # an older layout: the detector inside the MABN pass
        per_level = bool(report and report.per_level_norms)
        for key, cls in moving_average_norm_keys(folded):
            if cls is not MABN2d:
                raise ExportError(f"config uses norms stock detectron2 does not know ({key}={cls.__name__}); "
                                  "only MABN is folded")
            OmegaConf.update(folded, key, "BN" if per_level and self._in_retinanet_head(folded, key) else "FrozenBN",
                             merge=False)
        if "train" in folded:
            folded.train.init_checkpoint = weights
        text = _saved_text(folded)
        self.folded = folded
        return text

    @staticmethod
    def _in_retinanet_head(cfg: DictConfig, key: str) -> bool:
        parent = OmegaConf.select(cfg, key.rsplit(".", 1)[0]) if "." in key else None
        target = parent.get("_target_") if isinstance(parent, DictConfig) else None
        return isinstance(target, type) and issubclass(target, RetinaNetHead)

    def build_folded(self) -> nn.Module:
        return instantiate(self.folded.model).to(self.device)

    def inputs(self, num_images: int, images: Sequence[str]) -> List[dict]:
        test = OmegaConf.select(self.cfg, "dataloader.test", default=None)
        if test is None:
            raise ExportError("cannot verify: the config has no dataloader.test (give --images)")
        if images:
            return _image_inputs(instantiate(test.mapper), images, num_images)
        try:
            loader = instantiate(test)
        except KeyError as error:  # a dataset detectron2 does not know
            raise ExportError(f"cannot verify on dataloader.test: {first_line(error)}") from error
        return [batch[0] for batch in islice(loader, num_images)]


def _saved_text(cfg: DictConfig) -> str:
    """The YAML `LazyConfig.save` writes for `cfg`; ExportError unless stock detectron2 loads it without mabn_d2."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "config.yaml")
        LazyConfig.save(cfg, path)
        if os.path.exists(path + ".pkl"):
            raise ExportError("the folded config holds objects that do not save as YAML; see the log above")
        text = open(path).read()
    mention = next((line.strip() for line in text.splitlines() if "mabn_d2" in line), None)
    if mention:
        raise ExportError(f"the folded config still needs mabn_d2 ({mention}); only MABN norms are replaced")
    return text


def _image_inputs(mapper, image_paths: Sequence[str], num_images: int) -> List[dict]:
    """Model inputs from image files, through the test mapper's format and augmentations."""
    inputs = []
    for path in list(image_paths)[:num_images] if num_images > 0 else image_paths:
        if not os.path.isfile(path):
            raise ExportError(f"image not found: {path}")
        original = detection_utils.read_image(path, format=mapper.image_format)
        augmented = T.AugInput(original)
        mapper.augmentations(augmented)
        tensor = torch.as_tensor(augmented.image.astype("float32").transpose(2, 0, 1))
        inputs.append({"image": tensor, "height": original.shape[0], "width": original.shape[1]})
    return inputs


def config_form(cfg: Union[CfgNode, DictConfig], device: str) -> Union[YamlForm, LazyForm]:
    """The fold steps for `cfg`, on `device`."""
    return LazyForm(cfg, device) if isinstance(cfg, DictConfig) else YamlForm(cfg, device)
