#!/usr/bin/env python
"""Assemble docs/results.md and its figures from the committed results/ folder alone.

No number is typed by hand, and nothing is read from the ignored output/: a checkout with
results/ regenerates the same document.

  results/small_batch_study/section.md, *.png   section 1, as tools/small_batch_study.py rendered it
  results/batch_stats/section.md, *.png         section 2, as tools/plot_batch_stats.py's output rendered it
  results/detection_study/<run>.json, command.txt, reading.md   section 3, tables and curves rendered here
  results/detection_long_schedule/<run>.json   section 3.1 (GPU, 3,000 iterations)
  results/benchmarks/section.md                 section 4, the benchmark scripts' tables
  results/paper_setting*/<run>.json, intro.md, command.txt, reading.md   section 5, one subsection per schedule
  results/paper_recipe/<run>.json, intro.md, command.txt, reading.md     section 6, official recipe
  results/health_demo/mabn_scalars.json, results/health_overhead.json   section 7, MABN's health scalars
docs/results_reading.md is the hand-written reading, included verbatim at the top.

  python tools/make_results.py                       # regenerate docs/results.md
  python tools/make_results.py --import-study output/small_batch_study   # refresh a committed section
  python tools/make_results.py --import-batch-stats output/batch_stats
Detection and paper-setting records are written into results/ by their study tools.
"""
import sys
import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

from mabn_d2.utils.atomic_io import atomic_write_text
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # demo_datasets/, research/
from research.benchmarking import markdown_table
from research.detection_report import curves_table_all, detection_report, plot_records
from research.health_report import health_section, plot_health_scalars
from research.paper_setting_report import chi2_layer_table, paper_setting_table
from research.run_records import load_records

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "results"
STATS = ("mu_B", "sigma2_B", "g_B", "Psi_B")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _optional_text(path: Path, wrap: str = "{}") -> List[str]:
    return [wrap.format(path.read_text().strip()), ""] if path.exists() else []


def committed_section(folder: Path) -> List[str]:
    """A section committed as rendered markdown; its figures stay in results/ and docs/results.md
    links them there (docs/ and results/ are siblings in the repository; one copy of each figure)."""
    text = (folder / "section.md").read_text().strip()
    for png in sorted(folder.glob("*.png")):
        text = text.replace(f"]({png.name})", f"](../results/{folder.name}/{png.name})")
    return [text, ""]


def detection_section(folder: Path, docs: Path) -> List[str]:
    records = load_records(str(folder))
    plot_records(records, str(docs / "detection_ap_curves.png"))
    return ["## 3. Detection: the demo's Mask R-CNN, norms and MABN settings", "",
            *_optional_text(folder / "command.txt", "Command: `{}`"),
            detection_report(records), "", "![AP against iteration](detection_ap_curves.png)", "",
            *_optional_text(folder / "reading.md")]


def long_schedule_section(folder: Path) -> List[str]:
    records = load_records(str(folder))
    sources = sorted({r["source"] for r in records})
    return ["### 3.1 The same task on a 3,000-iteration schedule", "",
            f"One seed per variant; {'; '.join(sources)}.", "", curves_table_all(records, min_evaluations=1), ""]


def paper_setting_folders(results: Path) -> List[Path]:
    """The paper-setting studies' record folders (results/paper_setting*), longest schedule first."""
    folders = [f for f in results.glob("paper_setting*") if list(f.glob("*_seed*.json"))]

    def steps(folder: Path) -> int:
        return max(int(max(r["curve"], key=int)) for r in load_records(str(folder)))

    return sorted(folders, key=lambda f: (-steps(f), f.name))


