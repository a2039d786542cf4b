"""Tests for the offline Fashion-MNIST COCO demo dataset (demo_datasets.fashion_mnist_coco).

These use the real Fashion-MNIST files from the Debian package
``dataset-fashion-mnist``. They are deliberately *not* skipped when it is
missing: the build then fails with a message naming the file and the
``apt-get install`` hint, which is what CI should show.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo_datasets import FASHION_MNIST_CLASSES, build_fashion_mnist_coco, register_fashion_mnist_coco
from demo_datasets import fashion_mnist_coco as fmc

NUM_TRAIN = 20
NUM_VAL = 8
CANVAS = 128


def _build(path: Path, seed: int = 0, **kw) -> dict:
    return build_fashion_mnist_coco(path, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=seed, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """One small dataset shared by the read-only tests."""
    return _build(tmp_path_factory.mktemp("fmnist") / "ds")


@pytest.fixture(scope="module")
def coco_apis(dataset):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return {split: COCO(dataset[f"{split}_json"]) for split in ("train", "val")}


def _box_xyxy(bbox):
    x, y, w, h = bbox
    return x, y, x + w, y + h


# --------------------------------------------------------------------------- #
# Determinism and file layout
# --------------------------------------------------------------------------- #
def test_json_is_deterministic_per_seed(dataset, tmp_path):
    again = _build(tmp_path / "same")
    other = _build(tmp_path / "other", seed=1)
    for split in ("train", "val"):
        a = Path(dataset[f"{split}_json"]).read_bytes()
        b = Path(again[f"{split}_json"]).read_bytes()
        c = Path(other[f"{split}_json"]).read_bytes()
        assert a == b, f"{split}: same seed must give byte-identical JSON"
        assert a != c, f"{split}: a different seed must give a different dataset"
    assert dataset["content_sha256"] == again["content_sha256"]
    assert dataset["content_sha256"] != other["content_sha256"]


def test_layout_counts_and_no_absolute_paths(dataset):
    root = Path(dataset["root"])
    assert dataset["created"] is True
    assert dataset["num_train"] == NUM_TRAIN and dataset["num_val"] == NUM_VAL
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "manifest.json", "train", "val"]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        assert len(list((root / split).glob("*.png"))) == n
        text = Path(dataset[f"{split}_json"]).read_text()
        assert str(root) not in text and "/usr/share" not in text
        data = json.loads(text)
        assert "date_created" not in data.get("info", {})
        for img in data["images"]:
            assert "/" not in img["file_name"]
            assert (root / split / img["file_name"]).is_file()
    manifest = json.loads((root / "manifest.json").read_text())
    assert str(root) not in json.dumps(manifest)
    assert manifest["arguments"]["seed"] == 0


# --------------------------------------------------------------------------- #
# Annotation content
# --------------------------------------------------------------------------- #
def test_categories(coco_apis):
    for coco in coco_apis.values():
        cats = coco.loadCats(sorted(coco.getCatIds()))
        assert [c["id"] for c in cats] == list(range(1, 11))
        assert tuple(c["name"] for c in cats) == FASHION_MNIST_CLASSES


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_are_valid(dataset, coco_apis, split):
    from pycocotools import mask as mask_util

    coco = coco_apis[split]
    root = Path(dataset["root"])
    img_ids = sorted(coco.getImgIds())
    assert len(img_ids) == (NUM_TRAIN if split == "train" else NUM_VAL)
    for img_id in img_ids:
        info = coco.loadImgs(img_id)[0]
        assert (info["height"], info["width"]) == (CANVAS, CANVAS)
        pixels = np.asarray(Image.open(root / split / info["file_name"]))
        assert pixels.shape == (CANVAS, CANVAS, 3) and pixels.dtype == np.uint8
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
        gray = pixels[..., 0]

        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert 2 <= len(anns) <= 6
        union = np.zeros((CANVAS, CANVAS), dtype=bool)
        for ann in anns:
            assert 1 <= ann["category_id"] <= 10
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            m = coco.annToMask(ann).astype(bool)
            assert m.shape == (CANVAS, CANVAS)
            assert m.any()
            assert ann["area"] == float(m.sum()) == float(mask_util.area(ann["segmentation"]))
            x0, y0, x1, y1 = _box_xyxy(ann["bbox"])
            assert all(isinstance(v, float) for v in ann["bbox"])
            assert 0 <= x0 < x1 <= CANVAS and 0 <= y0 < y1 <= CANVAS
            ys, xs = np.nonzero(m)
            # no mask pixel outside the box, and the box is tight
            assert xs.min() == x0 and xs.max() == x1 - 1
            assert ys.min() == y0 and ys.max() == y1 - 1
            assert not (union & m).any()
            union |= m
        # masks are exactly the bright (> 20) pasted pixels
        assert np.array_equal(union, gray > 20)
        # boxes do not overlap
        boxes = [_box_xyxy(a["bbox"]) for a in anns]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                iw = min(a[2], b[2]) - max(a[0], b[0])
                ih = min(a[3], b[3]) - max(a[1], b[1])
                assert iw <= 0 or ih <= 0, f"image {img_id}: boxes {a} and {b} overlap"


# --------------------------------------------------------------------------- #
# Write-once semantics
# --------------------------------------------------------------------------- #
def test_rerun_is_noop(dataset):
    root = Path(dataset["root"])
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = _build(root)
    assert again["created"] is False
    assert again["content_sha256"] == dataset["content_sha256"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_mismatched_arguments_raise(dataset):
    with pytest.raises(ValueError, match="num_train.*another output_dir"):
        build_fashion_mnist_coco(dataset["root"], num_train=NUM_TRAIN + 1, num_val=NUM_VAL)
    with pytest.raises(ValueError, match="seed"):
        _build(Path(dataset["root"]), seed=5)


def test_refuses_foreign_nonempty_dir(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "something.txt").write_text("x")
    with pytest.raises(ValueError, match="manifest"):
        _build(tmp_path / "ds")


def test_builds_into_existing_empty_dir(tmp_path):
    (tmp_path / "ds").mkdir()
    out = build_fashion_mnist_coco(tmp_path / "ds", num_train=2, num_val=1)
    assert out["created"] and out["num_train"] == 2


# --------------------------------------------------------------------------- #
# Source files
# --------------------------------------------------------------------------- #
def test_missing_source_names_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        build_fashion_mnist_coco(tmp_path / "ds", num_train=2, num_val=1, source_dir=tmp_path / "nowhere")
    assert not (tmp_path / "ds").exists()
    # the environment variable override is honoured as well
    monkeypatch.setenv(fmc.FASHION_MNIST_DIR_ENV, str(tmp_path / "env-nowhere"))
    assert fmc.resolve_fashion_mnist_dir() == tmp_path / "env-nowhere"
    with pytest.raises(FileNotFoundError, match="env-nowhere"):
        build_fashion_mnist_coco(tmp_path / "ds", num_train=2, num_val=1)


def test_corrupt_source_names_the_file(tmp_path):
    bad_gzip = tmp_path / "train-images-idx3-ubyte.gz"
    bad_gzip.write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        fmc.read_idx(bad_gzip)
    wrong_magic = tmp_path / "labels.gz"
    with gzip.open(wrong_magic, "wb") as f:
        f.write(struct.pack(">II", 0x00000801, 3) + bytes([1, 2, 3]))
    assert fmc.read_idx(wrong_magic).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="labels.gz.*magic"):
        fmc.read_idx(wrong_magic, expected_magic=0x00000803)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(struct.pack(">II", 0x00000801, 10) + bytes([1, 2, 3]))
    with pytest.raises(ValueError, match="short.gz"):
        fmc.read_idx(truncated)


def test_real_source_files_are_valid():
    images, labels = fmc.load_fashion_mnist("t10k")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert set(np.unique(labels).tolist()) == set(range(10))


# --------------------------------------------------------------------------- #
# detectron2 registration
# --------------------------------------------------------------------------- #
@pytest.fixture
def dataset_names():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    suffix = uuid.uuid4().hex[:8]
    names = (f"fmnist_coco_train_test_{suffix}", f"fmnist_coco_val_test_{suffix}")
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def test_register_and_load(dataset, dataset_names, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    assert register_fashion_mnist_coco(dataset["root"], names=dataset_names) == dataset_names
    # idempotent for the same files
    register_fashion_mnist_coco(dataset["root"], names=dataset_names)

    for name, n in zip(dataset_names, (NUM_TRAIN, NUM_VAL)):
        meta = MetadataCatalog.get(name)
        assert tuple(meta.thing_classes) == FASHION_MNIST_CLASSES
        records = DatasetCatalog.get(name)
        assert len(records) == n
        for rec in records:
            assert Path(rec["file_name"]).is_file()
            assert 2 <= len(rec["annotations"]) <= 6
            for obj in rec["annotations"]:
                assert obj["bbox_mode"] == BoxMode.XYWH_ABS
                assert 0 <= obj["category_id"] < 10
                assert isinstance(obj["segmentation"], dict)
        assert tuple(MetadataCatalog.get(name).thing_classes) == FASHION_MNIST_CLASSES

    # same names for different files is an error
    other = _build(tmp_path / "other", seed=3)
    with pytest.raises(ValueError, match="already registered"):
        register_fashion_mnist_coco(other["root"], names=dataset_names)


def test_register_missing_dataset(tmp_path, dataset_names):
    with pytest.raises(FileNotFoundError, match="build"):
        register_fashion_mnist_coco(tmp_path / "nothing", names=dataset_names)


# --------------------------------------------------------------------------- #
# Interrupted builds
# --------------------------------------------------------------------------- #
SIGNAL_DURING_BUILD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may inherit SIGINT ignored
from demo_datasets import fashion_mnist_coco as fmc
real_png, written = fmc._png_bytes, []
def png_then_signal(gray):
    written.append(1)
    if len(written) == 3:  # three canvases into the build, the signal arrives
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real_png(gray)
fmc._png_bytes = png_then_signal
fmc.build_fashion_mnist_coco(sys.argv[2], num_train=20, num_val=4)
print("not reached")
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_during_build_leaves_no_temporary_folder(tmp_path, signame):
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", SIGNAL_DURING_BUILD, signame, str(tmp_path / "ds")],
                            cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "not reached" not in result.stdout, result.stderr[-2000:]
    if signame == "SIGTERM":
        assert result.returncode == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == [], "a temporary or partial dataset folder was left behind"


def test_failed_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fmc, "_png_bytes", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        build_fashion_mnist_coco(tmp_path / "ds", num_train=2, num_val=1)
    assert list(tmp_path.iterdir()) == []
