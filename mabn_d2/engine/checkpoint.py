"""Training checkpoints that survive a crash and a resume that checks what it resumes from.

`MABNCheckpointer` is detectron2's DetectionCheckpointer with these changes:

- every checkpoint is written to a temporary file beside it and renamed into place, and
  `last_checkpoint` is rewritten (the same way) only after the file it names is complete, so
  a crash at any moment leaves the previous checkpoint readable and named;
- each checkpoint holds every training process's own state (`mabn_d2.engine.rank_state`): saving is
  collective, all processes call `save` (the trainer's checkpoint hook runs on every process);
- `resume_or_load(resume=True)` raises `CheckpointError` with one line naming the unreadable
  file and the other checkpoints in the folder, instead of a bare EOFError; a save on a full
  disk raises one naming the file and the checkpoint kept, instead of torch's zip-writer error;
- each checkpoint carries a sha256 of its model state, which every load, `read_checkpoint` and
  `check_resume_point` verify: a file whose bytes changed after it was written is named as
  damaged, not trained on, folded, re-estimated or evaluated;
- MABN ring buffers missing from a checkpoint (weights converted from BatchNorm) are reported
  as expected, not mixed into the warning about keys that are really missing; so are the FPN
  and heads missing from a backbone converted by `tools/convert_pretrained.py`. What stays in
  the warning is a real gap.
"""
import errno
import hashlib
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from ..layers.base import MovingAverageNorm
from ..utils.atomic_io import atomic_write
from .rank_state import capture_rank_state, restore_rank_state

__all__ = [
    "CheckpointError",
    "MABNCheckpointer",
    "MODEL_CHECKSUM_KEY",
    "RANK_STATES_KEY",
    "check_resume_point",
    "read_resume_point",
    "describe_unreadable",
    "model_checksum",
    "read_checkpoint",
    "remove_stale_temporary_files",
    "verify_checksum",
]

logger = logging.getLogger(__name__)

RANK_STATES_KEY = "rank_states"  # one entry per training process, in rank order
MODEL_CHECKSUM_KEY = "model_sha256"  # model_checksum of "model", written by MABNCheckpointer.save
CONVERTED_AUTHOR = "mabn_d2.convert"  # "__author__" of backbones written by tools/convert_pretrained.py
CONVERTED_PREFIX = "backbone.bottom_up."  # what such a backbone holds; the rest of a detector starts anew
LAST_CHECKPOINT = "last_checkpoint"
# What atomic_write leaves behind when the process is killed with SIGKILL while writing.
_STALE_TEMPORARY = re.compile(r"^\.(?:.+\.pth|last_checkpoint)\.[A-Za-z0-9_]+\.tmp$")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_MARK = 0x80


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def describe_unreadable(path: str, error: BaseException) -> str:
    """One line on why `path` did not load as a checkpoint."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot read checkpoint {path}: {e.strerror or e}"
    if size == 0:
        return f"cannot read checkpoint {path}: the file is empty (0 bytes; its write never finished)"
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    what = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    if head.startswith(_ZIP_MAGIC) or (head and head[0] == _PICKLE_PROTOCOL_MARK):
        return f"cannot read checkpoint {path}: the file is truncated or damaged ({size} bytes; {what})"
    return (f"cannot read checkpoint {path}: not a PyTorch or pickle checkpoint "
            f"(it starts with {head!r}; {what})")


def model_checksum(state: Mapping[str, Any]) -> str:
    """sha256 of a model state: every key, dtype, shape and byte, in key order.

    torch.load does not check what it reads: bytes overwritten inside a tensor load as other
    numbers, and training then fails far from the cause (a NaN loss).
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if torch.is_tensor(value):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{flat.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def verify_checksum(data: Mapping[str, Any], path: str) -> None:
    """CheckpointError naming `path` when its model state differs from the checksum saved with it.

    Checkpoints without a checksum (older ones, converted or foreign weights) are not checked.
    """
    expected = data.get(MODEL_CHECKSUM_KEY)
    if expected is None or not isinstance(data.get("model"), Mapping):
        return
    if model_checksum(data["model"]) != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its model state does not match the checksum "
                              f"saved with it ({MODEL_CHECKSUM_KEY}); the file changed after it was written")


