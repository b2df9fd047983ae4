"""adsc-llava: Attention-Driven Self-Compression for LLaVA models on the Hugging Face hub.

Everything installs inside the one package `adsc_llava`: the top-level folders `train/`, `benchmarks/` and
`examples/shapes_demo/` become its subpackages `train`, `benchmarks` and `shapes_demo` (`package_dir`). The two
modeling files and the model card template stay at the repository's top level because every checkpoint ships them;
a source checkout imports them from there (`adsc_llava/__init__.py`), and `build_py` copies them into wheels.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# Top-level files that checkpoints carry (the modeling code, the model card template) and wheels copy in.
SHIPPED_FILES = (
    "configuration_adsc_llava.py",
    "modeling_adsc_llava.py",
    "configuration_adsc_llava_next.py",
    "modeling_adsc_llava_next.py",
    "configuration_adsc_llava_onevision.py",
    "modeling_adsc_llava_onevision.py",
    "configuration_adsc_qwen2_5_vl.py",
    "modeling_adsc_qwen2_5_vl.py",
    "configuration_adsc_qwen3_vl.py",
    "modeling_adsc_qwen3_vl.py",
    "model_card.md",
)
# What `transformers serve` needs (transformers' own `serving` extra, without its torch floor), for `adsc-llava serve`;
# the tests query the server with the official `openai` client.
SERVE_REQUIREMENTS = ["fastapi", "uvicorn", "pydantic>=2", "openai>=1.98.0"]
# The documentation site (mkdocs.yml, docs/): `mkdocs serve` / `mkdocs build --strict`, the API pages read from the
# docstrings (mkdocstrings' Python handler reads the source with griffe, without importing torch). tests/test_docs.py
# builds it, so the test extra carries these too.
DOCS_REQUIREMENTS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.29"]
# Subpackage -> its folder in the source tree.
SUBPACKAGE_FOLDERS = {
    "adsc_llava.train": "train",
    "adsc_llava.benchmarks": "benchmarks",
    "adsc_llava.shapes_demo": "examples/shapes_demo",
}
# ZeRO-3 trains LoRA with activation checkpointing from 0.19.3 on (deepspeedai/DeepSpeed#8148; train/trainer.py).
DEEPSPEED = "deepspeed>=0.19.3"
# Oldest transformers release the test suite passes on (tests/test_packaging.py checks this is what is installed
# or newer; docs/models.md, "Compatibility", says how it was found).
MIN_TRANSFORMERS = "5.24.0"


class BuildPyWithShippedFiles(build_py):
    """Also copy the top-level shipped files into the built `adsc_llava` package."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install imports them from the source tree (adsc_llava/__init__.py)
            return
        self.mkpath(str(Path(self.build_lib) / "adsc_llava"))
        for name in SHIPPED_FILES:
            self.copy_file(name, str(Path(self.build_lib) / "adsc_llava" / name))


setup(
    name="adsc-llava",
    version="0.1.0",
    description="Attention-Driven Self-Compression: cheaper LLaVA by dropping vision tokens inside the LLM",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["adsc_llava", *SUBPACKAGE_FOLDERS],
    package_dir=SUBPACKAGE_FOLDERS,
    package_data={"adsc_llava": ["configs/*.json"], "adsc_llava.train": ["*.json"]},
    cmdclass={"build_py": BuildPyWithShippedFiles},
    entry_points={
        "console_scripts": ["adsc-llava = adsc_llava.cli:main"],
        "lmms_eval.models": ["adsc_llava = adsc_llava.lmms_eval_plugin:MANIFEST"],
    },
    install_requires=[
        "torch>=2.4",
        f"transformers>={MIN_TRANSFORMERS},<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "huggingface_hub>=1.0",
        "safetensors",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "plot": ["matplotlib"],
        "serve": SERVE_REQUIREMENTS,
        "docs": DOCS_REQUIREMENTS,
        "test": [
            "pytest",
            "hypothesis",
            "ruff",
            "matplotlib",
            "parameterized",
            DEEPSPEED,
            *SERVE_REQUIREMENTS,
            *DOCS_REQUIREMENTS,
        ],
        # lmms-eval imports filelock._api, which filelock 4.3 removed; build with eval/lmms_eval_env.sh.
        "eval": ["lmms-eval==0.7.3", "filelock<4.3"],
        "flash": ["flash-attn"],
        "deepspeed": [DEEPSPEED],
    },
)
