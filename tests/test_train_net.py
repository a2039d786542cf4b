"""tools/train_net.py refuses bad inputs with one line, before it writes anything or starts a process."""
import importlib.util
import os

import pytest
import torch

from mabn_d2.engine.checkpoint import MABNCheckpointer
from mabn_d2.layers import MABN2d
from mabn_d2.engine.preflight import UsageError, check_device, check_norm_names, check_writable_dir

from .conftest import REPO_ROOT, load_tool

DEMO_CONFIG = os.path.join(REPO_ROOT, "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml")


@pytest.fixture(scope="module")
def train_net():
    return load_tool("train_net")


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


# ---------------------------------------------------------------- every check before the first write
# The backend variable, the solver values and the weights against the model: refused in one line,
# exit 2, with an existing run's config.yaml and log.txt as they were.

TINY_MODEL = ["MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.CONV_DIM", "64",
              "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64"]
RING_KEY = "backbone.bottom_up.res2.0.conv1.norm.x2_buffer"
MEAN_KEY = "backbone.bottom_up.res2.0.conv1.norm.running_mean"


@pytest.fixture(scope="module")
def tiny_state():
    """The state of the model the demo config builds with TINY_MODEL."""
    import mabn_d2
    from mabn_d2.engine import setup_cfg

    return mabn_d2.build_model(setup_cfg(DEMO_CONFIG, TINY_MODEL)).state_dict()


def _existing_run(path):
    path.mkdir(exist_ok=True)
    (path / "config.yaml").write_text("the run's config\n")
    (path / "log.txt").write_text("the run's log\n")
    return path


def _untouched(run, *others):
    assert (run / "config.yaml").read_text() == "the run's config\n"
    assert (run / "log.txt").read_text() == "the run's log\n"
    assert sorted(os.listdir(run)) == sorted(["config.yaml", "log.txt", *others])


def _passes(train_net, *argv):
    train_net.check_before_start(train_net.parse_args(["--config-file", DEMO_CONFIG, *map(str, argv)]))


def test_bad_backend_variable_changes_nothing(train_net, tmp_path, capsys, monkeypatch):
    run = _existing_run(tmp_path / "run")
    monkeypatch.setenv("MABN_D2_BACKEND", "bogus")
    err = _refused(train_net, capsys, "OUTPUT_DIR", run)
    assert "MABN_D2_BACKEND='bogus': choose one of auto, triton, torch" in err
    _untouched(run)


