"""mabn_d2 uses only public PyTorch: no torch.ops, no native_batch_norm*, nothing `_`-prefixed.

Private ATen entry points differ between devices (the CPU batch-norm backward accepts
arguments the CUDA one rejects), so the source is scanned for them.
"""
import ast
import os

import pytest

from .conftest import REPO_ROOT

PACKAGE_DIR = os.path.join(REPO_ROOT, "mabn_d2")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST):
    """'a.b.c' for a chain of attribute accesses on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


def _torch_path_violation(path: str):
    """Why the torch path 'torch.x.y' is not public API, or None."""
    parts = path.split(".")
    if parts[0] != "torch":
        return None
    if len(parts) > 1 and parts[1] == "ops":
        return "torch.ops (ATen operators)"
    if any(p.startswith("native_batch_norm") for p in parts):
        return "native_batch_norm (ATen internals)"
    private = [p for p in parts if _is_private(p)]
    if private:
        return f"private name {private[0]!r}"
    return None


def private_torch_uses(source: str, filename: str = "<source>"):
    """[(line, code, reason)] for each use of non-public PyTorch in `source`."""
    tree = ast.parse(source, filename)
    aliases = {}  # local name -> the torch path it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "torch":
                    continue
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases["torch"] = "torch"  # `import torch.x` binds the name torch
                found += [(node.lineno, f"import {alias.name}", why) for why in _violations(alias.name)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = path
                found += [(node.lineno, f"from {node.module} import {alias.name}", why) for why in _violations(path)]
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None), ast.Attribute):
            dotted = _dotted(node)  # the whole chain a.b.c, checked once
            root, _, rest = (dotted or "").partition(".")
            if root in aliases:
                path = aliases[root] + "." + rest
                found += [(node.lineno, dotted, why) for why in _violations(path)]
        elif isinstance(node, ast.Name) and node.id.startswith("native_batch_norm"):
            found.append((node.lineno, node.id, "native_batch_norm (ATen internals)"))
    return sorted(set(found))


def _violations(path: str):
    reason = _torch_path_violation(path)
    return [reason] if reason else []


def _package_sources():
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, REPO_ROOT), f.read()


def test_package_uses_only_public_torch():
    sources = list(_package_sources())
    assert any(path.endswith(os.path.join("layers", "mabn.py")) for path, _ in sources)
    offenders = [f"{path}:{line}: {code} ({reason})" for path, text in sources
                 for line, code, reason in private_torch_uses(text, path)]
    assert not offenders, "non-public PyTorch in mabn_d2:\n" + "\n".join(offenders)


def test_package_text_has_no_aten_entry_points():
    """A plain text scan as well, for what the parser cannot resolve (getattr, strings passed to eval)."""
    needles = ("torch.ops", "native_batch_norm", "torch._C", "_aten")
    hits = [f"{path}: {needle}" for path, text in _package_sources() for needle in needles if needle in text]
    assert not hits, hits


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.ops.aten.native_batch_norm_backward(a)",
        "import torch\n_aten = torch.ops.aten",
        "import torch\ntorch.native_batch_norm(x, w, b, m, v, False, 0.0, 1e-5)",
        "import torch\ntorch._C._get_tracing_state()",
        "import torch\ntorch.nn.functional._verify_batch_size(x.shape)",
        "import torch.nn.functional as F\nF._verify_batch_size(x.shape)",
        "from torch import ops\nops.aten.add(a, b)",
        "from torch._C import _nn",
        "import torch._dynamo",
        "from torch.utils._python_dispatch import TorchDispatchMode",
        "from torch.nn import functional\nfunctional._canonical_mask(a)",
        "from torch import native_batch_norm as nbn",
    ],
)
def test_scanner_flags_private_uses(snippet):
    assert private_torch_uses(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.nn.functional.batch_norm(x, m, v, w, b, False, 0.0, 1e-5)",
        "import torch\ntorch.linalg.vector_norm(x, dim=(0, 2, 3))",
        "import torch\nprint(torch.__version__)",
        "import torch\nnames = ('torch._dynamo', 'torch.onnx')",
        "from torch import nn\nnn.BatchNorm2d(3)._version",
    ],
)
def test_scanner_accepts_public_uses(snippet):
    assert not private_torch_uses(snippet), snippet
