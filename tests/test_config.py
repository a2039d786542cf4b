"""cfg.MODEL.MABN / cfg.MODEL.BRN: defaults, idempotence, checks and the layer kwargs they give."""
import inspect

import pytest
from detectron2.config import get_cfg

from mabn_d2 import BatchRenorm2d, MABN2d, add_mabn_config
from mabn_d2.config import brn_kwargs_from_cfg, mabn_kwargs_from_cfg, validate_mabn_config

MABN_KEYS = ["BUFFER_SIZE", "MOMENTUM", "WARMUP_ITERS", "RENORM_WARMUP_ITERS", "RENORM_CLIP", "EPS"]
BRN_KEYS = ["EPS", "MOMENTUM", "R_MAX", "D_MAX", "WARMUP_ITERS", "R_MAX_RAMP_ITERS", "D_MAX_RAMP_ITERS"]


def layer_defaults(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, num_features
    return {p.name: p.default for p in params}


def new_cfg():
    cfg = get_cfg()
    add_mabn_config(cfg)
    return cfg


def test_defaults_are_the_paper_values_and_match_the_layers():
    cfg = new_cfg()
    assert dict(cfg.MODEL.MABN) == dict(
        BUFFER_SIZE=16, MOMENTUM=0.98, WARMUP_ITERS=100, RENORM_WARMUP_ITERS=1000, RENORM_CLIP=5.0, EPS=1e-5
    )
    assert sorted(cfg.MODEL.BRN) == sorted(BRN_KEYS)
    assert mabn_kwargs_from_cfg(cfg) == layer_defaults(MABN2d)
    assert brn_kwargs_from_cfg(cfg) == layer_defaults(BatchRenorm2d)
    validate_mabn_config(cfg)


def test_add_mabn_config_is_idempotent_and_keeps_user_values():
    cfg = new_cfg()
    cfg.MODEL.MABN.BUFFER_SIZE = 8
    del cfg.MODEL.BRN["D_MAX"]
    add_mabn_config(cfg)
    add_mabn_config(cfg)
    assert cfg.MODEL.MABN.BUFFER_SIZE == 8
    assert cfg.MODEL.BRN.D_MAX == 5.0  # a missing key is filled in
    assert sorted(cfg.MODEL.MABN) == sorted(MABN_KEYS)


def test_keys_merge_from_yaml(tmp_path):
    path = tmp_path / "mabn.yaml"
    path.write_text("MODEL:\n  MABN:\n    BUFFER_SIZE: 4\n    MOMENTUM: 0.9\n  BRN:\n    R_MAX: 2.0\n")
    cfg = new_cfg()
    cfg.merge_from_file(str(path))
    kwargs = mabn_kwargs_from_cfg(cfg)
    assert (kwargs["buffer_size"], kwargs["momentum"], kwargs["eps"]) == (4, 0.9, 1e-5)
    assert brn_kwargs_from_cfg(cfg)["r_max"] == 2.0
    layer = MABN2d(8, **kwargs)
    assert layer.buffer_size == 4 and layer.x2_buffer.shape == (4, 8)


def test_kwargs_without_sections_are_the_layer_defaults():
    cfg = get_cfg()
    assert "MABN" not in cfg.MODEL
    validate_mabn_config(cfg)  # nothing to check, not an error
    assert mabn_kwargs_from_cfg(cfg) == layer_defaults(MABN2d)
    assert brn_kwargs_from_cfg(cfg) == layer_defaults(BatchRenorm2d)


BAD_VALUES = [
    ("MABN", "BUFFER_SIZE", 0),
    ("MABN", "BUFFER_SIZE", 2.5),
    ("MABN", "MOMENTUM", 1.5),
    ("MABN", "MOMENTUM", 1.0),
    ("MABN", "MOMENTUM", -0.1),
    ("MABN", "WARMUP_ITERS", -1),
    ("MABN", "RENORM_WARMUP_ITERS", True),
    ("MABN", "RENORM_CLIP", 0.5),
    ("MABN", "EPS", 0.0),
    ("MABN", "EPS", float("nan")),
    ("BRN", "EPS", -1e-5),
    ("BRN", "MOMENTUM", 0.0),
    ("BRN", "R_MAX", 0.5),
    ("BRN", "D_MAX", -1.0),
    ("BRN", "WARMUP_ITERS", -5),
    ("BRN", "R_MAX_RAMP_ITERS", 1.5),
    ("BRN", "D_MAX_RAMP_ITERS", "many"),
]


@pytest.mark.parametrize("section, key, value", BAD_VALUES)
def test_bad_values_raise_naming_the_key(section, key, value):
    cfg = new_cfg()
    cfg.MODEL[section][key] = value
    with pytest.raises(ValueError) as info:
        validate_mabn_config(cfg)
    message = str(info.value)
    assert message.startswith(f"cfg.MODEL.{section}.{key} ")
    assert f"got {value!r}" in message


def test_message_format():
    cfg = new_cfg()
    cfg.MODEL.MABN.MOMENTUM = 1.5
    with pytest.raises(ValueError, match=r"^cfg\.MODEL\.MABN\.MOMENTUM must be in \[0, 1\), got 1\.5$"):
        validate_mabn_config(cfg)


def test_boundary_values_are_accepted():
    cfg = new_cfg()
    cfg.MODEL.MABN.update(BUFFER_SIZE=1, MOMENTUM=0.0, WARMUP_ITERS=0, RENORM_WARMUP_ITERS=0, RENORM_CLIP=1)
    cfg.MODEL.BRN.update(MOMENTUM=1.0, R_MAX=1.0, D_MAX=0.0, WARMUP_ITERS=0)
    validate_mabn_config(cfg)
    MABN2d(4, **mabn_kwargs_from_cfg(cfg))
    BatchRenorm2d(4, **brn_kwargs_from_cfg(cfg))


def test_unknown_key_is_named():
    cfg = new_cfg()
    cfg.MODEL.MABN.BUFER_SIZE = 8
    with pytest.raises(ValueError, match="cfg.MODEL.MABN.BUFER_SIZE"):
        validate_mabn_config(cfg)
