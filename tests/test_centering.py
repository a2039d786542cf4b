"""No silent uncentralized MABN: whatever builds the model, MABN trains behind weight-centralized
convolutions, or its first training step refuses with the fix named; `allow_uncentered` opts out."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from detectron2.layers import Conv2d
from torch import nn

import mabn_d2
from mabn_d2 import CenteredConv2d, MABN2d, allow_uncentered, prepare_mabn_model
from mabn_d2.layers import UncenteredInputError, centering_check, centralize_conv_
from mabn_d2.layers.centering_check import ALLOWED, CENTERED, CHECKED

from .conftest import REPO_ROOT

FIX = r"mabn_d2\.prepare_mabn_model\(model\).*mabn_d2\.allow_uncentered\(model\)"

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet18(**kwargs):
    torch.manual_seed(0)
    return torchvision.models.resnet18(norm_layer=MABN2d, num_classes=3, **kwargs)


def train_step(model, x):
    model.train()
    model(x).float().sum().backward()


def mabn_layers(model):
    return [m for m in model.modules() if isinstance(m, MABN2d)]


class OwnBlock(nn.Module):
    """A user's module: the conv feeding MABN is an attribute, not a Sequential neighbour."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = MABN2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


class Untraceable(OwnBlock):
    """Control flow on data: torch.fx cannot trace it, so prepare_mabn_model cannot pair its layers."""

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.norm(self.conv(x))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------- the isort-ordered user script


