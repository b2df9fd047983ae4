"""adsc-llava: Attention-Driven Self-Compression for LLaVA models on the Hugging Face hub.

The two modeling files stay at the repository's top level because every checkpoint ships them as remote code;
the `adsc_llava` package imports them from there in a source checkout, and `build_py` copies them into it for wheels.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_MODELING_FILES = ("configuration_adsc_llava.py", "modeling_adsc_llava.py")
# Oldest transformers release the test suite passes on (tests/test_packaging.py checks this is what is installed
# or newer; the release notes in README.md say how it was found).
MIN_TRANSFORMERS = "5.24.0"


class BuildPyWithModelingFiles(build_py):
    """Also copy the top-level modeling files into the built `adsc_llava` package."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install imports them from the source tree (adsc_llava/__init__.py)
            return
        self.mkpath(str(Path(self.build_lib) / "adsc_llava"))
        for name in SHIPPED_MODELING_FILES:
            self.copy_file(name, str(Path(self.build_lib) / "adsc_llava" / name))


setup(
    name="adsc-llava",
    version="0.1.0",
    description="Attention-Driven Self-Compression: cheaper LLaVA by dropping vision tokens inside the LLM",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["adsc_llava", "train"],
    package_data={"train": ["configs/*.json", "*.json"]},
    cmdclass={"build_py": BuildPyWithModelingFiles},
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
        "test": ["pytest", "hypothesis", "ruff", "matplotlib"],
        "flash": ["flash-attn"],
        "deepspeed": ["deepspeed"],
    },
)
