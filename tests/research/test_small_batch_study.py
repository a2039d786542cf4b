"""The small-batch study library and its two tools (quick end-to-end runs are marked slow)."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn

from research.ablations import MABNCentered2d, MABNForwardOnly2d
from mabn_d2.layers import BatchRenorm2d, CenteredConv2d, MABN2d
from research.batch_stats import NORM_TYPES
from research.small_batch_study import (
    NORMS, StudyConfig, batch_indices, build_model, lr_at, make_optimizer, norm_label, run_paths, sgd_step,
    train_run,
)

TOOLS = Path(__file__).resolve().parents[2] / "tools"
TINY = StudyConfig(
    iters=6, warmup_iters=2, train_images=64, test_images=40, curve_test_images=40, evals=3, widths=(4, 8),
    blocks_per_stage=1, mabn_buffer_size=2, mabn_warmup_iters=3, mabn_renorm_warmup_iters=40,
)


# One torch thread, as the study runs (the tools also set it; the fixture restores it after).
pytestmark = pytest.mark.usefixtures("one_thread")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


@pytest.mark.parametrize("norm,norm_type,conv_type", [
    ("bn32", nn.BatchNorm2d, Conv2d), ("bn2", nn.BatchNorm2d, Conv2d), ("brn2", BatchRenorm2d, Conv2d),
    ("gn", nn.GroupNorm, Conv2d), ("mabn2", MABN2d, CenteredConv2d),
    ("mabn2_fwd_only", MABNForwardOnly2d, CenteredConv2d), ("mabn2_no_cw", MABNCentered2d, Conv2d),
])
def test_each_norm_builds_its_layers_and_convs(norm, norm_type, conv_type):
    model = build_model(norm, StudyConfig())
    norms = _norm_layers(model)
    assert len(norms) == 1 + 3 * 2 * 2 + 2  # stem, two convs per block, two downsampling shortcuts
    assert all(type(m) is norm_type for m in norms)
    assert all(type(m) is conv_type for m in model.modules() if isinstance(m, nn.Conv2d))
    if norm == "gn":
        assert sorted({m.num_channels // m.num_groups for m in norms}) == [4]
    plain_stem = build_model(norm, StudyConfig(center_stem=False)).stem
    assert type(plain_stem) is Conv2d


def test_micro_batched_norms_see_batch_two_and_mabn_counts_forwards():
    model = build_model("mabn2", TINY)
    seen = []
    for m in _norm_layers(model):
        m.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    optimizer = make_optimizer(model, TINY)
    sgd_step(model, optimizer, torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)), micro_batch=2)
    assert set(seen) == {2}
    assert all(m.iteration == 16 for m in _norm_layers(model))


def test_micro_batching_weights_the_loss_like_one_batch():
    """GroupNorm is batch-independent, so 16 micro-batches must give the same step as one batch of 32."""
    torch.manual_seed(0)
    config = StudyConfig(widths=(4, 8), blocks_per_stage=1)
    whole = build_model("gn", config).double()
    split = copy.deepcopy(whole)
    images, labels = torch.randn(32, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (32,))
    loss_whole = sgd_step(whole, make_optimizer(whole, config), images, labels, micro_batch=None)
    loss_split = sgd_step(split, make_optimizer(split, config), images, labels, micro_batch=2)
    assert loss_split == pytest.approx(loss_whole, rel=1e-10)
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_schedule_and_data_order():
    config = StudyConfig(lr=0.1, warmup_iters=10)
    assert lr_at(0, 100, config) == pytest.approx(0.01)
    assert lr_at(10, 100, config) == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(0.1 * torch.pi)).item()))
    assert lr_at(99, 100, config) < 1e-3
    epoch = torch.cat([batch_indices(i, 3, 96, 32) for i in range(3)])
    assert sorted(epoch.tolist()) == list(range(96))  # one epoch: every image once
    assert torch.equal(batch_indices(4, 3, 96, 32), batch_indices(4, 3, 96, 32))
    assert not torch.equal(batch_indices(0, 3, 96, 32), batch_indices(0, 4, 96, 32))


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    straight = train_run("mabn2", 0, TINY, tmp_path / "a", log=lambda m: None)
    assert train_run("mabn2", 0, TINY, tmp_path / "b", stop_after=2, log=lambda m: None) is None
    final, checkpoint = run_paths(tmp_path / "b", "mabn2", 0)
    assert checkpoint.exists() and not final.exists()
    resumed = train_run("mabn2", 0, TINY, tmp_path / "b", log=lambda m: None)
    assert final.exists() and not checkpoint.exists()
    strip = lambda history: [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    assert resumed["final_test_accuracy"] == straight["final_test_accuracy"]
    assert [h["iteration"] for h in straight["history"]] == [2, 4, 6]
    # a finished run is skipped, a run with another config is refused
    assert train_run("mabn2", 0, TINY, tmp_path / "b", log=lambda m: None) == resumed
    with pytest.raises(ValueError, match="different config"):
        train_run("mabn2", 0, StudyConfig(**{**TINY.__dict__, "lr": 0.1}), tmp_path / "b")


def test_norm_labels_follow_the_batch_sizes():
    assert [norm_label(n, StudyConfig()) for n in NORMS][:4] == ["BN(32)", "BN(2)", "BRN(2)", "GN"]
    assert norm_label("bn2", StudyConfig(norm_batch=4)) == "BN(4)"


@pytest.mark.slow
def test_small_batch_study_quick(tmp_path):
    tool = _tool("small_batch_study")
    assert tool.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    summary = json.loads((tmp_path / "results.json").read_text())
    labels = [norm_label(n, tool.QUICK) for n in NORMS]
    for label in labels:
        assert f"| {label} |" in table
    assert [p.split(" (n=")[0] for p in summary["plotted"]] == labels
    assert (tmp_path / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for norm in NORMS:
        log = json.loads(run_paths(tmp_path, norm, 0)[0].read_text())
        assert log["torch_version"] == torch.__version__ and "git_commit" in log
        assert 0.0 <= log["final_test_accuracy"] <= 100.0 and log["iterations"] == 70
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*_seed0.json")}
    assert tool.main(["--quick", "--output-dir", str(tmp_path), "--jobs", "1"]) == 0  # finished runs are skipped
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*_seed0.json")} == before


@pytest.mark.slow
def test_plot_batch_stats_quick(tmp_path):
    tool = _tool("plot_batch_stats")
    assert tool.main(["--quick", "--with-mabn", "--output-dir", str(tmp_path)]) == 0
    png = tmp_path / "batch_stats_stages_0_0_conv1_norm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fluctuation = json.loads((tmp_path / "fluctuation.json").read_text())
    assert set(fluctuation) == {"BN(2)", "BN(32)", "MABN(2)"}
    for per_layer in fluctuation.values():
        values = per_layer["stages.0.0.conv1.norm"]
        assert set(values) == {"mu_B", "sigma2_B", "g_B", "Psi_B"}
        assert all(0 <= v[kind] < float("inf") for v in values.values() for kind in ("relative", "absolute"))
    recorded = torch.load(tmp_path / "batch_stats.pt")
    assert recorded["bn2"]["layers"]["stages.0.0.conv1.norm"]["Psi_B"].shape[0] == 16 * 30
    assert recorded["bn32"]["layers"]["stages.0.0.conv1.norm"]["Psi_B"].shape[0] == 30
