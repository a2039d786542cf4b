"""The configs that come with mabn_d2, looked up the way `detectron2.model_zoo.get_config_file`
looks up detectron2's: by their path under the configs folder.

A wheel carries the repository's `configs/` as `mabn_d2/configs/` (same layout, so the relative
`_BASE_` paths of the YAML files resolve there too); an editable install or a checkout reads the
repository's `configs/` itself.

    from mabn_d2 import model_zoo
    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml")
"""
import os
from typing import List

__all__ = ["CONFIG_SUFFIXES", "available_configs", "configs_dir", "get_config_file"]

CONFIG_SUFFIXES = (".yaml", ".py")  # YAML configs and LazyConfigs

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def configs_dir() -> str:
    """The folder holding the configs: `mabn_d2/configs` in an installed wheel, else the
    `configs/` of the source checkout this package is imported from."""
    installed = os.path.join(_PACKAGE_DIR, "configs")
    if os.path.isdir(installed):
        return installed
    checkout = os.path.dirname(_PACKAGE_DIR)
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")) and os.path.isdir(os.path.join(checkout, "configs")):
        return os.path.join(checkout, "configs")
    raise FileNotFoundError(
        f"mabn_d2's configs are not installed beside {_PACKAGE_DIR} (expected a 'configs' folder); "
        "reinstall mabn_d2 from its wheel or source checkout"
    )


def available_configs() -> List[str]:
    """Every name `get_config_file` accepts, '/'-separated and relative to the configs folder."""
    root = configs_dir()
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__")))
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(CONFIG_SUFFIXES):
                names.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(names)


def get_config_file(config_path: str) -> str:
    """The absolute path of the config `config_path`, e.g.
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml".

    FileNotFoundError, listing the available configs, for any other name.
    """
    name = config_path.replace(os.sep, "/").lstrip("/")
    if name.startswith("configs/"):  # the README's repository paths work too
        name = name[len("configs/"):]
    available = available_configs()
    if name not in available:
        raise FileNotFoundError(
            f"{config_path!r} is not a config of mabn_d2; available configs:\n  " + "\n  ".join(available)
        )
    return os.path.join(configs_dir(), *name.split("/"))
