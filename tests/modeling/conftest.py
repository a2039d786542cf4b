import pytest

import mabn_d2  # noqa: F401  (registers the norms and hooks build_model before it is imported below)
from detectron2.modeling import build_model

from .helpers import MABN_CFG, mask_rcnn_cfg


@pytest.fixture(scope="module")
def r50_models():
    mabn = build_model(mask_rcnn_cfg("MABN", MABN_CFG))
    bn = build_model(mask_rcnn_cfg("BN"))
    return mabn, bn