def paper_setting_section(folders: List[Path]) -> List[str]:
    """Section 5: one subsection per schedule, each with its setting, commits, table and reading."""
    lines = ["## 5. Paper setting in one process: 8 virtual GPUs x 2 images (SGD batch 16)", ""]
    for number, folder in enumerate(folders, start=1):
        records = load_records(str(folder))
        settings = sorted({r.get("setting", "") for r in records} - {""})
        commits = sorted({r["commit"] for r in records if r["commit"]})
        steps = max(int(max(r["curve"], key=int)) for r in records)
        lines += [f"### 5.{number} {steps} steps (results/{folder.name})", "",
                  *(f"Setting: {s}." for s in settings), f"Trained at commit(s) {', '.join(commits)}.", "",
                  *_optional_text(folder / "intro.md"), paper_setting_table(records), "",
                  *_optional_text(folder / "reading.md"), *_optional_text(folder / "command.txt", "Reproduce: `{}`")]
    return lines


def official_recipe_section(folder: Path) -> List[str]:
    """Section 6, "official recipe": the study under the authors' solver scaled to its schedule; the
    three arms of the question, the one-change attribution arms, and the chi2 scatter beside its control."""
    records = load_records(str(folder))
    main_arms = ("SyncBN16", "BN2", "MABN_per_gpu")
    question = [r for r in records if r["variant"] in main_arms]
    attribution = [r for r in records if r["variant"] not in main_arms or r["variant"] == "MABN_per_gpu" and r["seed"] == 0]
    settings = sorted({r.get("setting", "") for r in records} - {""})
    commits = sorted({r["commit"] for r in records if r["commit"]})
    lines = ["## 6. Official recipe: 8 virtual GPUs x 2 images under the authors' solver", "",
             f"Records in results/{folder.name}.", *(f"Setting: {s}." for s in settings),
             f"Trained at commit(s) {', '.join(commits)}.", "", *_optional_text(folder / "intro.md")]
    if question:
        lines += ["### 6.1 SyncBN(16), BN(2) and MABN per GPU", "", paper_setting_table(question), ""]
    subsection = 2
    if len(attribution) > 1:
        lines += ["### 6.2 Attribution: one change to MABN_per_gpu per arm (seed 0)", "",
                  paper_setting_table(attribution), ""]
        subsection = 3
    layer_table = chi2_layer_table(records)
    if layer_table:
        lines += [f"### 6.{subsection} The chi2 scatter and its control, per tracked layer (first seed of each arm)", "",
                  "Median over steps of the per-step median over channels of |log ratio| (signed median in "
                  "brackets). Against the SMA: what MABN divides by once moving averages are on. Against "
                  "chi2_step: the same statistic pooled over the step's 16 images at the same weights, where "
                  "nothing is stale; for BN layers the statistic is the batch variance.", "", layer_table, ""]
    lines += [*_optional_text(folder / "reading.md"), *_optional_text(folder / "command.txt", "Reproduce: `{}`")]
    return lines


def health_scalars_section(results: Path, docs: Path) -> List[str]:
    """Section 7: the demo run's mabn/ scalars (figure rendered here) and the health hook's measured cost."""
    demo_path, overhead_path = results / "health_demo" / "mabn_scalars.json", results / "health_overhead.json"
    demo = json.loads(demo_path.read_text()) if demo_path.exists() else None
    overhead = json.loads(overhead_path.read_text()) if overhead_path.exists() else None
    figure = "health_demo_scalars.png"
    if demo is not None:
        plot_health_scalars(demo, str(docs / figure))
    return health_section(demo, overhead, figure)


# ----------------------------------------------------------------------- importing fresh tool outputs
def import_study(study_dir: Path, folder: Path) -> None:
    """Render tools/small_batch_study.py's output into the committed section 1."""
    commits = sorted({json.loads(p.read_text()).get("git_commit", "unknown")[:7]
                      for p in study_dir.glob("*_seed*.json")})
    text = "\n".join(line for line in (study_dir / "results.md").read_text().strip().splitlines()
                     if "](accuracy_curves.png)" not in line)
    lines = ["## 1. Small-batch study: Fashion-MNIST classification", "",
             *_optional_text(study_dir / "command.txt", "Command: `{}`"),
             f"Runs trained at commit(s) {', '.join(commits)}.", "", text, ""]
    folder.mkdir(parents=True, exist_ok=True)
    if (study_dir / "accuracy_curves.png").exists():
        shutil.copyfile(study_dir / "accuracy_curves.png", folder / "accuracy_curves.png")
        lines += ["![test accuracy curves](accuracy_curves.png)", ""]
    atomic_write_text(str(folder / "section.md"), "\n".join(lines))


