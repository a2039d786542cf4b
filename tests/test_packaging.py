"""mabn_d2 installs like any detectron2 add-on: pyproject.toml declares what the package imports,
the wheel carries the modules, the configs (found by `mabn_d2.model_zoo`) and the license, and a
Python without detectron2 is told how to get it."""
import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import mabn_d2
from mabn_d2 import model_zoo

from .conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib")

PACKAGE_DIR = os.path.join(REPO_ROOT, "mabn_d2")
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")
COCO_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml"
DEMO_CONFIG = "Demo/fmnist_mask_rcnn_R_18_FPN_mabn_bnheads.yaml"  # three _BASE_ levels, one of them "../"
INSTALL_SECTION = "Installing into a detectron2 environment"
# Import names whose distribution is named differently on PyPI.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}
# Imported but not declared: detectron2 is not on PyPI under its name (the README says how to
# install it); triton comes with torch's CUDA wheels and serves CUDA tensors only.
UNDECLARED = {"detectron2", "triton"}


def _pyproject() -> dict:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _source_files(root: str, suffixes) -> list:
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]
        found += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files if f.endswith(suffixes)]
    return sorted(found)


def _third_party_imports(files) -> set:
    names = set()
    for path in files:
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"mabn_d2", "__future__"}


# ----------------------------------------------------------------------------- pyproject.toml


def test_version_has_one_source():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", mabn_d2.__version__)
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mabn_d2.__version__"}


def test_dependencies_cover_what_the_package_imports():
    project = _pyproject()["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    extras = {key: {_name(r) for r in value} for key, value in project["optional-dependencies"].items()}
    assert {"torch", "torchvision", "numpy", "fvcore", "iopath", "pycocotools", "yacs", "omegaconf"} <= runtime
    assert extras["export"] == {"onnx", "onnxruntime", "onnxscript"} and extras["research"] == {"matplotlib"}
    assert "detectron2" not in runtime

    files = [os.path.join(PACKAGE_DIR, f) for f in _source_files(PACKAGE_DIR, ".py")]
    core = {DISTRIBUTIONS.get(n, n).lower() for n in _third_party_imports(files)}
    assert core - UNDECLARED - extras["export"] <= runtime, sorted(core - runtime)
    # the repository's research/ and demo_datasets/ (not installed) need the research extra at most
    beside = [os.path.join(REPO_ROOT, d, f) for d in ("research", "demo_datasets")
              for f in _source_files(os.path.join(REPO_ROOT, d), ".py")]
    everything = {DISTRIBUTIONS.get(n, n).lower() for n in _third_party_imports(beside)} - {"research", "demo_datasets"}
    assert everything - UNDECLARED <= runtime | extras["export"] | extras["research"], sorted(everything - runtime)


def test_license_is_apache_2_with_the_authors_copyright():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = open(os.path.join(REPO_ROOT, "LICENSE")).read()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "Copyright the mabn_d2 authors" in text and "[name of copyright owner]" not in text
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])


# ----------------------------------------------------------------------------- model_zoo


def test_model_zoo_finds_every_config_of_the_checkout():
    assert os.path.samefile(model_zoo.configs_dir(), CONFIGS_DIR)  # no mabn_d2/configs copy in a checkout
    shipped = _source_files(CONFIGS_DIR, (".yaml", ".py"))
    assert model_zoo.available_configs() == shipped and COCO_CONFIG in shipped and DEMO_CONFIG in shipped
    path = model_zoo.get_config_file(COCO_CONFIG)
    assert os.path.samefile(path, os.path.join(CONFIGS_DIR, COCO_CONFIG))
    assert model_zoo.get_config_file("configs/" + COCO_CONFIG) == path  # the README's paths work too


@pytest.mark.parametrize("name", ["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_9x_mabn.yaml", "../README.md",
                                  "Demo"])
def test_model_zoo_names_the_available_configs_for_an_unknown_one(name):
    with pytest.raises(FileNotFoundError) as error:
        model_zoo.get_config_file(name)
    message = str(error.value)
    assert repr(name) in message and "available configs" in message
    assert COCO_CONFIG in message and DEMO_CONFIG in message


# ----------------------------------------------------------------------------- without detectron2


def test_import_without_detectron2_says_how_to_install_it():
    # -S: no site-packages, so no detectron2 (nor torch: the message must come before either is needed)
    code = f"import sys; sys.path.insert(0, {REPO_ROOT!r}); import mabn_d2"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: mabn_d2 needs detectron2"), result.stderr[-2000:]
    assert "pip install" in last and f'"{INSTALL_SECTION}"' in last and sys.executable in last
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    assert f"## {INSTALL_SECTION}" in readme and "pip install -e ." in readme


# ----------------------------------------------------------------------------- the wheel


INSTALLED_CHECK = """
import json, sys
import mabn_d2
from detectron2.config import get_cfg
from mabn_d2 import add_mabn_config, model_zoo
cfg = get_cfg()
add_mabn_config(cfg)
cfg.merge_from_file(model_zoo.get_config_file(sys.argv[1]))
print(json.dumps({"package": mabn_d2.__file__, "version": mabn_d2.__version__,
                  "configs": model_zoo.configs_dir(), "cfg": cfg.dump()}))
"""


@pytest.mark.slow
def test_wheel_carries_modules_configs_license_and_version(tmp_path):
    source = tmp_path / "source"  # a clean copy: no build/ left in the repository, no stale files in the wheel
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO_ROOT, name), source / name)
    for name in ("mabn_d2", "configs"):
        shutil.copytree(os.path.join(REPO_ROOT, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = subprocess.run(
        ["nice", "-n", "19", sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), "."],
        cwd=source, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    assert wheel.name == f"mabn_d2-{mabn_d2.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"mabn_d2-{mabn_d2.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
        archive.extractall(tmp_path / "site")

    modules = {f"mabn_d2/{f}" for f in _source_files(PACKAGE_DIR, ".py")}
    configs = {f"mabn_d2/configs/{f}" for f in _source_files(CONFIGS_DIR, (".yaml", ".py"))}
    assert modules <= names and configs <= names, sorted((modules | configs) - names)
    packaged = {n for n in names if not n.startswith(info)}
    assert packaged == modules | configs, sorted(packaged - modules - configs)  # no tests, tools, caches
    assert not {n for n in names if n.split("/")[0] in ("research", "demo_datasets")
                or "/research/" in n or "/data/" in n}  # no study, benchmark or demo-data module
    fields = [line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line]
    assert ["Version", mabn_d2.__version__] in fields and ["License-Expression", "Apache-2.0"] in fields
    assert ["License-File", "LICENSE"] in fields and ["Provides-Extra", "export"] in fields
    assert ["Requires-Dist", "torch>=2.3"] in fields
    assert license_text == open(os.path.join(REPO_ROOT, "LICENSE")).read()

    # Installed (the wheel unpacked on sys.path): the configs resolve their _BASE_ chain from there.
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, DEMO_CONFIG], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    installed = json.loads(run.stdout.strip().splitlines()[-1])
    assert installed["package"] == str(site / "mabn_d2" / "__init__.py")
    assert installed["configs"] == str(site / "mabn_d2" / "configs") and installed["version"] == mabn_d2.__version__
    from detectron2.config import get_cfg

    cfg = get_cfg()
    mabn_d2.add_mabn_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS_DIR, DEMO_CONFIG))
    assert installed["cfg"] == cfg.dump()
