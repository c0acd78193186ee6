"""Install with `pip install -e .`; runtime pins live in requirements.txt."""
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith(("pytest",))
]

setup(
    name="moe-asr",
    version="0.1.0",
    description="Streaming Mixture-of-Experts U2++ speech recognition with DeepSpeed expert parallelism",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The folder kernels/ installs as `moe_asr_kernels`: the name `kernels` belongs to another PyPI project.
    packages=find_packages(include=["moe_asr", "moe_asr.*"])
    + ["moe_asr_kernels"] + [f"moe_asr_kernels.{p}" for p in find_packages("kernels")],
    package_dir={"moe_asr_kernels": "kernels"},
    install_requires=[r for r in requirements if not r.startswith("pytest")],
    entry_points={"console_scripts": ["moe-asr=moe_asr.cli:main"]},
)
