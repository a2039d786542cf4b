"""The trainer picks detectron2's evaluator by evaluator_type and honours DATALOADER.SAMPLER_TRAIN."""
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, PascalVOCDetectionEvaluator, SemSegEvaluator

from mabn_d2.engine.trainer import MABNTrainer
from mabn_d2.engine.evaluation import build_evaluator_for_dataset

from .test_engine import _tiny_cfg


def _register(name, **metadata):
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(**metadata)
    return name


def test_evaluator_follows_evaluator_type(demo_datasets_dir, tmp_path):
    cfg = _tiny_cfg(tmp_path)
    coco = cfg.DATASETS.TEST[0]
    assert MetadataCatalog.get(coco).evaluator_type == "coco"
    assert isinstance(MABNTrainer.build_evaluator(cfg, coco), COCOEvaluator)

    sem_seg = _register("mabn_test_sem_seg", evaluator_type="sem_seg", stuff_classes=["a", "b"], ignore_label=255)
    assert isinstance(MABNTrainer.build_evaluator(cfg, sem_seg), SemSegEvaluator)

    voc = _register("mabn_test_voc", evaluator_type="pascal_voc", dirname=str(tmp_path), year=2007, split="test",
                    thing_classes=["a"])
    assert isinstance(MABNTrainer.build_evaluator(cfg, voc), PascalVOCDetectionEvaluator)

    json_file = tmp_path / "val.json"
    json_file.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    bare = _register("mabn_test_bare_coco", json_file=str(json_file))  # no evaluator_type: COCO, as before
    assert "evaluator_type" not in MetadataCatalog.get(bare).as_dict()
    assert isinstance(build_evaluator_for_dataset(cfg, bare), COCOEvaluator)


def test_panoptic_gets_semseg_coco_and_panoptic(demo_datasets_dir, tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    built = []
    for name in ("SemSegEvaluator", "COCOEvaluator", "COCOPanopticEvaluator"):
        monkeypatch.setattr(f"mabn_d2.engine.evaluation.{name}", lambda *a, _n=name, **k: built.append(_n) or _n)
    panoptic = _register("mabn_test_panoptic", evaluator_type="coco_panoptic_seg")
    evaluator = build_evaluator_for_dataset(cfg, panoptic)
    assert isinstance(evaluator, DatasetEvaluators)
    assert built == ["SemSegEvaluator", "COCOEvaluator", "COCOPanopticEvaluator"]


def test_unknown_evaluator_type_names_the_dataset(demo_datasets_dir, tmp_path):
    cfg = _tiny_cfg(tmp_path)
    odd = _register("mabn_test_odd", evaluator_type="keypoints_only_mystery")
    with pytest.raises(NotImplementedError, match="mabn_test_odd.*keypoints_only_mystery"):
        MABNTrainer.build_evaluator(cfg, odd)
    untyped = _register("mabn_test_untyped")
    with pytest.raises(NotImplementedError, match="mabn_test_untyped.*None"):
        MABNTrainer.build_evaluator(cfg, untyped)


@pytest.mark.parametrize("sampler", ["RepeatFactorTrainingSampler"])
def test_sampler_train_uses_detectron2s_loader(demo_datasets_dir, tmp_path, monkeypatch, sampler):
    cfg = _tiny_cfg(tmp_path, "DATALOADER.SAMPLER_TRAIN", sampler)
    calls = []
    import mabn_d2.engine.trainer as engine

    real = engine.build_detection_train_loader
    monkeypatch.setattr(engine, "build_detection_train_loader", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    trainer = MABNTrainer(cfg)
    assert calls and calls[0] == ((cfg,), {})  # stock call: detectron2 builds the configured sampler
    assert trainer._stream_sampler is None
    trainer.resume_or_load(resume=False)  # no stream to position: still fine


def test_default_sampler_keeps_the_exact_resume_stream(demo_datasets_dir, tmp_path):
    trainer = MABNTrainer(_tiny_cfg(tmp_path))
    assert trainer._stream_sampler is not None
