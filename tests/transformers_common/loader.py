"""Fetch transformers' `tests/test_modeling_common.py` from its PyPI source release and import it."""

import importlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers
from filelock import FileLock

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "transformers-tests" / transformers.__version__
PACKAGE = "transformers_upstream_tests"
# The two modules `test_modeling_common.py` imports that the source release does not ship: empty stand-ins.
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def fetch_source_release() -> Path:
    """The folder holding transformers' `tests/` files of the installed version (downloaded once).

    Several test processes (pytest-xdist workers) may ask at once: one downloads, the others wait on the lock.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / f"{PACKAGE}.lock")):
        return _fetch_source_release_unlocked()


def _fetch_source_release_unlocked() -> Path:
    package_dir = CACHE / PACKAGE
    if (package_dir / "test_modeling_common.py").is_file():
        return CACHE
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation"]
    command += [f"transformers=={transformers.__version__}", "-d", str(CACHE), "-q"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    (archive,) = CACHE.glob("transformers-*.tar.gz")
    staging = CACHE / f"{PACKAGE}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    with tarfile.open(archive) as release:
        prefix = f"transformers-{transformers.__version__}/tests/"
        for member in release.getmembers():
            if member.name.startswith(prefix) and member.name.count("/") == 2 and member.name.endswith(".py"):
                target = staging / member.name.removeprefix(prefix)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(release.extractfile(member).read())
    for name, text in STAND_INS.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
        (staging / name).parent.joinpath("__init__.py").touch()
    (staging / "__init__.py").touch()
    staging.rename(package_dir)  # complete or absent: an interrupted download is redone
    return CACHE


def load_model_tester_mixin():
    """transformers' `tests/test_modeling_common.py` as a module."""
    root = str(fetch_source_release())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