def test_triton_backend_on_cpu_needs_the_interpreter(train_net, tmp_path, capsys, monkeypatch):
    run = _existing_run(tmp_path / "run")
    monkeypatch.setenv("MABN_D2_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = _refused(train_net, capsys, "OUTPUT_DIR", run)
    assert "MABN_D2_BACKEND=triton: the Triton kernels cannot run this config's MABN/BRN layers" in err
    assert "TRITON_INTERPRET=1" in err or "Triton is not installed" in err
    _untouched(run)
    _passes(train_net, "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "", "MODEL.ROI_BOX_HEAD.NORM", "",
            "MODEL.ROI_MASK_HEAD.NORM", "", "OUTPUT_DIR", run)  # no MABN layer: the variable does not matter
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _passes(train_net, "OUTPUT_DIR", run)


@pytest.mark.parametrize("overrides, message", [
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be > 0 to train, got 0"),
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be > 0, got 0"),
    (["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"],
     "SOLVER.IMS_PER_BATCH must be divisible by the number of training processes, 2 (--num-gpus x --num-machines), "
     "got 3"),
    (["SOLVER.BASE_LR", "-0.1"], "SOLVER.BASE_LR must be finite and > 0, got -0.1"),
    (["SOLVER.WARMUP_ITERS", "-1"], "SOLVER.WARMUP_ITERS must be >= 0, got -1"),
    (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD must be > 0, got 0"),
    (["SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "(300, 200)"],
     "SOLVER.STEPS must be increasing, got (300, 200)"),
    (["SOLVER.LR_SCHEDULER_NAME", "Cosine"], "SOLVER.LR_SCHEDULER_NAME must be one of WarmupMultiStepLR"),
])
def test_bad_solver_value_changes_nothing(train_net, tmp_path, capsys, overrides, message):
    run = _existing_run(tmp_path / "run")
    assert message in _refused(train_net, capsys, *overrides, "OUTPUT_DIR", run)
    _untouched(run)


def test_solver_values_are_checked_as_scaled_to_the_processes_and_only_to_train(train_net, tmp_path):
    from mabn_d2.engine import setup_cfg
    from mabn_d2.engine.preflight import check_solver

    cfg = setup_cfg(DEMO_CONFIG, ["SOLVER.REFERENCE_WORLD_SIZE", "1", "SOLVER.CHECKPOINT_PERIOD", "1"])
    check_solver(cfg, 1)
    with pytest.raises(UsageError, match=r"^SOLVER.CHECKPOINT_PERIOD must be > 0, got 0 \(after "
                                         r"SOLVER.REFERENCE_WORLD_SIZE scaled it to 4 processes\)$"):
        check_solver(cfg, 4)
    with pytest.raises(UsageError, match="SOLVER.IMS_PER_BATCH must be divisible by SOLVER.REFERENCE_WORLD_SIZE"):
        check_solver(setup_cfg(DEMO_CONFIG, ["SOLVER.REFERENCE_WORLD_SIZE", "4"]), 1)
    _passes(train_net, "--eval-only", "SOLVER.MAX_ITER", "0", "OUTPUT_DIR", tmp_path / "eval")  # no solver there


def test_batchnorm_weights_for_an_mabn_config(train_net, tmp_path, capsys, tiny_state):
    weights = tmp_path / "R-18-bn.pth"
    backbone = {k: v for k, v in tiny_state.items() if k.startswith("backbone.bottom_up.") and "_buffer" not in k}
    with_mean = {**backbone, MEAN_KEY: torch.full_like(backbone[MEAN_KEY], -0.5)}
    torch.save({"model": with_mean}, weights)
    err = _refused(train_net, capsys, *TINY_MODEL, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "run")
    assert f"MODEL.WEIGHTS {weights}: {MEAN_KEY} is a non-zero running_mean (largest magnitude 0.5)" in err
    assert err.rstrip().endswith("convert BatchNorm weights with tools/convert_pretrained.py")
    assert not (tmp_path / "run").exists()
    # As tools/convert_pretrained.py writes them (zero means, no ring buffers, no FPN or heads), they fit.
    converted = tmp_path / "R-18-mabn.pth"
    torch.save({"model": backbone, "__author__": "mabn_d2.convert", "matching_heuristics": False}, converted)
    _passes(train_net, *TINY_MODEL, "MODEL.WEIGHTS", converted, "OUTPUT_DIR", tmp_path / "run")


def test_weights_of_another_shape(train_net, tmp_path, capsys, tiny_state):
    backbone_key, head_key = "backbone.fpn_lateral2.weight", "roi_heads.box_predictor.cls_score.weight"
    wrong_backbone, wrong_head = tmp_path / "backbone.pth", tmp_path / "head.pth"
    torch.save({"model": {**tiny_state, backbone_key: torch.zeros(32, 64, 1, 1)}}, wrong_backbone)
    err = _refused(train_net, capsys, *TINY_MODEL, "MODEL.WEIGHTS", wrong_backbone, "OUTPUT_DIR", tmp_path / "run")
    assert (f"MODEL.WEIGHTS {wrong_backbone}: it does not fit the model this config builds: {backbone_key} is "
            "(32, 64, 1, 1) in the file and (64, 64, 1, 1) in the model") in err
    # Another NUM_CLASSES is detectron2's fine-tuning case: trained from, the head starts anew; evaluated, it cannot.
    torch.save({"model": {**tiny_state, head_key: torch.zeros(3, 128)}}, wrong_head)
    _passes(train_net, *TINY_MODEL, "MODEL.WEIGHTS", wrong_head, "OUTPUT_DIR", tmp_path / "run")
    err = _refused(train_net, capsys, "--eval-only", *TINY_MODEL, "MODEL.WEIGHTS", wrong_head,
                   "OUTPUT_DIR", tmp_path / "eval")
    assert f"{head_key} is (3, 128) in the file and (11, 128) in the model" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


def test_weights_sharing_no_key_with_the_model(train_net, tmp_path, capsys):
    weights = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.running_mean": torch.zeros(64)}, weights)
    err = _refused(train_net, capsys, *TINY_MODEL, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", tmp_path / "run")
    assert f"MODEL.WEIGHTS {weights}: none of its 2 keys (first: conv1.weight) is a key of the model" in err
    assert "tools/convert_pretrained.py" in err


def test_resume_with_another_buffer_size_changes_nothing(train_net, tmp_path, capsys, tiny_state):
    run = _existing_run(tmp_path / "run")
    torch.save({"model": tiny_state, "iteration": 3}, run / "model_0000003.pth")
    (run / "last_checkpoint").write_text("model_0000003.pth")
    saved = tiny_state[RING_KEY].shape[0]
    other = 2 if saved != 2 else 4
    err = _refused(train_net, capsys, "--resume", *TINY_MODEL, "MODEL.MABN.BUFFER_SIZE", other, "OUTPUT_DIR", run)
    assert (f"cannot resume from {run / 'model_0000003.pth'}: MODEL.MABN.BUFFER_SIZE changed from {saved} to "
            f"{other}") in err
    assert f"resume with MODEL.MABN.BUFFER_SIZE {saved}, or train anew in another OUTPUT_DIR" in err
    err = _refused(train_net, capsys, "--resume", *TINY_MODEL, "MODEL.ROI_HEADS.NUM_CLASSES", 4, "OUTPUT_DIR", run)
    assert "roi_heads.box_predictor.cls_score.weight is (11, 128) in the file and (5, 128) in the model" in err
    assert f"resume with the config it was trained with ({run / 'config.yaml'})" in err
    _untouched(run, "last_checkpoint", "model_0000003.pth")
    _passes(train_net, "--resume", *TINY_MODEL, "OUTPUT_DIR", run)  # the config it was written with fits


def test_weights_changed_after_saving_are_refused_before_anything_starts(train_net, tmp_path, capsys):
    import mabn_d2
    from mabn_d2.engine import setup_cfg

    from .test_checkpoint import _overwrite_tensor_bytes

    model = mabn_d2.build_model(setup_cfg(DEMO_CONFIG, TINY_MODEL))
    MABNCheckpointer(model, str(tmp_path)).save("model_final", iteration=3)
    weights = tmp_path / "model_final.pth"
    _overwrite_tensor_bytes(weights, model.backbone.bottom_up.stem.conv1.weight)
    for mode in ([], ["--eval-only"]):
        for value in (weights, f"{weights}?matching_heuristics=True"):  # read once, whatever the suffix
            err = _refused(train_net, capsys, *mode, *TINY_MODEL, "MODEL.WEIGHTS", value,
                           "OUTPUT_DIR", tmp_path / "run")
            assert f"checkpoint {weights} is damaged: its model state does not match the checksum" in err
    assert not (tmp_path / "run").exists()


def test_the_resume_check_reads_the_checkpoint_once(train_net, tmp_path, monkeypatch, tiny_state):
    """check_before_start verifies the checkpoint --resume continues from and checks that it fits
    with one read of the file."""
    import mabn_d2.engine.checkpoint as checkpoint

    run = _existing_run(tmp_path / "run")
    torch.save({"model": tiny_state, "iteration": 3}, run / "model_0000003.pth")
    (run / "last_checkpoint").write_text("model_0000003.pth")
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    _passes(train_net, "--resume", *TINY_MODEL, "OUTPUT_DIR", run)
    assert reads == [str(run / "model_0000003.pth")]
    assert checkpoint.check_resume_point(str(run)) == str(run / "model_0000003.pth")


def test_the_config_is_read_once_per_run(train_net, tmp_path, monkeypatch):
    """check_before_start reads and validates the YAML; the training process gets that frozen cfg
    instead of reading the file again."""
    from detectron2.config import CfgNode

    reads, trained = [], []
    real_merge = CfgNode.merge_from_file

    def counting_merge(self, filename, *args, **kwargs):
        reads.append(filename)
        return real_merge(self, filename, *args, **kwargs)

    class RecordingTrainer:
        def __init__(self, cfg):
            trained.append(cfg)

        def resume_or_load(self, resume):
            pass

        def train(self):
            return {}

    monkeypatch.setattr(CfgNode, "merge_from_file", counting_merge)
    monkeypatch.setattr(train_net, "MABNTrainer", RecordingTrainer)
    monkeypatch.setattr(train_net, "register_demo_datasets", lambda cfg: None)
    assert train_net.invoke_main(["--config-file", DEMO_CONFIG, *TINY_MODEL, "OUTPUT_DIR", str(tmp_path / "run")]) == 0
    assert reads == [DEMO_CONFIG] and len(trained) == 1
    assert trained[0].is_frozen() and trained[0].OUTPUT_DIR == str(tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file()  # the process's setup still ran (default_setup)