def test_isort_ordered_script_refuses_its_first_step_then_trains_once_prepared():
    """A fresh interpreter: detectron2's build_model and build_optimizer bound before `import mabn_d2`."""
    program = textwrap.dedent("""
        import torch
        from detectron2.modeling import build_model
        from detectron2.solver import build_optimizer
        from detectron2.utils.events import EventStorage

        import mabn_d2
        from mabn_d2.layers import UncenteredInputError
        from tests.modeling.helpers import detection_batch, small_resnet_cfg

        torch.set_num_threads(1)
        cfg = small_resnet_cfg("MABN", 0)
        cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM = 1e-4, 0.0
        model = build_model(cfg)  # the unhooked original: no MABN pass
        layers = [m for m in model.modules() if isinstance(m, mabn_d2.MABN2d)]
        centered = [m for m in model.modules() if isinstance(m, mabn_d2.CenteredConv2d)]
        print("built", len(layers), "MABN,", len(centered), "centered")
        decay = {id(p): g["weight_decay"] for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
        assert {decay[id(m.weight)] for m in layers} == {0.0}, "stock build_optimizer: MABN gamma decays"
        model.train()
        with EventStorage(0):
            try:
                model(detection_batch(masks=True))
            except UncenteredInputError as error:
                print("refused:", error)
            else:
                raise SystemExit("trained an uncentralized MABN model")
            mabn_d2.prepare_mabn_model(model)
            centered = [m for m in model.modules() if isinstance(m, mabn_d2.CenteredConv2d)]
            assert len(centered) == len(layers), (len(centered), len(layers))
            sum(model(detection_batch(masks=True)).values()).backward()
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]
    assert "built 36 MABN, 0 centered" in done.stdout
    refusal = next(line for line in done.stdout.splitlines() if line.startswith("refused:"))
    assert "mabn_d2.prepare_mabn_model(model)" in refusal and "mabn_d2.build_model(cfg)" in refusal


# ---------------------------------------------------------------- prepare_mabn_model on other models


def test_prepare_centralizes_every_conv_of_a_torchvision_style_model():
    model = resnet18()
    assert len(mabn_layers(model)) == 20
    with pytest.raises(UncenteredInputError, match=FIX):
        train_step(model, torch.randn(2, 3, 32, 32))
    assert all(int(m.num_batches_tracked) == 0 for m in mabn_layers(model))  # refused before any state change
    assert prepare_mabn_model(model) is model
    assert sum(isinstance(m, CenteredConv2d) for m in model.modules()) == 20
    assert {m.input_centering for m in mabn_layers(model)} == {CENTERED}
    assert type(model.conv1) is CenteredConv2d and type(model.layer2[0].downsample[0]) is CenteredConv2d
    train_step(model, torch.randn(2, 3, 32, 32))
    assert all(int(m.num_batches_tracked) == 1 for m in mabn_layers(model))


def test_prepare_pairs_a_users_own_module_by_its_data_flow():
    model = prepare_mabn_model(OwnBlock())
    assert type(model.conv) is CenteredConv2d and model.norm.input_centering == CENTERED
    train_step(model, torch.randn(2, 3, 8, 8))


def test_an_unpairable_layer_is_named_and_refuses_until_its_conv_is_centralized(caplog):
    model = Untraceable()
    with caplog.at_level(logging.WARNING, logger="mabn_d2.modeling.prepare"):
        prepare_mabn_model(model)
    assert "found no convolution feeding 1 MABN layer(s) (norm)" in caplog.text
    assert type(model.conv) is nn.Conv2d and model.norm.input_centering is None
    with pytest.raises(UncenteredInputError, match="raw weight"):
        train_step(model, torch.randn(2, 3, 8, 8))
    centralize_conv_(model.conv)
    train_step(model, torch.randn(2, 3, 8, 8))  # the check reads the centralized weight
    assert model.norm.input_centering == CHECKED


def test_retinanet_style_sequential_and_conv_norm_pairs_are_marked():
    seq = prepare_mabn_model(nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4), nn.ReLU()))
    d2 = prepare_mabn_model(Conv2d(3, 4, 3, norm=MABN2d(4)))
    assert type(seq[0]) is CenteredConv2d and seq[1].input_centering == CENTERED
    assert type(d2) is CenteredConv2d and d2.norm.input_centering == CENTERED


# ---------------------------------------------------------------- the opt-out


def test_allow_uncentered_trains_behind_plain_convs_and_logs_how_many(caplog):
    model = resnet18()
    with caplog.at_level(logging.INFO, logger="mabn_d2.modeling.prepare"):
        assert allow_uncentered(model) is model
        prepare_mabn_model(model)  # opted-out layers keep their plain convolutions
    assert "allow_uncentered: 20 MABN2d layer(s) may train behind convolutions that are not weight-centralized" \
        in caplog.text
    assert "0 of 20 MABN2d layers train behind weight-centralized convolutions; 20 behind plain ones" in caplog.text
    assert not any(isinstance(m, CenteredConv2d) for m in model.modules())
    assert {m.input_centering for m in mabn_layers(model)} == {ALLOWED}
    train_step(model, torch.randn(2, 3, 32, 32))


def test_allow_uncentered_after_the_pass_keeps_centered_layers_centered(caplog):
    model = prepare_mabn_model(nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4), Untraceable()))
    with caplog.at_level(logging.WARNING, logger="mabn_d2.modeling.prepare"):
        allow_uncentered(model)
    assert "allow_uncentered: 1 MABN2d layer(s)" in caplog.text
    assert model[1].input_centering == CENTERED and model[2].norm.input_centering == ALLOWED


def test_one_layer_opts_out_by_its_attribute(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4)).train()
    with caplog.at_level(logging.WARNING, logger="mabn_d2.layers.mabn"):
        model[1].allow_uncentered = True
    assert "MABN2d(4) may train behind a convolution that is not weight-centralized" in caplog.text
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert model[1].allow_uncentered and type(prepare_mabn_model(model)[0]) is nn.Conv2d


# ---------------------------------------------------------------- the check itself


def test_a_standalone_layer_fed_data_trains_and_eval_never_checks():
    layer = MABN2d(4)
    layer(torch.randn(2, 4, 3, 3, requires_grad=True)).sum().backward()
    assert layer.input_centering == CHECKED
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4)).eval()
    plain(torch.randn(2, 3, 5, 5)).sum().backward()  # eval: a frozen affine, nothing to check
    assert plain[1].input_centering is None


def test_the_check_runs_once_and_waits_for_a_step_with_gradients(monkeypatch):
    calls = []
    original = centering_check.input_centering_problem
    monkeypatch.setattr("mabn_d2.layers.mabn.input_centering_problem", lambda x: calls.append(1) or original(x))
    model = nn.Sequential(CenteredConv2d(3, 4, 3), MABN2d(4)).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 5, 5))  # no autograd history to read: not decided yet
    assert calls == [] and model[1].input_centering is None
    for _ in range(3):
        model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert calls == [1] and model[1].input_centering == CHECKED


@pytest.mark.parametrize("autocast", [False, True])
def test_the_check_sees_through_autocast_casts(autocast):
    x = torch.randn(2, 3, 5, 5)
    for conv, refused in ((nn.Conv2d(3, 4, 3), True), (CenteredConv2d(3, 4, 3), False)):
        model = nn.Sequential(conv, MABN2d(4)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if refused:
                with pytest.raises(UncenteredInputError, match="raw weight"):
                    model(x)
            else:
                model(x)


def test_a_frozen_raw_conv_in_front_is_refused_as_unknown():
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    with pytest.raises(UncenteredInputError, match="frozen weight"):
        nn.Sequential(conv, MABN2d(4)).train()(torch.randn(2, 3, 5, 5, requires_grad=True))


def test_public_names():
    assert mabn_d2.allow_uncentered is allow_uncentered and "allow_uncentered" in mabn_d2.__all__