def read_checkpoint(path: str, mmap: bool = False, verify: bool = True) -> Dict[str, Any]:
    """torch.load(`path`) on the CPU, or CheckpointError with one line saying what is wrong.

    With `verify` (the default: whatever reads a checkpoint to use it), a model state that differs
    from the checksum saved with it is refused as damaged, naming the file, as a resume refuses it.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            mmap = mmap and f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC  # only the zip format maps
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # unpickling, zip and format errors all mean: not usable
        raise CheckpointError(describe_unreadable(path, error)) from error
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a dict of states")
    if verify:
        verify_checksum(data, path)
    return data


def _other_checkpoints(save_dir: str, exclude: str) -> List[str]:
    """The .pth files of `save_dir` other than `exclude`, newest first, sizes noted."""
    try:
        names = [n for n in os.listdir(save_dir) if n.endswith(".pth") and not n.startswith(".")]
    except OSError:
        return []
    paths = [os.path.join(save_dir, n) for n in names if os.path.join(save_dir, n) != os.path.normpath(exclude)]
    paths.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    return [f"{os.path.basename(p)} ({_size(p)})" for p in paths]


def _size(path: str) -> str:
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def _cannot_resume(save_dir: str, path: str, reason: str) -> str:
    others = _other_checkpoints(save_dir, path)
    last = os.path.join(save_dir, LAST_CHECKPOINT)
    if others:
        hint = (f"other checkpoints in {save_dir}, newest first: {', '.join(others)}; to resume from one "
                f"of them write its file name into {last}")
    else:
        hint = f"there is no other checkpoint in {save_dir}: train again without --resume"
    return f"cannot resume: {reason}; {hint}"


def _named_checkpoint(save_dir: str) -> str:
    """The path `last_checkpoint` names, or CheckpointError when it names nothing."""
    last = os.path.join(save_dir, LAST_CHECKPOINT)
    with open(last) as f:
        name = f.read().strip()
    if not name:
        raise CheckpointError(_cannot_resume(save_dir, last, f"{last} is empty"))
    return os.path.join(save_dir, name)


def read_resume_point(save_dir: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(path, contents) of the checkpoint `--resume` would continue from, verified against its
    checksum; None when there is none.

    Cheap (memory-mapped): meant to run before anything starts, so a bad file is reported in
    one line instead of failing every training process. The contents go on to the fit check,
    so the file is read once.
    """
    if not os.path.isfile(os.path.join(save_dir, LAST_CHECKPOINT)):
        return None
    path = _named_checkpoint(save_dir)
    try:
        data = read_checkpoint(path, mmap=True)  # verified against its checksum
    except CheckpointError as error:
        raise CheckpointError(_cannot_resume(save_dir, path, str(error))) from error
    return path, data


def check_resume_point(save_dir: str) -> Optional[str]:
    """The checkpoint `--resume` would continue from (None when there is none), verified to load."""
    found = read_resume_point(save_dir)
    return None if found is None else found[0]


