"""cfg.MODEL.MABN / cfg.MODEL.BRN: defaults, idempotence, checks and the layer kwargs they give."""
import inspect

import pytest
from detectron2.config import get_cfg

from mabn_d2 import BatchRenorm2d, MABN2d, add_mabn_config
from mabn_d2.config import (
    brn_kwargs_from_cfg,
    float_keys_take_integers,
    long_renorm_warmup_message,
    mabn_kwargs_from_cfg,
    resolve_mabn_warmups,
    validate_mabn_config,
)

MABN_KEYS = ["BUFFER_SIZE", "EMA_DECAY", "WARMUP_ITERS", "RENORM_WARMUP_ITERS", "WARMUP_FRACTION",
             "RENORM_WARMUP_FRACTION", "RENORM_CLIP", "EPS"]
BRN_KEYS = ["EPS", "EMA_UPDATE_RATE", "R_MAX", "D_MAX", "WARMUP_ITERS", "R_MAX_RAMP_ITERS", "D_MAX_RAMP_ITERS"]


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
        BUFFER_SIZE=16, EMA_DECAY=0.98, WARMUP_ITERS=100, RENORM_WARMUP_ITERS=1000, WARMUP_FRACTION=-1.0,
        RENORM_WARMUP_FRACTION=-1.0, RENORM_CLIP=5.0, EPS=1e-5,
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
    path.write_text("MODEL:\n  MABN:\n    BUFFER_SIZE: 4\n    EMA_DECAY: 0.9\n  BRN:\n    R_MAX: 2.0\n")
    cfg = new_cfg()
    cfg.merge_from_file(str(path))
    kwargs = mabn_kwargs_from_cfg(cfg)
    assert (kwargs["buffer_size"], kwargs["ema_decay"], kwargs["eps"]) == (4, 0.9, 1e-5)
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
    ("MABN", "EMA_DECAY", 1.5),
    ("MABN", "EMA_DECAY", 1.0),
    ("MABN", "EMA_DECAY", -0.1),
    ("MABN", "WARMUP_ITERS", -1),
    ("MABN", "RENORM_WARMUP_ITERS", True),
    ("MABN", "WARMUP_FRACTION", 1.5),
    ("MABN", "WARMUP_FRACTION", -0.5),
    ("MABN", "RENORM_WARMUP_FRACTION", float("nan")),
    ("MABN", "RENORM_CLIP", 0.5),
    ("MABN", "EPS", 0.0),
    ("MABN", "EPS", float("nan")),
    ("BRN", "EPS", -1e-5),
    ("BRN", "EMA_UPDATE_RATE", 0.0),
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
    cfg.MODEL.MABN.EMA_DECAY = 1.5
    with pytest.raises(ValueError, match=r"^cfg\.MODEL\.MABN\.EMA_DECAY must be in \[0, 1\), got 1\.5$"):
        validate_mabn_config(cfg)


def test_boundary_values_are_accepted():
    cfg = new_cfg()
    cfg.MODEL.MABN.update(BUFFER_SIZE=1, EMA_DECAY=0.0, WARMUP_ITERS=0, RENORM_WARMUP_ITERS=0, RENORM_CLIP=1)
    cfg.MODEL.BRN.update(EMA_UPDATE_RATE=1.0, R_MAX=1.0, D_MAX=0.0, WARMUP_ITERS=0)
    validate_mabn_config(cfg)
    MABN2d(4, **mabn_kwargs_from_cfg(cfg))
    BatchRenorm2d(4, **brn_kwargs_from_cfg(cfg))


def test_unknown_key_is_named():
    cfg = new_cfg()
    cfg.MODEL.MABN.BUFER_SIZE = 8
    with pytest.raises(ValueError, match="cfg.MODEL.MABN.BUFER_SIZE"):
        validate_mabn_config(cfg)


