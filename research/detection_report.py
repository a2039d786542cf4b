"""Section 3 of docs/results.md, rendered from the committed run records alone (results/detection_study).

Tables: the final evaluation (mean ± sample std over seeds), AP at every evaluation (every run
that has a curve), mean training loss over windows (one table per window set), wall time and
commit per run. The figure plots every run: a line per run with a curve, a marker per final-only run.
"""
import statistics
from typing import Dict, List, Sequence

from mabn_d2.utils.atomic_io import atomic_write
from .benchmarking import markdown_table

__all__ = ["final_table", "curves_table_all", "loss_tables", "wall_table", "detection_report", "plot_records",
           "RECORD_METRICS"]

RECORD_METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")


def _variants(records: Sequence[Dict]) -> List[str]:
    return list(dict.fromkeys(r["variant"] for r in records))


def _final(record: Dict) -> Dict[str, float]:
    return record["curve"][max(record["curve"])]


def _summary_cell(runs: Sequence[Dict], key: str) -> str:
    # Restored multi-seed runs keep the published mean ± std (computed from unrounded AP, and the
    # only trace of their per-seed AP50): it is used while the seeds are the same ones.
    for r in runs:
        summary = r.get("published_summary") or {}
        if key in summary and sorted(summary["seeds"]) == sorted(x["seed"] for x in runs):
            return summary[key]
    values = [_final(r)[key] for r in runs if _final(r).get(key) is not None]
    if len(values) < len(runs):
        return "–"
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def final_table(records: Sequence[Dict]) -> str:
    rows = []
    for variant in _variants(records):
        runs = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        rows.append([variant, ", ".join(str(r["seed"]) for r in runs),
                     *[_summary_cell(runs, key) for key in RECORD_METRICS],
                     "; ".join(f"{_final(r)['bbox/AP']:.1f} / {_final(r)['segm/AP']:.1f}" for r in runs)])
    return markdown_table(["variant", "seeds", *RECORD_METRICS, "per seed box / mask AP"], rows)


def curves_table_all(records: Sequence[Dict], min_evaluations: int = 2) -> str:
    """Box / mask AP at every evaluated iteration, a row per run evaluated at least `min_evaluations` times."""
    runs = [r for r in records if len(r["curve"]) >= min_evaluations]
    iterations = sorted({it for r in runs for it in r["curve"]})
    rows = [[f"{r['variant']} (seed {r['seed']})",
             *[f"{r['curve'][it]['bbox/AP']:.1f} / {r['curve'][it]['segm/AP']:.1f}" if it in r["curve"] else "–"
               for it in iterations]] for r in runs]
    return markdown_table(["run", *[f"it. {it}" for it in iterations]], rows)


def loss_tables(records: Sequence[Dict]) -> List[str]:
    """Mean total_loss per window, one table per set of window edges."""
    by_edges: Dict[tuple, List[Dict]] = {}
    for r in records:
        if r["loss_windows"]:
            by_edges.setdefault(tuple(r["loss_windows"]["edges"]), []).append(r)
    tables = []
    for edges, runs in by_edges.items():
        header = ["run", *[f"it. {a}-{b}" for a, b in zip(edges, edges[1:])]]
        rows = [[f"{r['variant']} (seed {r['seed']})",
                 *[f"{x:.3f}" if x is not None else "–" for x in r["loss_windows"]["total_loss"]]] for r in runs]
        tables.append(f"Mean training loss (total_loss) between iterations {', '.join(map(str, edges))}:\n\n"
                      + markdown_table(header, rows))
    return tables


def wall_table(records: Sequence[Dict]) -> str:
    rows = [[f"{r['variant']}_seed{r['seed']}", "–" if r["wall_minutes"] is None else f"{r['wall_minutes']:.1f}",
             r["commit"] or "–", r["source"]] for r in records]
    return markdown_table(["run", "minutes", "commit", "source of the record"], rows)


def detection_report(records: Sequence[Dict]) -> str:
    if not records:
        raise ValueError("no detection run records to report")
    parts = ["Final evaluation, mean ± sample std over seeds:", "", final_table(records), "",
             "Box / mask AP at each evaluation:", "", curves_table_all(records), ""]
    for table in loss_tables(records):
        parts += [table, ""]
    parts += ["Wall time per run (training + evaluations, several runs sharing the 2 cores), the commit it "
              "trained at and where its record comes from:", "", wall_table(records)]
    return "\n".join(parts)


def plot_records(records: Sequence[Dict], path: str) -> str:
    """One PNG, box AP and mask AP against iteration: a line per run with a curve, a marker per final-only run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2), sharex=True)
    colors = {v: f"C{i % 10}" for i, v in enumerate(_variants(records))}
    markers = "osD^v"
    for r in records:
        iterations = sorted(r["curve"])
        label = f"{r['variant']} s{r['seed']}"
        for ax, key in zip(axes, ("bbox/AP", "segm/AP")):
            values = [r["curve"][it][key] for it in iterations]
            style = "-" if r["variant"].startswith("MABN") else ":"
            ax.plot(iterations, values, style if len(values) > 1 else "", marker=markers[r["seed"] % len(markers)],
                    color=colors[r["variant"]], label=label)
    for ax, title in zip(axes, ("box AP", "mask AP")):
        ax.set_xlabel("iteration")
        ax.set_ylabel(title)
        ax.set_title(f"{title} on fmnist_coco_val, every committed run")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
