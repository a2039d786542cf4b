"""The folded model's config: the NORM names of the table that fold (`NormSpec.fold`: MABN -> FrozenBN)
become their stock norm, mabn_d2-only keys are dropped, so stock detectron2 builds it."""
import logging
from typing import List, Optional

from detectron2.config import CfgNode, get_cfg

from ..engine.preflight import norm_items
from ..norms import STOCK_NORMS, folded_norm_names
from .errors import ExportError
from .fold import FoldReport

logger = logging.getLogger(__name__)


def mabn_norm_keys(cfg: CfgNode) -> List[str]:
    """Dotted names of the NORM keys set to a norm that folds, "MABN" and any other table norm
    with a fold rule (e.g. "MODEL.RESNETS.NORM")."""
    folded = folded_norm_names()
    return [key for key, value in norm_items(cfg) if isinstance(value, str) and value in folded]


def frozen_config(cfg: CfgNode, report: Optional[FoldReport] = None, weights: str = "") -> CfgNode:
    """`cfg` for the frozen folded model, in a form stock detectron2's get_cfg() accepts.

    Every NORM "MABN" becomes "FrozenBN" (a table norm: its `NormSpec.fold`). The RetinaNet
    head norm becomes "BN" instead when the fold kept per-level statistics
    (`report.per_level_norms`): stock RetinaNetHead builds CycleBatchNormList for "BN", the only stock layout with one statistic set per level (in
    eval mode it is the same frozen per-level affine). Keys stock detectron2 does not define
    (cfg.MODEL.MABN, cfg.MODEL.BRN, ...) are removed; MODEL.WEIGHTS is set to `weights`.
    """
    folded = cfg.clone()
    folded.defrost()
    per_level = bool(report and report.per_level_norms)
    stock_norm = folded_norm_names()
    for key, norm in list(norm_items(folded)):
        if isinstance(norm, str) and norm in stock_norm:
            value = "BN" if per_level and key == "MODEL.RETINANET.NORM" else stock_norm[norm]
            _set_key(folded, key, value)
    unknown = _remove_unknown_keys(folded, get_cfg())
    if unknown:
        logger.info("Removed keys stock detectron2 does not define: %s", ", ".join(unknown))
    odd = [f"{key}={value!r}" for key, value in norm_items(folded) if value not in STOCK_NORMS]
    if odd:
        raise ExportError(
            f"config uses norms stock detectron2 does not know ({', '.join(odd)}); only "
            f"{', '.join(sorted(stock_norm))} fold"
        )
    folded.MODEL.WEIGHTS = weights
    return folded


def _set_key(cfg: CfgNode, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


def _remove_unknown_keys(node: CfgNode, stock: CfgNode, prefix: str = "") -> List[str]:
    removed = []
    for key in list(node.keys()):
        if key not in stock:
            del node[key]
            removed.append(prefix + key)
        elif isinstance(node[key], CfgNode) and isinstance(stock[key], CfgNode):
            removed += _remove_unknown_keys(node[key], stock[key], f"{prefix}{key}.")
    return removed
