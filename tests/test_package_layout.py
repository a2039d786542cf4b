"""The plugin stays apart from the research code: `import mabn_d2` loads neither it nor matplotlib."""
import subprocess
import sys

from .conftest import REPO_ROOT


def _modules_after(statement: str) -> set:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_mabn_d2_does_not_import_research_code():
    loaded = _modules_after("import mabn_d2")
    assert "mabn_d2.registry" in loaded and "mabn_d2.layers.mabn" in loaded
    assert not {m for m in loaded if m.startswith("mabn_d2.research")}
    assert "matplotlib" not in loaded


def test_research_code_imports_on_its_own():
    loaded = _modules_after("import mabn_d2.research.detection_study, mabn_d2.research.study")
    assert "mabn_d2.research.data" in loaded