def remove_stale_temporary_files(save_dir: str) -> List[str]:
    """Delete checkpoint temporaries a killed process left in `save_dir`; returns their names."""
    removed = []
    try:
        names = os.listdir(save_dir)
    except OSError:
        return removed
    for name in names:
        if _STALE_TEMPORARY.match(name):
            try:
                os.remove(os.path.join(save_dir, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        logger.info("Removed %d unfinished checkpoint writes from %s: %s", len(removed), save_dir, ", ".join(removed))
    return removed


class MABNCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, per-process state and a verified resume."""

    def save(self, name: str, **kwargs: Any) -> None:
        """Write `<save_dir>/<name>.pth` atomically, then name it in `last_checkpoint`.

        Collective in multi-process runs: every process calls it and contributes its own state.
        """
        if not self.save_dir:
            return
        rank_states = comm.gather(capture_rank_state(self.model), dst=0)
        if not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data[MODEL_CHECKSUM_KEY] = model_checksum(data["model"])  # verified when loaded
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data[RANK_STATES_KEY] = rank_states
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        try:
            atomic_write(path, lambda f: self._serialize(data, f), durable=True)
            self.tag_last_checkpoint(basename)
        except Exception as error:  # torch's writer reports a full disk as a RuntimeError chained to it
            full = _disk_full(error)
            if full is None:
                raise
            raise CheckpointError(f"{full} while saving {path}; {self._kept()}") from error

    def _kept(self) -> str:
        """What a failed save leaves in use: the checkpoint last_checkpoint names, if any."""
        try:
            return f"{_named_checkpoint(self.save_dir)} kept"
        except (OSError, CheckpointError):
            return f"no earlier checkpoint in {self.save_dir}"

    def _serialize(self, data: Dict[str, Any], file) -> None:
        torch.save(data, file)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, LAST_CHECKPOINT)
        atomic_write(path, lambda f: f.write(last_filename_basename), mode="w", durable=True)

    def get_checkpoint_file(self) -> str:
        return _named_checkpoint(self.save_dir)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        if comm.is_main_process():
            remove_stale_temporary_files(self.save_dir)
        last = self.get_checkpoint_file()
        try:
            return self.load(last)
        except CheckpointError as error:
            raise CheckpointError(_cannot_resume(self.save_dir, last, str(error))) from error

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """DetectionCheckpointer.load; restores this process's own state when resuming fully."""
        if path and "://" not in path and "?" not in path and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            extra = super().load(path, checkpointables=checkpointables)
        finally:
            self._parsed_url_during_load = None  # DetectionCheckpointer leaves it set when loading fails
        saved = extra.pop(RANK_STATES_KEY, None)
        if saved and checkpointables is None:
            try:
                restore_rank_state(self.model, saved, comm.get_rank(), comm.get_world_size(), path)
            except ValueError as error:
                raise CheckpointError(str(error)) from error
        return extra

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            data = super()._load_file(filename)
        except Exception as error:  # noqa: BLE001  (every reading failure gets the same one-line report)
            raise CheckpointError(describe_unreadable(filename, error)) from error
        verify_checksum(data, filename)
        data.pop(MODEL_CHECKSUM_KEY, None)  # consumed here, not returned as extra data
        return data

    def _load_model(self, checkpoint: Dict[str, Any]):
        self._loading_converted_backbone = checkpoint.get("__author__") == CONVERTED_AUTHOR
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        ring_keys = _ring_buffer_keys(self.model)
        ring = [k for k in incompatible.missing_keys if k in ring_keys]
        if ring:
            self.logger.info(
                "%d MABN ring buffers are not in the checkpoint and start empty, as expected for weights "
                "that come from BatchNorm (tools/convert_pretrained.py); they fill during the first "
                "MODEL.MABN.BUFFER_SIZE iterations.", len(ring),
            )
        others = [k for k in incompatible.missing_keys if k not in ring_keys]
        if getattr(self, "_loading_converted_backbone", False):
            new_parts = [k for k in others if not k.startswith(CONVERTED_PREFIX)]
            if new_parts:
                self.logger.info(
                    "%d parameters and buffers outside the backbone's ResNet (FPN, heads) are not in this "
                    "converted ImageNet backbone and keep their initialization, as expected.", len(new_parts),
                )
            others = [k for k in others if k.startswith(CONVERTED_PREFIX)]
        super()._log_incompatible_keys(incompatible._replace(missing_keys=others))


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _disk_full(error: BaseException) -> Optional[str]:
    """"no space left on device" (or the quota's words) when `error` or what it was chained to
    is that OSError, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return _DISK_FULL[error.errno]
        error = error.__cause__ or error.__context__
    return None


def _ring_buffer_keys(model: torch.nn.Module) -> set:
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, MovingAverageNorm)
        for name in module.ring_buffers
    }
