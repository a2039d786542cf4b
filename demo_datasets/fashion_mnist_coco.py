"""A small, fully offline COCO-format instance-segmentation demo dataset.

Real COCO is large and needs a download; the MABN demos and tests only need
*some* genuine instance-segmentation data that detectron2 can train on. This
module composes real Fashion-MNIST articles (read from the Debian package
``dataset-fashion-mnist``) onto black canvases and writes them as a COCO
dataset (PNG images + JSON with RLE masks) that ``register_coco_instances``
understands.

Guarantees:

* nothing is downloaded; the source is read from local IDX gzip files;
* generation is deterministic: the same arguments give byte-identical JSON,
  which never contains timestamps or absolute paths;
* the output directory is written once and atomically (built in a hidden sibling
  temporary directory, then moved into place with ``os.replace``; the temporary
  directory is removed on any failure, SIGTERM or SIGINT), and is
  described by ``manifest.json`` so reruns are cheap no-ops and mismatched
  reruns fail loudly instead of silently mixing datasets.

The demo and tools/train_net.py build it on first use (``register_demo_datasets``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from mabn_d2.utils.atomic_io import staged_directory

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "DEFAULT_DATASET_NAMES",
    "read_idx",
    "resolve_fashion_mnist_dir",
    "load_fashion_mnist",
    "build_fashion_mnist_coco",
    "register_fashion_mnist_coco",
]

# Stable name even under `python -m` (where __name__ == "__main__").
_MODULE = "demo_datasets.fashion_mnist_coco"
logger = logging.getLogger(_MODULE)

PathLike = Union[str, "os.PathLike[str]"]

#: Fashion-MNIST class names, in label order (label ``i`` -> COCO category ``i + 1``).
FASHION_MNIST_CLASSES: Tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Environment variable that overrides :data:`FASHION_MNIST_DIR`.
FASHION_MNIST_DIR_ENV = "MABN_FASHION_MNIST_DIR"

DEFAULT_DATASET_NAMES: Tuple[str, str] = ("fmnist_coco_train", "fmnist_coco_val")

_INSTALL_HINT = (
    "Install the Fashion-MNIST data with `apt-get install dataset-fashion-mnist`, "
    f"or point ${FASHION_MNIST_DIR_ENV} (or the source_dir argument) at a directory "
    "holding the four *-ubyte.gz IDX files."
)

# IDX magic numbers: 0x0000 | type 0x08 (unsigned byte) | number of dimensions.
_IDX_UBYTE = 0x08
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Which Fashion-MNIST split feeds which dataset split, and the key that derives
# the split's random stream from the user seed (so e.g. num_train does not
# change the validation canvases).
_SPLITS: Tuple[Tuple[str, str, int], ...] = (("train", "train", 0), ("val", "t10k", 1))

_FORMAT_VERSION = 1
_PIXEL_THRESHOLD = 20  # article pixels are those > 20 (on 0..255)
_SCALE_RANGE = (1.5, 2.0)
_ARTICLE_SIZE = 28
_MAX_SIDE = int(math.ceil(_ARTICLE_SIZE * _SCALE_RANGE[1]))  # largest scaled article side
_PLACEMENT_TRIES = 100
_PNG_COMPRESS_LEVEL = 1


# --------------------------------------------------------------------------- #
# Fashion-MNIST IDX reading
# --------------------------------------------------------------------------- #
def resolve_fashion_mnist_dir(source_dir: Optional[PathLike] = None) -> Path:
    """Return the Fashion-MNIST directory: argument > ``$MABN_FASHION_MNIST_DIR`` > default.

    Centralised so the CLI, the builder and tests agree on where data comes from.
    """
    if source_dir is not None:
        return Path(source_dir)
    env = os.environ.get(FASHION_MNIST_DIR_ENV)
    return Path(env) if env else Path(FASHION_MNIST_DIR)


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes into a ``uint8`` array.

    Validates the header (magic number, declared shape vs. payload size) so a
    truncated or wrong file fails here, naming the file, rather than producing
    garbage canvases later.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid gzip IDX ubyte file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file not found: {path}. {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"Fashion-MNIST file {path} is not a readable gzip file ({e}). {_INSTALL_HINT}"
        ) from e
    if len(data) < 4:
        raise ValueError(f"Fashion-MNIST file {path} is too short to be an IDX file. {_INSTALL_HINT}")
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if (magic >> 16) != 0 or ((magic >> 8) & 0xFF) != _IDX_UBYTE or ndim == 0:
        raise ValueError(
            f"Fashion-MNIST file {path} has invalid IDX magic number 0x{magic:08x} "
            f"(expected an unsigned-byte IDX file). {_INSTALL_HINT}"
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"Fashion-MNIST file {path} has IDX magic number 0x{magic:08x}, "
            f"expected 0x{expected_magic:08x}. {_INSTALL_HINT}"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"Fashion-MNIST file {path} has a truncated IDX header. {_INSTALL_HINT}")
    dims = struct.unpack(">" + "I" * ndim, data[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header_len != expected:
        raise ValueError(
            f"Fashion-MNIST file {path} declares shape {tuple(dims)} ({expected} bytes) but "
            f"holds {len(data) - header_len} bytes of data. {_INSTALL_HINT}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=2)
def _load_cached(images_path: str, labels_path: str, _stamp: Tuple[Any, ...]) -> Tuple[np.ndarray, np.ndarray]:
    # `_stamp` (size, mtime) invalidates the cache if the files change.
    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (_ARTICLE_SIZE, _ARTICLE_SIZE):
        raise ValueError(
            f"Fashion-MNIST file {images_path} holds images of shape {images.shape[1:]}, "
            f"expected ({_ARTICLE_SIZE}, {_ARTICLE_SIZE}). {_INSTALL_HINT}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files {images_path} and {labels_path} disagree: "
            f"{images.shape[0]} images vs. {labels.shape[0]} labels. {_INSTALL_HINT}"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"Fashion-MNIST file {labels_path} holds label {int(labels.max())}, "
            f"expected 0..{len(FASHION_MNIST_CLASSES) - 1}. {_INSTALL_HINT}"
        )
    return images, labels


def load_fashion_mnist(split: str, source_dir: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split (``"train"`` or ``"t10k"``) as ``(images, labels)`` uint8 arrays.

    Results are cached per file (small LRU) because building several small
    datasets in one process (e.g. tests) would otherwise re-decompress 26 MB each time.
    """
    if split not in _SOURCE_FILES:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; expected one of {sorted(_SOURCE_FILES)}")
    root = resolve_fashion_mnist_dir(source_dir)
    paths = [root / name for name in _SOURCE_FILES[split]]
    stamp = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            raise FileNotFoundError(f"Fashion-MNIST file not found: {p}. {_INSTALL_HINT}") from None
        if not p.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file not found: {p}. {_INSTALL_HINT}")
        stamp.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return _load_cached(str(paths[0].resolve()), str(paths[1].resolve()), tuple(stamp))


