#!/usr/bin/env python
"""Fault drill: run the commands into each known fault and print what a user would see.

  nice -n 10 python tools/fault_drill.py [--cases a,b,l2] [--output table.txt] [--keep]

Each case runs the real command (tools/train_net.py, tools/fold_mabn.py, tools/convert_pretrained.py)
as a subprocess on the demo config at tiny sizes with MODEL.DEVICE cpu, in a fresh temporary
folder. Where the command must refuse, its OUTPUT_DIR (or output folder) holds an earlier run's
files first, and the drill checks they are byte for byte the same afterwards. The table gives
per case: the exit status (and the one expected), whether those files were untouched ("n/a"
where the case trains, and writing is the point), a verdict from the case's checks, and the first
line of stderr; where the tool's own error line is not the first, it follows.

The cases:
  a  MABN_D2_BACKEND=bogus                    g1-g3  integers for float keys (must be accepted)
  b  MABN_D2_BACKEND=triton without CUDA      h      fold_mabn with BatchNorm weights (not "damaged")
  c  SOLVER.MAX_ITER 0                        i1-i2  convert_pretrained: NaN / negative running_var
  d  SOLVER.IMS_PER_BATCH 0                   j      --resume from a checkpoint with overwritten bytes
  e  BatchNorm weights as MODEL.WEIGHTS       k      full disk while saving a checkpoint
  f  --resume with another BUFFER_SIZE        l1-l2  SIGTERM during training; SIGKILL of one DDP rank

A full disk is simulated, as tests/test_checkpoint.py does: every checkpoint after the first is
serialized onto /dev/full (ENOSPC on write), inside a real one-process training. SIGTERM and
SIGKILL land at a known iteration through tests/signalled_train_net.py, which pauses training
after step 1. Python's FutureWarnings (torch.jit's deprecation at import) are silenced, so stderr
shows what the tools say.
"""
import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_mabn.yaml"
BN_CONFIG = "configs/Demo/fmnist_mask_rcnn_R_18_FPN_bn.yaml"
TINY_MODEL = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.FPN.OUT_CHANNELS", "64",
              "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64"]
TINY = [*TINY_MODEL, "DATASETS.TRAIN", "('fmnist_coco_tiny_train',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.WARMUP_ITERS", "2"]
PAUSE_AFTER = 1  # tests/signalled_train_net.py: every process waits after this step
TIMEOUT_S = 1200
FULL_DISK_MODE = "--as-train-net-on-a-full-disk"
EARLIER = {"config.yaml": "an earlier run's config\n", "log.txt": "an earlier run's log\n"}


class Outcome(NamedTuple):
    case: str
    fault: str
    status: Optional[int]
    expected: str
    untouched: str  # "yes", "NO", or "n/a (...)"
    problems: List[str]  # checks that failed; empty: as expected
    stderr: str
    notes: Sequence[str] = ()  # what else was checked, shown under the row


# ---------------------------------------------------------------- running the tools


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    env.pop("TRITON_INTERPRET", None)  # a CPU machine runs Triton only under the interpreter: tests only
    env.update(extra)
    return env


