"""docs/results.md is what tools/make_results.py renders from the committed results/, and its
reading cites only figures that its tables hold."""
import importlib.util
import re
from pathlib import Path

import pytest

from research.run_records import load_records

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DOC = ROOT / "docs" / "results.md"
RECORD_FOLDERS = sorted({p.parent.name for p in RESULTS.glob("*/*_seed*.json")})  # every folder of run records
# box / mask AP pairs and mean ± std figures, the shapes the reading cites AP in
FIGURE = re.compile(r"\d+\.\d ± \d+\.\d|\d+\.\d / \d+\.\d")


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "tools" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_header(text: str) -> str:
    return text.split("\n", 3)[3]  # the first lines name the commit it was assembled at


def _table_text(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def _reading_texts():
    yield ROOT / "README.md"
    yield ROOT / "docs" / "results_reading.md"
    yield from sorted(RESULTS.glob("*/reading.md"))


def test_committed_doc_is_what_make_results_renders_from_results(tmp_path):
    rendered = _make_results().make_results(RESULTS, tmp_path / "docs" / "results.md")
    assert (tmp_path / "docs" / "detection_ap_curves.png").stat().st_size > 10_000
    assert _without_header(rendered) == _without_header(DOC.read_text()), \
        "docs/results.md is stale: run python tools/make_results.py and commit the result"


@pytest.mark.parametrize("folder", RECORD_FOLDERS)
def test_every_committed_run_has_its_row_in_the_doc(folder):
    records = load_records(str(RESULTS / folder))
    assert records, f"results/{folder} holds no run records"
    tables = _table_text(DOC.read_text())
    for record in records:
        final = record["curve"][max(record["curve"])]
        cell = f"{final['bbox/AP']:.1f} / {final['segm/AP']:.1f}"
        rows = [line for line in tables.splitlines() if line.startswith(f"| {record['variant']} ")]
        assert any(cell in row for row in rows), f"{folder}/{record['variant']}_seed{record['seed']}: no row with {cell}"


def test_every_figure_the_reading_and_readme_cite_is_in_a_table():
    tables = _table_text(DOC.read_text())
    cells = set()
    for line in tables.splitlines():
        for cell in line.strip("|").split("|"):
            cells.update(FIGURE.findall(cell))
            cells.update(part.strip() for part in cell.split(";"))
    missing = []
    for path in _reading_texts():
        for figure in FIGURE.findall(path.read_text()):
            # "a ± b / c ± d" is two figures, box and mask
            if figure not in cells and figure not in tables:
                missing.append(f"{path.relative_to(ROOT)}: {figure}")
    assert not missing, "figures cited by the reading that no table holds:\n" + "\n".join(missing)


def test_the_figure_check_catches_a_figure_no_table_holds(tmp_path):
    tables = _table_text(DOC.read_text())
    assert FIGURE.findall("MABN reached 99.9 / 98.8 and 12.3 ± 4.5")
    assert "99.9 / 98.8" not in tables


def test_a_record_without_its_keys_is_refused(tmp_path):
    (tmp_path / "BN_seed0.json").write_text('{"variant": "BN", "seed": 0, "curve": {"1": {}}}')
    with pytest.raises(ValueError, match="lacks keys"):
        load_records(str(tmp_path))