# --------------------------------------------------------------------------- #
# Canvas generation
# --------------------------------------------------------------------------- #
def _sample_article(images: np.ndarray, rng: np.random.Generator) -> Tuple[int, np.ndarray]:
    """Draw one article: tight crop, random bilinear upscale, trimmed to its mask.

    Returns the source index and the scaled uint8 patch whose bounding box is
    exactly the box of its pixels > threshold (so patch rectangle == COCO bbox).
    """
    while True:  # resample on (practically impossible) empty crops/masks; still deterministic
        index = int(rng.integers(0, images.shape[0]))
        scale = float(rng.uniform(*_SCALE_RANGE))
        img = images[index]
        ys, xs = np.nonzero(img > _PIXEL_THRESHOLD)
        if ys.size == 0:
            continue
        crop = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        h, w = crop.shape
        new_w = max(1, min(_MAX_SIDE, int(round(w * scale))))
        new_h = max(1, min(_MAX_SIDE, int(round(h * scale))))
        scaled = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.BILINEAR))
        ys, xs = np.nonzero(scaled > _PIXEL_THRESHOLD)
        if ys.size == 0:
            continue
        return index, scaled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _place(
    sizes: Sequence[Tuple[int, int]], canvas_size: int, min_objects: int, rng: np.random.Generator
) -> Tuple[List[Tuple[int, int, int]], bool]:
    """Choose non-overlapping top-left corners for patches of the given ``(h, w)`` sizes.

    Random rejection sampling (a fixed number of candidate draws per patch, so
    the RNG stream is deterministic); patches that cannot be placed are
    dropped. If fewer than ``min_objects`` survive, fall back to a fixed grid
    of ``_MAX_SIDE`` cells, which always fits ``min_objects`` (validated).

    Returns ``(patch_index, x, y)`` triples and whether the fallback was used.
    """
    placed: List[Tuple[int, int, int]] = []
    boxes = np.zeros((0, 4), dtype=np.int64)  # x0, y0, x1, y1 (exclusive)
    for i, (h, w) in enumerate(sizes):
        xs = rng.integers(0, canvas_size - w + 1, size=_PLACEMENT_TRIES)
        ys = rng.integers(0, canvas_size - h + 1, size=_PLACEMENT_TRIES)
        if len(boxes):
            overlap = (
                (xs[:, None] < boxes[None, :, 2])
                & (xs[:, None] + w > boxes[None, :, 0])
                & (ys[:, None] < boxes[None, :, 3])
                & (ys[:, None] + h > boxes[None, :, 1])
            ).any(axis=1)
            free = np.flatnonzero(~overlap)
            if free.size == 0:
                continue
            k = int(free[0])
        else:
            k = 0
        x, y = int(xs[k]), int(ys[k])
        placed.append((i, x, y))
        boxes = np.vstack([boxes, [[x, y, x + w, y + h]]])
    if len(placed) >= min_objects:
        return placed, False
    # Deterministic fallback: one patch per _MAX_SIDE x _MAX_SIDE grid cell.
    cells = canvas_size // _MAX_SIDE
    grid = [(i, (i % cells) * _MAX_SIDE, (i // cells) * _MAX_SIDE) for i in range(min(len(sizes), cells * cells))]
    return grid, True


def _png_bytes(gray: np.ndarray) -> bytes:
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _categories() -> List[Dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)]


def _generate_split(
    images: np.ndarray,
    labels: np.ndarray,
    num_images: int,
    rng: np.random.Generator,
    canvas_size: int,
    min_objects: int,
    max_objects: int,
    image_dir: Path,
    split: str,
    source_split: str,
) -> Tuple[bytes, Dict[str, str], int]:
    """Write ``num_images`` PNG canvases into ``image_dir``; return (COCO JSON bytes, file hashes, #annotations)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    coco_images: List[Dict[str, Any]] = []
    coco_anns: List[Dict[str, Any]] = []
    hashes: Dict[str, str] = {}
    fallbacks = 0
    for image_id in range(1, num_images + 1):
        n = int(rng.integers(min_objects, max_objects + 1))
        articles = [_sample_article(images, rng) for _ in range(n)]
        # Largest first packs better; the sort is stable, hence deterministic.
        order = sorted(range(n), key=lambda j: -articles[j][1].size)
        articles = [articles[j] for j in order]
        placements, used_fallback = _place([a[1].shape for a in articles], canvas_size, min_objects, rng)
        fallbacks += int(used_fallback)
        canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
        for j, x, y in placements:
            src_index, patch = articles[j]
            h, w = patch.shape
            canvas[y : y + h, x : x + w] = patch
            full = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
            full[y : y + h, x : x + w] = patch > _PIXEL_THRESHOLD
            rle = mask_util.encode(np.asfortranarray(full))
            coco_anns.append(
                {
                    "id": len(coco_anns) + 1,
                    "image_id": image_id,
                    "category_id": int(labels[src_index]) + 1,
                    "segmentation": {"size": [canvas_size, canvas_size], "counts": rle["counts"].decode("ascii")},
                    "area": float(full.sum(dtype=np.int64)),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "iscrowd": 0,
                    "fmnist_index": src_index,
                }
            )
        file_name = f"{image_id:06d}.png"
        png = _png_bytes(canvas)
        (image_dir / file_name).write_bytes(png)
        hashes[f"{split}/{file_name}"] = hashlib.sha256(png).hexdigest()
        coco_images.append({"id": image_id, "file_name": file_name, "width": canvas_size, "height": canvas_size})
    if fallbacks:
        logger.debug("%s: %d canvases used the deterministic grid placement", split, fallbacks)
    coco = {
        "info": {
            "description": f"Fashion-MNIST COCO-style canvases ({split} split, from Fashion-MNIST {source_split})",
            "version": str(_FORMAT_VERSION),
        },
        "licenses": [],
        "images": coco_images,
        "annotations": coco_anns,
        "categories": _categories(),
    }
    payload = (json.dumps(coco, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")
    return payload, hashes, len(coco_anns)


# --------------------------------------------------------------------------- #
# Build (write-once, atomic) and registration
# --------------------------------------------------------------------------- #
def _paths(root: Path) -> Dict[str, Path]:
    return {
        "root": root,
        "train_images": root / "train",
        "val_images": root / "val",
        "train_json": root / "annotations" / "train.json",
        "val_json": root / "annotations" / "val.json",
        "manifest": root / "manifest.json",
    }


def _result(root: Path, manifest: Dict[str, Any], created: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {k: str(v) for k, v in _paths(root).items()}
    out.update({k: int(v) for k, v in manifest["counts"].items()})
    out["content_sha256"] = manifest["content_sha256"]
    out["created"] = created
    return out


def _check_existing(root: Path, arguments: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Validate an existing output dir; return its manifest if it matches, ``None`` if it is empty."""
    manifest_path = _paths(root)["manifest"]
    if not manifest_path.is_file():
        if root.is_dir() and not any(root.iterdir()):
            return None
        raise ValueError(
            f"{root} exists but is not a dataset built by build_fashion_mnist_coco (no manifest.json); "
            "refusing to overwrite it. Choose another output_dir."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        found = manifest["arguments"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path} is unreadable ({e}); choose another output_dir.") from e
    if found != arguments:
        diffs = ", ".join(
            f"{k}: requested {arguments.get(k)!r}, existing {found.get(k)!r}"
            for k in sorted(set(arguments) | set(found))
            if arguments.get(k) != found.get(k)
        )
        raise ValueError(
            f"A Fashion-MNIST COCO dataset with different arguments already exists at {root} ({diffs}). "
            "Choose another output_dir (or delete the existing one)."
        )
    return manifest


def _validate_args(num_train: int, num_val: int, seed: int, canvas_size: int, min_objects: int, max_objects: int) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(canvas_size, (int, np.integer)) or canvas_size < _MAX_SIDE:
        raise ValueError(f"canvas_size must be an integer >= {_MAX_SIDE} (the largest scaled article), got {canvas_size!r}")
    capacity = (int(canvas_size) // _MAX_SIDE) ** 2
    if not (1 <= min_objects <= max_objects):
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if min_objects > capacity:
        raise ValueError(
            f"min_objects={min_objects} cannot be guaranteed on a {canvas_size}x{canvas_size} canvas "
            f"(at most {capacity} articles of up to {_MAX_SIDE}px always fit); lower it or enlarge canvas_size."
        )


def build_fashion_mnist_coco(
    output_dir: PathLike,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    canvas_size: int = 128,
    source_dir: Optional[PathLike] = None,
    min_objects: int = 2,
    max_objects: int = 6,
) -> Dict[str, Any]:
    """Build the Fashion-MNIST COCO instance-segmentation dataset in ``output_dir`` (write-once).

    Layout: ``{train,val}/NNNNNN.png``, ``annotations/{train,val}.json``, ``manifest.json``.
    Train canvases use Fashion-MNIST train images, val canvases the t10k images,
    so the two splits never share an article.

    The build happens in a temporary sibling directory that is moved into place
    with ``os.replace``, so readers never observe a half-written dataset. If
    ``output_dir`` already holds a dataset built with the same arguments, nothing
    is done; with different arguments a ``ValueError`` is raised instead of
    silently overwriting data someone may be training on.

    Returns:
        dict with ``root``, ``train_images``, ``val_images``, ``train_json``,
        ``val_json``, ``manifest`` (str paths), ``num_train``, ``num_val``,
        ``num_train_annotations``, ``num_val_annotations``, ``content_sha256`` and
        ``created`` (False when an existing dataset was reused).
    """
    _validate_args(num_train, num_val, seed, canvas_size, min_objects, max_objects)
    root = Path(output_dir)
    arguments = {
        "format_version": _FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "canvas_size": int(canvas_size),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
    }
    if root.exists():
        manifest = _check_existing(root, arguments)
        if manifest is not None:
            logger.info("Fashion-MNIST COCO dataset already present at %s; nothing to do.", root)
            return _result(root, manifest, created=False)

    counts = {"num_train": int(num_train), "num_val": int(num_val)}
    # Load sources first so a missing package fails before anything is written.
    sources = {src: load_fashion_mnist(src, source_dir) for split, src, _ in _SPLITS if counts[f"num_{split}"] > 0}

    root.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden sibling folder, removed on any failure, SIGTERM or SIGINT.
    with staged_directory(str(root), "tmp") as stage:
        tmp = Path(stage)
        files: Dict[str, str] = {}
        for split, src, key in _SPLITS:
            n = counts[f"num_{split}"]
            rng = np.random.default_rng([int(seed), key])
            images, labels = sources.get(src, (np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)))
            payload, hashes, n_anns = _generate_split(
                images, labels, n, rng, canvas_size, min_objects, max_objects, tmp / split, split, src
            )
            (tmp / "annotations").mkdir(exist_ok=True)
            (tmp / "annotations" / f"{split}.json").write_bytes(payload)
            files.update(hashes)
            files[f"annotations/{split}.json"] = hashlib.sha256(payload).hexdigest()
            counts[f"num_{split}_annotations"] = n_anns
        content = hashlib.sha256()
        for rel in sorted(files):
            content.update(f"{rel}\0{files[rel]}\n".encode())
        manifest = {
            "generator": _MODULE,
            "arguments": arguments,
            "counts": counts,
            "content_sha256": content.hexdigest(),
            "source": {src: list(_SOURCE_FILES[src]) for src in sorted(sources)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, root)
        except OSError:
            # Someone else finished first (or the dir gained content): accept it only if it matches.
            existing = _check_existing(root, arguments) if root.exists() else None
            if existing is None:
                raise
            logger.info("Fashion-MNIST COCO dataset was built concurrently at %s; reusing it.", root)
            return _result(root, existing, created=False)
    logger.info(
        "Built Fashion-MNIST COCO dataset at %s: %d train / %d val images, %d / %d instances.",
        root, counts["num_train"], counts["num_val"], counts["num_train_annotations"], counts["num_val_annotations"],
    )
    return _result(root, manifest, created=True)


def register_fashion_mnist_coco(
    root: PathLike, names: Sequence[str] = DEFAULT_DATASET_NAMES
) -> Tuple[str, str]:
    """Register the train/val splits under ``root`` with detectron2 (``register_coco_instances``).

    Idempotent so configs/scripts can call it unconditionally: a name already
    registered for the same files is left alone; a name registered for other
    files raises ``ValueError`` rather than silently training on the wrong data.
    Returns the two dataset names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if len(names) != 2:
        raise ValueError(f"names must be (train_name, val_name), got {names!r}")
    paths = _paths(Path(root).resolve())
    for split in ("train", "val"):
        if not paths[f"{split}_json"].is_file():
            raise FileNotFoundError(
                f"{paths[f'{split}_json']} not found; build the dataset first with "
                "build_fashion_mnist_coco() or `python -m demo_datasets.fashion_mnist_coco --output-dir DIR`."
            )
    metadata = {
        "thing_classes": list(FASHION_MNIST_CLASSES),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(FASHION_MNIST_CLASSES))},
    }
    for name, split in zip(names, ("train", "val")):
        json_file, image_root = str(paths[f"{split}_json"]), str(paths[f"{split}_images"])
        if name in DatasetCatalog.list() or name in MetadataCatalog.list():
            meta = MetadataCatalog.get(name)
            old_json, old_root = meta.get("json_file"), meta.get("image_root")
            same = (
                old_json is not None
                and old_root is not None
                and os.path.realpath(old_json) == json_file
                and os.path.realpath(old_root) == image_root
                and name in DatasetCatalog.list()
            )
            if same:
                logger.debug("Dataset %s already registered for %s; skipping.", name, json_file)
                continue
            raise ValueError(
                f"Dataset name {name!r} is already registered for other data "
                f"(json_file={old_json!r}, image_root={old_root!r}); requested {json_file!r}. "
                "Use different names or remove the old registration."
            )
        register_coco_instances(name, metadata, json_file, image_root)
        logger.info("Registered dataset %s -> %s", name, json_file)
    return (names[0], names[1])