def _run(command: Sequence[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, command)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _train_net(output_dir: Path, *opts: str, script: Sequence[str] = ("tools/train_net.py",),
               processes: int = 1) -> List[str]:
    """The arguments of a train_net run of the demo config into `output_dir`."""
    return [*script, "--num-gpus", str(processes), "--config-file", DEMO_CONFIG, *opts, "OUTPUT_DIR", str(output_dir)]


def _earlier_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in EARLIER.items():
        (folder / name).write_text(text)
    return folder


def _snapshot(folder: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    result = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            result[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.strip()]


def _error_lines(stderr: str, tool: str) -> List[str]:
    return [line for line in _lines(stderr) if line.startswith(f"{tool}: ")]


def _refused(case: str, fault: str, done: subprocess.CompletedProcess, folder: Path, before: Dict[str, str],
             says: Sequence[str], tool: str = "train_net", status: int = 2, never: Sequence[str] = ()) -> Outcome:
    """A refusal: `status`, one line on stderr from the tool saying each of `says`, `folder` unchanged."""
    problems = []
    if done.returncode != status:
        problems.append(f"exit {done.returncode}, expected {status}")
    errors = _error_lines(done.stderr, tool)
    line = errors[-1] if errors else ""
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines from {tool}")
    problems += [f"does not say {text!r}" for text in says if text not in line]
    problems += [f"says {text!r}" for text in never if text in done.stderr]
    untouched = _snapshot(folder) == before
    if not untouched:
        problems.append("files changed")
    return Outcome(case, fault, done.returncode, str(status), "yes" if untouched else "NO", problems, done.stderr)


# ---------------------------------------------------------------- weights the cases start from


def _tiny_model(config: str):
    import mabn_d2
    from mabn_d2.engine import setup_cfg

    return mabn_d2.build_model(setup_cfg(config, TINY_MODEL))


def _batchnorm_weights(path: Path) -> Path:
    """The BatchNorm demo model's state after a few training forwards: non-zero running means."""
    import torch

    torch.manual_seed(0)
    model = _tiny_model(BN_CONFIG).train()
    with torch.no_grad():
        for _ in range(3):
            model.backbone(torch.randn(2, 3, 128, 128))
    torch.save({"model": model.state_dict()}, path)
    return path


def _mabn_checkpoints(folder: Path, *iterations: int) -> Path:
    """MABNCheckpointer checkpoints of the tiny MABN model (BUFFER_SIZE 16) in an earlier run's folder."""
    from mabn_d2.engine.checkpoint import MABNCheckpointer

    checkpointer = MABNCheckpointer(_tiny_model(DEMO_CONFIG), str(_earlier_run(folder)))
    for iteration in iterations:
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
    return folder / f"model_{iterations[-1]:07d}.pth"


def _torchvision_resnet18(path: Path, key: str, value: float) -> Path:
    """A torchvision ResNet-18 with trained-looking statistics, `key`'s first value set to `value`."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    state[key].view(-1)[0] = value
    torch.save(state, path)
    return path


# ---------------------------------------------------------------- the cases


def case_backend(root: Path, env: Dict[str, str], case: str, value: str, says: str) -> Outcome:
    run = _earlier_run(root / "run")
    before = _snapshot(run)
    done = _run(_train_net(run, *TINY), _env(**env, MABN_D2_BACKEND=value))
    return _refused(case, f"MABN_D2_BACKEND={value}" + (" without CUDA" if value == "triton" else ""), done, run,
                    before, [says])


def case_solver(root: Path, env: Dict[str, str], case: str, key: str, value: str, says: str) -> Outcome:
    run = _earlier_run(root / "run")
    before = _snapshot(run)
    done = _run(_train_net(run, *TINY, key, value), _env(**env))
    return _refused(case, f"{key} {value}", done, run, before, [says])


def case_e(root: Path, env: Dict[str, str]) -> Outcome:
    weights = _batchnorm_weights(root / "R-18-bn.pth")
    run = _earlier_run(root / "run")
    before = _snapshot(run)
    done = _run(_train_net(run, *TINY, "MODEL.WEIGHTS", str(weights)), _env(**env))
    return _refused("e", "BatchNorm weights as MODEL.WEIGHTS of an MABN config", done, run, before,
                    [f"MODEL.WEIGHTS {weights}", "non-zero running_mean", "tools/convert_pretrained.py"],
                    never=["damaged"])


def case_f(root: Path, env: Dict[str, str]) -> Outcome:
    run = root / "run"
    checkpoint = _mabn_checkpoints(run, 3)
    before = _snapshot(run)
    done = _run(_train_net(run, "--resume", *TINY, "MODEL.MABN.BUFFER_SIZE", "8"), _env(**env))
    return _refused("f", "--resume with MODEL.MABN.BUFFER_SIZE 16 -> 8", done, run, before,
                    [f"cannot resume from {checkpoint}: MODEL.MABN.BUFFER_SIZE changed from 16 to 8",
                     "resume with MODEL.MABN.BUFFER_SIZE 16"])


def case_g(root: Path, env: Dict[str, str], case: str, key: str, value: str, refused_with: str = "") -> Outcome:
    """An integer for a float key is that float: it trains, or is refused for its value, never for its type."""
    run = _earlier_run(root / "run")
    before = _snapshot(run)
    done = _run(_train_net(run, *TINY, "SOLVER.MAX_ITER", "1", key, value), _env(**env))
    fault = f"{key} {value} (an integer for a float key)"
    if refused_with:
        return _refused(case, fault, done, run, before, [refused_with], never=["ype mismatch"])
    problems = [] if done.returncode == 0 else [f"exit {done.returncode}, expected 0"]
    if "ype mismatch" in done.stderr:
        problems.append("refused as a type mismatch")
    if done.returncode == 0 and not (run / "model_final.pth").is_file():
        problems.append("no model_final.pth")
    return Outcome(case, fault, done.returncode, "0", "n/a (trains)", problems, done.stderr,
                   [f"{run / 'model_final.pth'} written"] if not problems else [])


def case_h(root: Path, env: Dict[str, str]) -> Outcome:
    from mabn_d2.engine import setup_cfg

    weights = _batchnorm_weights(root / "R-18-bn.pth")
    config = root / "config.yaml"
    config.write_text(setup_cfg(DEMO_CONFIG, TINY).dump())
    (root / "folded").mkdir()  # an existing, empty output folder: it stays empty
    before = _snapshot(root)
    done = _run(["tools/fold_mabn.py", "--config-file", config, "--weights", weights, "--output-dir", root / "folded"],
                _env(**env))
    return _refused("h", "fold_mabn with BatchNorm weights", done, root, before,
                    [f"checkpoint {weights} does not fit the model", "running_mean", "convert_pretrained.py"],
                    tool="fold_mabn", status=1, never=["damaged", "cannot read"])


def case_i(root: Path, env: Dict[str, str], case: str, value: float, says: str) -> Outcome:
    key = "layer2.0.bn1.running_var"
    source = _torchvision_resnet18(root / "resnet18.pth", key, value)
    before = _snapshot(root)
    done = _run(["tools/convert_pretrained.py", "--input", source, "--output", root / "R-18-mabn.pth"], _env(**env))
    return _refused(case, f"convert_pretrained with running_var {value}", done, root, before, [says],
                    tool="convert_pretrained")


def case_j(root: Path, env: Dict[str, str]) -> Outcome:
    run = root / "run"
    checkpoint = _mabn_checkpoints(run, 1, 3)
    data = bytearray(checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # 64 bytes in the middle of the file overwritten with zeros
    checkpoint.write_bytes(bytes(data))
    before = _snapshot(run)
    done = _run(_train_net(run, "--resume", *TINY), _env(**env))
    return _refused("j", "--resume from a checkpoint whose middle bytes were overwritten", done, run, before,
                    [f"cannot resume: checkpoint {checkpoint}", "model_0000001.pth"])


def case_k(root: Path, env: Dict[str, str]) -> Outcome:
    run = root / "run"
    opts = [*TINY, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1"]
    done = _run([__file__, FULL_DISK_MODE, *_train_net(run, *opts, script=())], _env(**env))
    problems = [] if done.returncode == 2 else [f"exit {done.returncode}, expected 2"]
    errors = _error_lines(done.stderr, "train_net")
    expected = (f"train_net: error: no space left on device while saving {run / 'model_0000001.pth'}; "
                f"{run / 'model_0000000.pth'} kept")
    if errors != [expected]:
        problems.append(f"error lines {errors}")
    last = (run / "last_checkpoint").read_text() if (run / "last_checkpoint").is_file() else None
    if last != "model_0000000.pth":
        problems.append(f"last_checkpoint names {last}")
    leftovers = [name for name in os.listdir(run) if name.endswith(".tmp")] if run.is_dir() else []
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    problems += _loads(run / "model_0000000.pth")
    return Outcome("k", "full disk while saving the second checkpoint", done.returncode, "2",
                   "n/a (trains)", problems, done.stderr,
                   [f"last_checkpoint: {last}; it loads and matches its checksum; no temporary file left"])


def _loads(path: Path) -> List[str]:
    from mabn_d2.engine.checkpoint import CheckpointError, read_checkpoint

    try:
        read_checkpoint(str(path))
    except CheckpointError as error:
        return [str(error)]
    return []


def case_l(root: Path, env: Dict[str, str], case: str, processes: int) -> Outcome:
    """SIGTERM to a one-process training, or SIGKILL to rank 1 of two, both waiting after step PAUSE_AFTER."""
    run, pause = root / "run", root / "pause"
    pause.mkdir()
    period = "100" if processes == 1 else "1"
    command = _train_net(run, *TINY, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", period,
                         script=("tests/signalled_train_net.py", str(PAUSE_AFTER), str(pause)), processes=processes)
    with open(root / "stdout.txt", "w") as out, open(root / "stderr.txt", "w") as err:
        process = subprocess.Popen([sys.executable, *command], env=_env(**env), cwd=REPO, stdout=out, stderr=err)
        try:
            pids = _paused_pids(pause, processes, process)
            if pids is not None:
                if processes == 1:
                    os.kill(process.pid, signal.SIGTERM)
                else:
                    os.kill(pids[1], signal.SIGKILL)
            status = process.wait(TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = (root / "stderr.txt").read_text()
    if pids is None:
        return Outcome(case, "training never reached the pause", status, "", "n/a", ["no pause"], stderr)
    log = (run / "log.txt").read_text() if (run / "log.txt").is_file() else ""
    if processes == 1:
        problems = [] if status == 143 else [f"exit {status}, expected 143"]
        stopped = f"model_{PAUSE_AFTER + 1:07d}.pth"
        last = (run / "last_checkpoint").read_text() if (run / "last_checkpoint").is_file() else None
        if last != stopped:
            problems.append(f"last_checkpoint names {last}, expected {stopped}")
        if f"SIGTERM: saved {run / stopped}" not in log:
            problems.append("no 'SIGTERM: saved' line in log.txt")
        problems += _loads(run / stopped)
        saved = [line for line in _lines(log) if "SIGTERM: saved" in line]
        return Outcome(case, "SIGTERM during training (1 process)", status, "143", "n/a (trains)", problems,
                       stderr, [f"log.txt: {saved[-1]}" if saved else "log.txt: no SIGTERM line"])
    line = (f"rank 1 (pid {pids[1]}) was killed by SIGKILL; the other ranks were stopped; resume with --resume "
            f"from {run / f'model_{PAUSE_AFTER:07d}.pth'}")
    problems = [] if status == 128 + signal.SIGKILL else [f"exit {status}, expected 137"]
    if f"train_net: error: {line}" not in _lines(stderr):
        problems.append("the rank line is not on stderr")
    if not (_lines(log) and _lines(log)[-1].endswith(line)):
        problems.append("the rank line does not end log.txt")
    return Outcome(case, "SIGKILL of rank 1 of 2 DDP processes", status, "137", "n/a (trains)", problems, stderr,
                   [f"log.txt, last line: {_lines(log)[-1] if _lines(log) else '(empty)'}"])


def _paused_pids(pause: Path, processes: int, process: subprocess.Popen) -> Optional[List[int]]:
    markers = [pause / f"paused.{rank}" for rank in range(processes)]
    deadline = time.monotonic() + TIMEOUT_S
    while not all(marker.exists() for marker in markers):
        if process.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return [int(marker.read_text()) for marker in markers]


CASES: Dict[str, Callable[[Path, Dict[str, str]], Outcome]] = {
    "a": lambda root, env: case_backend(root, env, "a", "bogus", "MABN_D2_BACKEND='bogus': choose one of"),
    "b": lambda root, env: case_backend(root, env, "b", "triton", "MABN_D2_BACKEND=triton: the Triton kernels "
                                                                  "cannot run this config's MABN/BRN layers"),
    "c": lambda root, env: case_solver(root, env, "c", "SOLVER.MAX_ITER", "0", "SOLVER.MAX_ITER must be > 0"),
    "d": lambda root, env: case_solver(root, env, "d", "SOLVER.IMS_PER_BATCH", "0",
                                       "SOLVER.IMS_PER_BATCH must be > 0"),
    "e": case_e,
    "f": case_f,
    "g1": lambda root, env: case_g(root, env, "g1", "MODEL.MABN.WARMUP_FRACTION", "-1"),
    "g2": lambda root, env: case_g(root, env, "g2", "MODEL.MABN.RENORM_CLIP", "5"),
    "g3": lambda root, env: case_g(root, env, "g3", "MODEL.MABN.EPS", "0", refused_with="EPS must be > 0"),
    "h": case_h,
    "i1": lambda root, env: case_i(root, env, "i1", float("nan"), "layer2.0.bn1.running_var holds NaN"),
    "i2": lambda root, env: case_i(root, env, "i2", -0.5, "layer2.0.bn1.running_var is negative"),
    "j": case_j,
    "k": case_k,
    "l1": lambda root, env: case_l(root, env, "l1", 1),
    "l2": lambda root, env: case_l(root, env, "l2", 2),
}


# ---------------------------------------------------------------- the table


def format_table(outcomes: Sequence[Outcome]) -> str:
    rows = [("case", "exit", "expected", "untouched", "verdict", "fault")]
    for o in outcomes:
        verdict = "ok" if not o.problems else "FAIL: " + "; ".join(o.problems)
        rows.append((o.case, str(o.status), o.expected, o.untouched, verdict, o.fault))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        head = "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths))
        lines.append(f"{head}  {row[4]:<7}  {row[5]}")
        if index:
            lines += _stderr_lines(outcomes[index - 1])
    return "\n".join(lines)


def _stderr_lines(outcome: Outcome) -> List[str]:
    lines = _lines(outcome.stderr)
    first = lines[0] if lines else "(empty)"
    result = [f"      stderr, first line: {first}"]
    tool_lines = [line for line in lines if line.split(":", 1)[0] in ("train_net", "fold_mabn", "convert_pretrained")]
    if tool_lines and tool_lines[-1] != first:
        result.append(f"      stderr, tool's line: {tool_lines[-1]}")
    return result + [f"      {note}" for note in outcome.notes]


def _full_disk_train_net(argv: List[str]) -> int:
    """tools/train_net.py (one process) whose checkpoints after the first are written onto /dev/full."""
    import torch

    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    from mabn_d2.engine.checkpoint import MABNCheckpointer

    serialize, saves = MABNCheckpointer._serialize, []

    def onto_a_full_disk(self, data, file) -> None:
        saves.append(file)
        if len(saves) == 1:
            return serialize(self, data, file)
        with open("/dev/full", "wb") as full:  # every write fails with ENOSPC, as on a full disk
            torch.save(data, full)

    MABNCheckpointer._serialize = onto_a_full_disk
    return train_net.invoke_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation, at import
    if argv[:1] == [FULL_DISK_MODE]:
        return _full_disk_train_net(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--output", help="also write the table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (their path is printed)")
    args = parser.parse_args(argv)
    chosen = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = [case for case in chosen if case not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    top = Path(tempfile.mkdtemp(prefix="mabn_fault_drill_"))
    env = {"DETECTRON2_DATASETS": os.environ.get("DETECTRON2_DATASETS", str(top / "datasets"))}
    outcomes = []
    started = time.monotonic()
    try:
        for case in chosen:
            root = top / case
            root.mkdir()
            began = time.monotonic()
            outcomes.append(CASES[case](root, env))
            print(f"[{case}: {time.monotonic() - began:.0f} s] " + ("ok" if not outcomes[-1].problems else "FAIL"),
                  file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"case folders kept in {top}", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(top)
    header = (f"fault drill on {DEMO_CONFIG} (tiny sizes, MODEL.DEVICE cpu): {len(outcomes)} cases, "
              f"{sum(not o.problems for o in outcomes)} as expected, {time.monotonic() - started:.0f} s")
    table = header + "\n\n" + format_table(outcomes) + "\n"
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table)
    return 0 if all(not o.problems for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
