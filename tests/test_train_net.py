"""tools/train_net.py refuses bad inputs with one line, before it writes anything or starts a process."""
import importlib.util
import os

import pytest
import torch

from mabn_d2.engine.checkpoint import MABNCheckpointer
from mabn_d2.layers import MABN2d
from mabn_d2.engine.preflight import UsageError, check_device, check_norm_names, check_writable_dir

from .conftest import REPO_ROOT

DEMO_CONFIG = os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml")


@pytest.fixture(scope="module")
def train_net():
    spec = importlib.util.spec_from_file_location("train_net_tool", os.path.join(REPO_ROOT, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(train_net, capsys, *argv) -> str:
    assert train_net.invoke_main(["--config-file", DEMO_CONFIG, *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_net: error: ") and err.count("\n") == 1, err
    return err


def test_bad_value_in_an_existing_run_changes_nothing(train_net, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("the run's config\n")
    err = _refused(train_net, capsys, "MODEL.MABN.EMA_DECAY", "1.5", "OUTPUT_DIR", tmp_path)
    assert "cfg.MODEL.MABN.EMA_DECAY must be in [0, 1), got 1.5" in err
    assert (tmp_path / "config.yaml").read_text() == "the run's config\n"
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no log.txt either


def test_bad_value_in_a_new_run_creates_no_folder(train_net, tmp_path, capsys):
    _refused(train_net, capsys, "MODEL.MABN.BUFFER_SIZE", "0", "OUTPUT_DIR", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_norm_lists_the_valid_names(train_net, tmp_path, capsys):
    err = _refused(train_net, capsys, "MODEL.RESNETS.NORM", "mabn", "OUTPUT_DIR", tmp_path / "run")
    assert "MODEL.RESNETS.NORM 'mabn' is not a norm name; valid names: BN, SyncBN, FrozenBN, GN" in err
    assert err.rstrip().endswith("BRN, MABN") and not (tmp_path / "run").exists()


def test_unknown_key_and_missing_config_are_one_line(train_net, tmp_path, capsys):
    assert "Non-existent key: MODEL.MABN.MOMENTUMM" in _refused(
        train_net, capsys, "MODEL.MABN.MOMENTUMM", "0.9", "OUTPUT_DIR", tmp_path)
    assert train_net.invoke_main(["--config-file", str(tmp_path / "none.yaml")]) == 2
    assert f"cannot read config {tmp_path / 'none.yaml'}" in capsys.readouterr().err


def test_output_dir_that_is_a_file(train_net, tmp_path, capsys):
    a_file = tmp_path / "run"
    a_file.write_text("x")
    assert f"OUTPUT_DIR {a_file} exists and is not a folder" in _refused(train_net, capsys, "OUTPUT_DIR", a_file)


def test_output_dir_under_a_read_only_folder(train_net, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root ignores permission bits: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(parent) else real_access(p, mode))
    try:
        err = _refused(train_net, capsys, "OUTPUT_DIR", parent / "run")
    finally:
        parent.chmod(0o755)
    assert f"cannot write OUTPUT_DIR {parent / 'run'}: {parent} is not writable" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(train_net, tmp_path, capsys):
    err = _refused(train_net, capsys, "MODEL.DEVICE", "cuda", "OUTPUT_DIR", tmp_path / "run")
    assert "device 'cuda' needs CUDA, which this machine does not have" in err
    assert not (tmp_path / "run").exists()


def test_resume_from_an_unreadable_checkpoint(train_net, tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), MABN2d(4))
    MABNCheckpointer(model, str(tmp_path)).save("model_0000099", iteration=99)
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    err = _refused(train_net, capsys, "--resume", "OUTPUT_DIR", tmp_path)
    assert f"cannot read checkpoint {tmp_path / 'model_final.pth'}: the file is empty" in err
    assert "model_0000099.pth" in err
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000099.pth", "model_final.pth"]


def test_eval_only_with_an_unreadable_model(train_net, tmp_path, capsys):
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"")
    err = _refused(train_net, capsys, "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "eval")
    assert f"cannot read checkpoint {weights}: the file is empty" in err


def test_training_from_unreadable_weights(train_net, tmp_path, capsys):
    weights = tmp_path / "R-50-mabn.pth"
    weights.write_text("not weights")
    err = _refused(train_net, capsys, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "run")
    assert f"cannot read checkpoint {weights}: not a PyTorch or pickle checkpoint" in err
    assert not (tmp_path / "run").exists()
    err = _refused(train_net, capsys, "MODEL.WEIGHTS", tmp_path / "R-50.pkl", "OUTPUT_DIR", tmp_path / "run")
    assert f"checkpoint not found: {tmp_path / 'R-50.pkl'} (MODEL.WEIGHTS)" in err


def test_processes_meet_on_a_free_port_unless_told(train_net):
    assert train_net.parse_args(["--num-gpus", "2"]).dist_url == "auto"  # launch() picks a free port
    assert train_net.parse_args(["--dist-url", "tcp://127.0.0.1:1234"]).dist_url == "tcp://127.0.0.1:1234"
    with pytest.raises(SystemExit):
        train_net.parse_args(["--num-machines", "2"])


def test_get_norm_lists_valid_names_for_an_unknown_one():
    from detectron2.layers import get_norm

    with pytest.raises(ValueError, match=r"unknown NORM 'mabn'; valid names: BN, .*, GN, .*, MABN$"):
        get_norm("mabn", 8)
    assert isinstance(get_norm("MABN", 8), MABN2d)


def test_preflight_checks(tmp_path):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.FPN.NORM = "GroupNorm"
    with pytest.raises(UsageError, match="MODEL.FPN.NORM 'GroupNorm' is not a norm name"):
        check_norm_names(cfg)
    check_device("cpu")
    with pytest.raises(UsageError, match="'gpu0' is not a torch device"):
        check_device("gpu0")
    check_writable_dir(str(tmp_path / "a" / "b"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match=f"cannot create output folder {tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a file"):
        check_writable_dir(str(tmp_path / "f" / "sub"))
    assert not (tmp_path / "a").exists()  # checking writes nothing
