"""kd_jax: knowledge and dataset distillation in JAX/Flax."""
import re
from pathlib import Path

from setuptools import find_packages, setup

_VERSION = re.search(r'__version__ = "([^"]+)"',
                     (Path(__file__).parent / "kd_jax" / "__init__.py").read_text()).group(1)

setup(
    name="kd_jax",
    version=_VERSION,
    description="Knowledge distillation and trajectory-matching dataset distillation in JAX/Flax.",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kd_jax", "kd_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.5",
        "chex>=0.1.87",
        "ml-collections>=0.1.1",
        "numpy",
        "absl-py",          # flags / logging, as in every JAX trainer
        "tqdm",             # progress bar with rate and ETA
        "scikit-learn",     # ships the embedded digits dataset (no network needed)
        "tensorboardX",     # TensorBoard event files without TensorFlow
        "matplotlib",       # learning curves and synthetic-image grids
        "pillow",           # TFDS image decoding without TensorFlow; resizing
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist",
            "jupytext",
            "nbclient",
            "ipykernel",
            # API reference (docs/, built with -W by tests/test_docs.py)
            "sphinx>=8.1,<10",
            "myst-parser>=4,<6",   # docs/design.md in the site
        ],
    },
)