@pytest.mark.parametrize("max_iter, fractions, expected", [
    (900, (0.02, 0.1), (18, 90)),
    (90000, (0.001, 0.01), (90, 900)),
    (450, (0.0, 1.0), (0, 450)),
    (1000, (0.0333, -1.0), (33, 1000)),  # -1: the absolute key (here the default 1000) applies
    (1000, (-1.0, 0.25), (100, 250)),
])
def test_warmup_fractions_resolve_against_max_iter(max_iter, fractions, expected):
    cfg = new_cfg()
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.MODEL.MABN.WARMUP_FRACTION, cfg.MODEL.MABN.RENORM_WARMUP_FRACTION = fractions
    validate_mabn_config(cfg)
    assert resolve_mabn_warmups(cfg) == expected
    kwargs = mabn_kwargs_from_cfg(cfg)
    assert (kwargs["warmup_iters"], kwargs["renorm_warmup_iters"]) == expected
    assert "warmup_fraction" not in kwargs and "renorm_warmup_fraction" not in kwargs
    layer = MABN2d(4, **kwargs)
    assert (layer.warmup_iters, layer.renorm_warmup_iters) == expected


def test_fractions_merge_from_the_command_line():
    cfg = new_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "3000", "MODEL.MABN.WARMUP_FRACTION", "0.02",
                         "MODEL.MABN.RENORM_WARMUP_FRACTION", "0.1"])
    assert resolve_mabn_warmups(cfg) == (60, 300)


@pytest.mark.parametrize("max_iter, renorm_fraction, warns", [
    (900, -1.0, True),  # the paper's 1000-iteration warm-up is beyond a 900-iteration schedule
    (900, 0.05, False),
    (90000, -1.0, False),  # 1000 of 90k iterations: 1.1%
    (9000, -1.0, True),  # 1000 of 9000: 11%
    (10000, -1.0, False),  # exactly 10% is not more than 10%
    (900, 0.1, False),
    (900, 0.2, True),
])
def test_long_renorm_warmup_message(max_iter, renorm_fraction, warns):
    cfg = new_cfg()
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.MODEL.MABN.WARMUP_FRACTION = 0.02
    cfg.MODEL.MABN.RENORM_WARMUP_FRACTION = renorm_fraction
    message = long_renorm_warmup_message(cfg)
    assert (message is not None) == warns
    if warns:
        assert f"SOLVER.MAX_ITER={max_iter}" in message and "RENORM_WARMUP_FRACTION" in message


def test_warmup_iters_beyond_renorm_warmup_count_for_the_warning():
    cfg = new_cfg()
    cfg.SOLVER.MAX_ITER = 900
    cfg.MODEL.MABN.update(WARMUP_ITERS=500, RENORM_WARMUP_ITERS=10)  # r starts after max(500, 10)
    assert "iteration 500" in long_renorm_warmup_message(cfg)


@pytest.mark.parametrize("section", ["MABN", "BRN"])
def test_an_unknown_key_is_refused_naming_it(tmp_path, section):
    """MOMENTUM is no key of either section (the EMA rates are EMA_DECAY and EMA_UPDATE_RATE)."""
    path = tmp_path / "momentum.yaml"
    path.write_text(f"MODEL:\n  {section}:\n    MOMENTUM: 0.9\n")
    with pytest.raises(KeyError, match=rf"MODEL\.{section}\.MOMENTUM"):
        new_cfg().merge_from_file(str(path))
    cfg = new_cfg()
    cfg.MODEL[section].MOMENTUM = 0.9  # set by hand, past yacs' check: the validation names it
    with pytest.raises(ValueError, match=rf"^cfg\.MODEL\.{section}\.MOMENTUM is not a known key"):
        validate_mabn_config(cfg)


def test_config_keys_derive_from_the_layer_table():
    from mabn_d2.layers.hyperparams import BRN_HYPERPARAMETERS, MABN_HYPERPARAMETERS

    cfg = new_cfg()
    for section, table, layer in (("MABN", MABN_HYPERPARAMETERS, MABN2d), ("BRN", BRN_HYPERPARAMETERS, BatchRenorm2d)):
        assert {p.name for p in table} == set(layer_defaults(layer))
        for parameter in table:
            assert cfg.MODEL[section][parameter.config_key] == parameter.default
            assert layer_defaults(layer)[parameter.name] == parameter.default


# ----------------------------------------------------------------------------- integers for float keys


CPU = "MODEL:\n  DEVICE: cpu\n"


def _setup_cfg(tmp_path, yaml_text, opts):
    from mabn_d2.engine.trainer import setup_cfg

    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    return setup_cfg(str(path), opts)