def import_batch_stats(stats_dir: Path, folder: Path) -> None:
    """Render tools/plot_batch_stats.py's fluctuation.json into the committed section 2."""
    fluctuation = json.loads((stats_dir / "fluctuation.json").read_text())
    labels = list(fluctuation)
    reference = "BN(32)" if "BN(32)" in fluctuation else labels[0]
    rows = []
    for label in labels:
        for layer, values in fluctuation[label].items():
            rows.append([label, layer] + [f"{values[s]['relative']:.3f}" for s in STATS]
                        + [f"{values[s]['absolute'] / fluctuation[reference][layer][s]['absolute']:.2f}" for s in STATS])
    header = ["norm", "layer"] + [f"rel. {s}" for s in STATS] + [f"abs. {s} / {reference}" for s in STATS]
    lines = ["## 2. Batch statistics at normalization batch 2 vs 32", "",
             *_optional_text(stats_dir / "command.txt", "Command: `{}`"),
             "Fluctuation of each statistic around its moving average (second half of training; relative = "
             "mean |s - SMA| / mean |SMA|; absolute as a ratio to BN(32)):", "", markdown_table(header, rows), ""]
    folder.mkdir(parents=True, exist_ok=True)
    for png in sorted(stats_dir.glob("batch_stats_*.png")):
        shutil.copyfile(png, folder / png.name)
        lines += [f"![batch statistics]({png.name})", ""]
    atomic_write_text(str(folder / "section.md"), "\n".join(lines))


def make_results(results: Path = RESULTS, output: Path = DOCS / "results.md") -> str:
    """docs/results.md from results/ (every section whose folder exists), written atomically."""
    import detectron2
    import torch

    docs = output.parent
    docs.mkdir(parents=True, exist_ok=True)
    lines = ["# Results", "",
             f"Assembled at commit `{_git_commit()}` by `tools/make_results.py` from the committed metrics and "
             f"tool outputs in results/ (torch {torch.__version__}, detectron2 {detectron2.__version__}). "
             "Each section says the commit its runs trained at.", ""]
    lines += _optional_text(DOCS / "results_reading.md")  # hand-written, always the checkout's
    if (results / "small_batch_study" / "section.md").exists():
        lines += committed_section(results / "small_batch_study")
    if (results / "batch_stats" / "section.md").exists():
        lines += committed_section(results / "batch_stats")
    if list((results / "detection_study").glob("*_seed*.json")):
        lines += detection_section(results / "detection_study", docs)
    if list((results / "detection_long_schedule").glob("*_seed*.json")):
        lines += long_schedule_section(results / "detection_long_schedule")
    if (results / "benchmarks" / "section.md").exists():
        lines += committed_section(results / "benchmarks")
    if paper_setting_folders(results):
        lines += paper_setting_section(paper_setting_folders(results))
    if list((results / "paper_recipe").glob("*_seed*.json")):
        lines += official_recipe_section(results / "paper_recipe")
    if (results / "health_demo" / "mabn_scalars.json").exists() or (results / "health_overhead.json").exists():
        lines += health_scalars_section(results, docs)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"
    atomic_write_text(str(output), text)
    return text


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the committed results folder")
    parser.add_argument("--output", type=Path, default=DOCS / "results.md")
    parser.add_argument("--import-study", type=Path, help="a tools/small_batch_study.py output dir to commit")
    parser.add_argument("--import-batch-stats", type=Path, help="a tools/plot_batch_stats.py output dir to commit")
    args = parser.parse_args(argv)
    if args.import_study:
        import_study(args.import_study, args.results / "small_batch_study")
    if args.import_batch_stats:
        import_batch_stats(args.import_batch_stats, args.results / "batch_stats")
    text = make_results(args.results, args.output)
    print(f"wrote {args.output}")
    return text


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
