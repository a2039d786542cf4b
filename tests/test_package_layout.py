"""The package's rooms: the installed package is the plugin alone (the repository's research/ and
demo_datasets/ sit beside it and are never imported by it); `import mabn_d2` loads the norm and
its detectron2 integration only (no trainer, no matplotlib); user tools import no research code."""
import subprocess
import sys

from .conftest import REPO_ROOT


def _modules_after(statement: str) -> set:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_mabn_d2_does_not_import_research_code():
    loaded = _modules_after("import mabn_d2")
    assert "mabn_d2.modeling.registry" in loaded and "mabn_d2.layers.mabn" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("research", "demo_datasets") or m.startswith("mabn_d2.engine")}
    assert "matplotlib" not in loaded


# The tools a user of the plugin runs, the GPU check (the layers' own check, mabn_d2.layers.cuda_check)
# among them; the others (studies, benchmarks, benchmark_cuda.py, which adds the ablation layers and
# the timings to the GPU check) are research tools. train_net and fold_mabn register the demo's
# datasets from the repository's demo_datasets/, which is not research.
USER_TOOLS = ("train_net.py", "fold_mabn.py", "convert_pretrained.py", "reestimate_mabn_stats.py", "check_cuda.py")


def test_user_tools_import_no_research_code():
    import ast
    import os

    for name in USER_TOOLS:
        path = os.path.join(REPO_ROOT, "tools", name)
        tree = ast.parse(open(path).read(), path)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        research = sorted(m for m in imported if m.split(".")[0] == "research")
        assert not research, f"tools/{name} imports research code: {research}"


def test_research_code_imports_on_its_own():
    loaded = _modules_after("import research.detection_study, research.small_batch_study")
    assert {"research.detection_study", "research.small_batch_study"} <= loaded


def test_the_plugin_never_imports_research_or_the_demo_datasets():
    """Not at module level, not inside a function: a wheel without them must work."""
    import ast
    import os

    offenders = []
    for root, _, files in os.walk(os.path.join(REPO_ROOT, "mabn_d2")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            tree = ast.parse(open(path).read(), path)
            modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            bad = sorted(m for m in modules if m.split(".")[0] in ("research", "demo_datasets"))
            if bad:
                offenders.append(f"{os.path.relpath(path, REPO_ROOT)}: {bad}")
    assert not offenders, offenders


def _module_level_imports(path, module):
    """The mabn_d2 modules `module` (at `path`) imports, at module level or inside functions."""
    import ast

    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mabn_d2"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mabn_d2":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return found


def test_no_import_circle_in_the_package():
    import os

    from .conftest import REPO_ROOT

    modules = {}
    for root, _, files in os.walk(os.path.join(REPO_ROOT, "mabn_d2")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    graph = {m: {t for t in _module_level_imports(p, m) if t in modules and t != m} for m, p in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package importing its own submodules is how packages work; a circle between modules is not
    real = [c for c in cycles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
    assert not real, f"import circles: {real}"