def test_integer_overrides_of_float_keys_are_those_floats(tmp_path):
    cfg = _setup_cfg(tmp_path, CPU, ["MODEL.MABN.WARMUP_FRACTION", "-1", "MODEL.MABN.RENORM_CLIP", "5",
                                    "MODEL.MABN.RENORM_WARMUP_FRACTION", "0", "MODEL.BRN.R_MAX", "2",
                                    "SOLVER.BASE_LR", "1", "MODEL.MABN.BUFFER_SIZE", "8"])
    expected = {("MABN", "WARMUP_FRACTION"): -1.0, ("MABN", "RENORM_CLIP"): 5.0,
                ("MABN", "RENORM_WARMUP_FRACTION"): 0.0, ("BRN", "R_MAX"): 2.0}
    for (section, key), value in expected.items():
        assert type(cfg.MODEL[section][key]) is float and cfg.MODEL[section][key] == value, key
    assert type(cfg.SOLVER.BASE_LR) is float and cfg.SOLVER.BASE_LR == 1.0
    assert type(cfg.MODEL.MABN.BUFFER_SIZE) is int and cfg.MODEL.MABN.BUFFER_SIZE == 8
    assert resolve_mabn_warmups(cfg) == (100, 0)


def test_integers_for_float_keys_load_from_a_yaml_file(tmp_path):
    cfg = _setup_cfg(tmp_path, "SOLVER:\n  BASE_LR: 1\nMODEL:\n  MABN:\n    EPS: 1\n    WARMUP_FRACTION: 0\n", [])
    assert (cfg.SOLVER.BASE_LR, cfg.MODEL.MABN.EPS, cfg.MODEL.MABN.WARMUP_FRACTION) == (1.0, 1.0, 0.0)
    assert all(type(v) is float for v in (cfg.SOLVER.BASE_LR, cfg.MODEL.MABN.EPS, cfg.MODEL.MABN.WARMUP_FRACTION))


@pytest.mark.parametrize("opts, message", [
    (["MODEL.MABN.WARMUP_FRACTION", "5"], "cfg.MODEL.MABN.WARMUP_FRACTION must be -1 (off) or in [0, 1], got 5.0"),
    (["MODEL.MABN.EPS", "0"], "cfg.MODEL.MABN.EPS must be > 0, got 0.0"),
    (["MODEL.MABN.RENORM_CLIP", "0"], "cfg.MODEL.MABN.RENORM_CLIP must be >= 1, got 0.0"),
])
def test_integers_out_of_range_name_the_key_and_the_rule(tmp_path, opts, message):
    from mabn_d2.engine.preflight import UsageError

    with pytest.raises(UsageError) as error:
        _setup_cfg(tmp_path, CPU, opts)
    assert str(error.value) == message


@pytest.mark.parametrize("key, value, types", [
    ("SOLVER.MAX_ITER", "1.5", "(<class 'int'> vs. <class 'float'>)"),  # a float is not an integer
    ("MODEL.MASK_ON", "1", "(<class 'bool'> vs. <class 'int'>)"),  # nor an integer a boolean
    ("MODEL.MABN.EPS", "small", "(<class 'float'> vs. <class 'str'>)"),
])
def test_other_type_mismatches_are_refused_naming_only_the_key(tmp_path, key, value, types):
    from mabn_d2.engine.preflight import UsageError

    with pytest.raises(UsageError) as error:
        _setup_cfg(tmp_path, CPU, ["MODEL.MABN.RENORM_CLIP", "3.0", key, value])
    message = str(error.value)
    assert message.startswith(f"bad config override: Type mismatch {types}") and message.endswith(f"config key: {key}")
    assert "RENORM_CLIP" not in message, "the other overrides are not echoed"


def test_yacs_type_check_is_strict_again_after_the_merge():
    cfg = new_cfg()
    with pytest.raises(RuntimeError):
        with float_keys_take_integers():
            cfg.merge_from_list(["SOLVER.BASE_LR", "2"])
            raise RuntimeError("leaves the block")
    assert cfg.SOLVER.BASE_LR == 2.0
    with pytest.raises(ValueError, match="Type mismatch"):
        new_cfg().merge_from_list(["SOLVER.BASE_LR", "2"])
