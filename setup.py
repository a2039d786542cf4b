from setuptools import find_packages, setup

setup(
    name="mabn_d2",
    version="0.1.0",
    description="Moving Average Batch Normalization (MABN) for detectron2",
    packages=find_packages(include=["mabn_d2", "mabn_d2.*"]),
    python_requires=">=3.9",
    # detectron2 is installed from its own wheel index (see README); the research subpackage
    # (studies, demo, benchmarks) also needs matplotlib.
    install_requires=["torch", "numpy"],
    extras_require={"research": ["matplotlib"]},
)
