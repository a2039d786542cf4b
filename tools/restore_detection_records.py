#!/usr/bin/env python
"""Restore results/detection_study/ from docs/results.md as git history holds it (run once).

The detection study's per-run metrics.json lived only under the ignored output/ and were lost;
the tables published at commits 27a7242 (BN, GN, MABN and the ablation) and a1ace5a (BRN), and
the reading at 58aa335 (BUFFER_SIZE 4, final AP only), are what survives. Each record says so
in its "source"; multi-seed rows keep the published mean ± std ("published_summary"), which is
the only trace of their per-seed AP50.

  python tools/restore_detection_records.py results/detection_study
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from mabn_d2.research.detection_study import VARIANTS
from mabn_d2.research.run_records import write_record

def section3(commit):
    text = subprocess.run(["git", "show", f"{commit}:docs/results.md"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    s = text[text.index("## 3. Detection"):text.index("## 4. Speed")]
    tables, cur = [], []
    for line in s.splitlines():
        if line.startswith("|"):
            cur.append([c.strip() for c in line.strip("|").split("|")])
        elif cur:
            tables.append(cur); cur = []
    if cur: tables.append(cur)
    return tables

def num(x):
    return None if x in ("–", "") else float(x)

records = {}
def rec(variant, seed):
    key = (variant, seed)
    if key not in records:
        v = VARIANTS[variant]
        records[key] = {"study": "detection_study", "variant": variant, "seed": seed, "description": v.description,
                        "curve": {}, "loss_windows": None, "commit": None, "wall_minutes": None,
                        "config_opts": ([v.config] if v.config else []) + list(v.opts), "source": None}
    return records[key]

def fill(commit, only=None):
    final, curves, loss, wall = section3(commit)
    src = f"restored from the tables of docs/results.md at commit {commit} (the run's metrics.json was not kept)"
    iters = [int(h.split()[1]) for h in curves[0][1:]]
    last = iters[-1]
    for row in final[2:]:
        variant, seeds = row[0], [int(s) for s in row[1].split(",")]
        if only and variant not in only: continue
        per_seed = [tuple(float(x) for x in p.split(" / ")) for p in row[6].split("; ")]
        summary = dict(zip(("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"), row[2:6]))
        for seed, (box, mask) in zip(seeds, per_seed):
            r = rec(variant, seed); r["source"] = src
            m = {"bbox/AP": box, "segm/AP": mask}
            if len(seeds) == 1:
                m.update({"bbox/AP50": float(row[3]), "segm/AP50": float(row[5])})
            else:
                r["published_summary"] = {"seeds": seeds, **summary}
            r["curve"][str(last)] = m
    for row in curves[2:]:
        variant = row[0]
        if only and variant not in only: continue
        for it, cell in zip(iters, row[1:]):
            if cell == "–": continue
            box, mask = (float(x) for x in cell.split(" / "))
            r = rec(variant, 0)
            r["curve"].setdefault(str(it), {}).update({"bbox/AP": box, "segm/AP": mask})
    edges_header = loss[0][1:]
    edges = [int(h.split()[1].split("-")[0]) for h in edges_header] + [int(edges_header[-1].split("-")[1])]
    for row in loss[2:]:
        m = re.match(r"(\S+)(?: \(seed (\d+)\))?", row[0])
        variant, seed = m.group(1), int(m.group(2) or 0)
        if only and variant not in only: continue
        rec(variant, seed)["loss_windows"] = {"edges": edges, "total_loss": [num(x) for x in row[1:]]}
    for row in wall[2:]:
        m = re.match(r"(.+)_seed(\d+)$", row[0])
        key = (m.group(1), int(m.group(2)))
        if key in records and (not only or key[0] in only):
            records[key]["wall_minutes"] = num(row[1]); records[key]["commit"] = row[2]

fill("27a7242")
fill("a1ace5a", only={"BRN"})
# BUFFER_SIZE 4: only its final box / mask AP survived, in the reading of commit 58aa335
r = rec("MABN_buffer_4", 0)
r.update(source="restored from the reading of docs/results.md at commit 58aa335 (final box / mask AP only; the run's metrics.json was not kept)",
         wall_minutes=21.2, commit="a059c2f")
r["curve"]["450"] = {"bbox/AP": 43.3, "segm/AP": 42.5}
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "results", "detection_study")
for (variant, seed), r in sorted(records.items()):
    print(write_record(out, r), len(r["curve"]), r["loss_windows"] is not None, r["commit"], r["wall_minutes"])
