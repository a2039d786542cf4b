#!/usr/bin/env python
"""Assemble docs/results.md from the result files the study tools wrote.

Tables and figures are copied from the tools' outputs (no number is typed by hand); the
commit, versions and wall times are read from those outputs and this checkout. The reading of
the results is the hand-written docs/results_reading.md, included verbatim.

  python tools/make_results.py --study output/small_batch_study --batch-stats output/batch_stats \
      --detection output/detection_study --demo output/demo_mabn --benchmarks output/benchmarks
"""
import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

import detectron2
import torch

from mabn_d2.atomic_io import atomic_write_text
from mabn_d2.research.benchmarking import markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"
STATS = ("mu_B", "sigma2_B", "g_B", "Psi_B")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=DOCS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _commit_at(log: Path) -> str:
    """The commit checked out when a detectron2 run started (first timestamp of its log.txt)."""
    import datetime
    import re

    match = re.search(r"\[(\d\d)/(\d\d) (\d\d:\d\d:\d\d)", log.read_text())
    if not match:
        return "unknown"
    year = datetime.date.fromtimestamp(log.stat().st_mtime).year
    when = f"{year}-{match.group(1)}-{match.group(2)} {match.group(3)}"
    try:
        out = subprocess.run(["git", "rev-list", "-1", f"--before={when}", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=DOCS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out[:7] or "unknown"


def _command(result_dir: Path) -> List[str]:
    """The command line saved beside the results (command.txt), if any."""
    path = result_dir / "command.txt"
    return [f"Command: `{path.read_text().strip()}`", ""] if path.exists() else []


def _copy_figure(source: Path, name: str) -> str:
    shutil.copyfile(source, DOCS / name)
    return name


def study_section(study_dir: Path) -> List[str]:
    commits = sorted({json.loads(p.read_text()).get("git_commit", "unknown")[:7]
                      for p in study_dir.glob("*_seed*.json")})
    lines = ["## 1. Small-batch study: Fashion-MNIST classification", "", *_command(study_dir),
             f"Runs trained at commit(s) {', '.join(commits)}.", ""]
    # the study's own results.md links its figure by a name docs/ does not use: the copy is linked below
    text = "\n".join(line for line in (study_dir / "results.md").read_text().strip().splitlines()
                     if "](accuracy_curves.png)" not in line)
    lines += [text, ""]
    if (study_dir / "accuracy_curves.png").exists():
        lines += [f"![test accuracy curves]({_copy_figure(study_dir / 'accuracy_curves.png', 'study_accuracy_curves.png')})", ""]
    return lines


def batch_stats_section(stats_dir: Path) -> List[str]:
    fluctuation = json.loads((stats_dir / "fluctuation.json").read_text())
    lines = ["## 2. Batch statistics at normalization batch 2 vs 32", "", *_command(stats_dir),
             "Fluctuation of each statistic around its moving average (second half of training; relative = "
             "mean |s - SMA| / mean |SMA|; absolute as a ratio to BN(32)):", ""]
    labels = list(fluctuation)
    reference = "BN(32)" if "BN(32)" in fluctuation else labels[0]
    rows = []
    for label in labels:
        for layer, values in fluctuation[label].items():
            rows.append([label, layer] + [f"{values[s]['relative']:.3f}" for s in STATS]
                        + [f"{values[s]['absolute'] / fluctuation[reference][layer][s]['absolute']:.2f}" for s in STATS])
    header = ["norm", "layer"] + [f"rel. {s}" for s in STATS] + [f"abs. {s} / {reference}" for s in STATS]
    lines += [markdown_table(header, rows), ""]
    for png in sorted(stats_dir.glob("batch_stats_*.png")):
        lines += [f"![batch statistics]({_copy_figure(png, png.name)})", ""]
    return lines


def detection_section(detection_dir: Path) -> List[str]:
    lines = ["## 3. Detection: the demo's Mask R-CNN, norms and MABN settings", "", *_command(detection_dir),
             (detection_dir / "results.md").read_text().strip(), ""]
    if (detection_dir / "ap_curves.png").exists():
        lines += [f"![AP against iteration]({_copy_figure(detection_dir / 'ap_curves.png', 'detection_ap_curves.png')})",
                  ""]
    # code_commit.txt in a run's folder (written by the study), else in the study's folder (the
    # fixed checkout the study ran from), else the commit the run's log was written at
    pinned = detection_dir / "code_commit.txt"
    walls = []
    for run in sorted(p for p in detection_dir.iterdir() if (p / "metrics.json").exists()):
        wall = run / "wall_time.txt"
        minutes = f"{sum(float(x) for x in wall.read_text().split()) / 60:.1f}" if wall.exists() else "–"
        log = run / "log.txt"
        own = run / "code_commit.txt"
        if own.exists():
            commit = own.read_text().strip()
        else:
            commit = pinned.read_text().strip() if pinned.exists() else (_commit_at(log) if log.exists() else "–")
        walls.append([run.name, minutes, commit])
    for run in sorted(detection_dir.glob("*/NOTE.txt")):
        lines += [f"{run.parent.name}: {run.read_text().strip()}", ""]
    if walls:
        lines += ["Wall time per run (training + evaluations, several runs sharing the 2 cores) and the commit "
                  "it started at:", "", markdown_table(["run", "minutes", "commit"], walls), ""]
    return lines


def text_section(title: str, path: Path) -> List[str]:
    return [f"## {title}", "", "```", path.read_text().strip(), "```", ""]


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path)
    parser.add_argument("--batch-stats", type=Path)
    parser.add_argument("--detection", type=Path)
    parser.add_argument("--benchmarks", type=Path, help="directory with *.txt outputs of tools/benchmark_*.py")
    parser.add_argument("--output", type=Path, default=DOCS / "results.md")
    args = parser.parse_args(argv)
    DOCS.mkdir(exist_ok=True)
    lines = ["# Results", "",
             f"Assembled at commit `{_git_commit()}` by `tools/make_results.py` from the outputs of the "
             f"committed tools (torch {torch.__version__}, detectron2 {detectron2.__version__}, "
             f"{os.cpu_count()} CPU cores, no GPU).", ""]
    reading = DOCS / "results_reading.md"
    if reading.exists():
        lines += [reading.read_text().strip(), ""]
    if args.study:
        lines += study_section(args.study)
    if args.batch_stats:
        lines += batch_stats_section(args.batch_stats)
    if args.detection:
        lines += detection_section(args.detection)
    if args.benchmarks:
        for path in sorted(args.benchmarks.glob("*.txt")):
            lines += text_section(f"Benchmark: {path.stem}", path)
    text = "\n".join(lines)
    atomic_write_text(str(args.output), text)
    print(f"wrote {args.output}")
    return text


if __name__ == "__main__":
    main()
