"""Packaging: with this project installed, pip's resolver counts it as the `tinker` a package asks
for (`tinker>=0.23`, as the cookbook requires, up to `tinker>=0.38`), so installing such a package
never replaces it with the official SDK; and `tinker.__version__` is the distribution's version.

Offline: the project's real metadata is built with its own build backend (PEP 517
prepare_metadata_for_build_wheel: no compiling), placed in an empty virtual environment, and pip
(`--no-index`, `--dry-run`) resolves a small package that requires tinker, with a look-alike of
the official 0.38.0 wheel offered beside it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tinker

ROOT = Path(__file__).resolve().parent.parent


def _wheel(directory: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal pure-Python wheel (METADATA, WHEEL, RECORD and an empty package)."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{name}/__init__.py": b"", f"{dist_info}/METADATA": metadata.encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    target = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return target


@pytest.fixture(scope="module")
def project_metadata(tmp_path_factory) -> Path:
    """The .dist-info directory the project's build backend makes from pyproject.toml."""
    out = tmp_path_factory.mktemp("metadata")
    script = "import sys\nfrom setuptools import build_meta\nprint(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


def _metadata_version(dist_info: Path) -> str:
    return re.search(r"^Version: (.+)$", (dist_info / "METADATA").read_text(), re.M).group(1)


def test_version_is_the_distributions(project_metadata):
    assert _metadata_version(project_metadata) == tinker.__version__ == "0.38.0+local"
    assert project_metadata.name == f"tinker-{tinker.__version__}.dist-info"


def test_installed_metadata_agrees_when_installed_from_here():
    # The environment's installed tinker, if it is this checkout, reports the same version (an
    # editable install of an older commit is reinstalled by `pip install -e .`).
    # (the installed dist-info, not a source tree's tinker.egg-info that sys.path may list first)
    installed = [d for d in importlib.metadata.distributions(name="tinker") if d.read_text("direct_url.json")]
    if not installed:
        pytest.skip("tinker is not installed in this environment (run from a source tree)")
    dist = installed[0]
    url = dist.read_text("direct_url.json") or ""
    if ROOT.as_uri() not in url:
        pytest.skip(f"the installed tinker is another checkout ({url})")
    assert dist.version == tinker.__version__


def _environment_with(tmp_path: Path, dist_info: Path, version: str) -> Path:
    """An empty venv whose only package is tinker's metadata at `version` (its own requirements
    left out: this is about the version pip sees, not about tinker's dependencies)."""
    venv = tmp_path / f"venv-{version}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    target = Path(purelib) / f"tinker-{version}.dist-info"
    shutil.copytree(dist_info, target)
    text = (target / "METADATA").read_text()
    text = re.sub(r"^Requires-Dist: .*\n", "", text, flags=re.M)
    (target / "METADATA").write_text(re.sub(r"^Version: .*$", f"Version: {version}", text, count=1, flags=re.M))
    return python


def _pip_resolve(python: Path, index: Path, package: str) -> subprocess.CompletedProcess:
    # --isolated: no user or site pip configuration (extra find-links, indexes) takes part
    return subprocess.run([sys.executable, "-m", "pip", "--isolated", "--python", str(python), "install",
                           "--no-index", "--find-links", str(index), "--dry-run", package],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("requirement", ["tinker>=0.23", "tinker>=0.38", "tinker==0.38.0", "tinker~=0.38"])
def test_pip_keeps_this_package_for_a_tinker_requirement(tmp_path, project_metadata, requirement):
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "needs_tinker", "1.0", [requirement])
    _wheel(index, "tinker", "0.38.0", [])  # the official SDK, as an index would offer it
    python = _environment_with(tmp_path, project_metadata, tinker.__version__)
    done = _pip_resolve(python, index, "needs_tinker")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Requirement already satisfied: {requirement}" in done.stdout, done.stdout
    would_install = re.search(r"^Would install (.*)$", done.stdout, re.M).group(1).split()
    assert [w.replace("_", "-") for w in would_install] == ["needs-tinker-1.0"], done.stdout


def test_an_old_version_would_have_been_replaced(tmp_path, project_metadata):
    # The control: the same environment at the project's old version makes pip fetch tinker, so
    # the test above can tell the two apart.
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "needs_tinker", "1.0", ["tinker>=0.23"])
    _wheel(index, "tinker", "0.38.0", [])
    done = _pip_resolve(_environment_with(tmp_path, project_metadata, "0.1.0"), index, "needs_tinker")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tinker-0.38.0" in re.search(r"^Would install (.*)$", done.stdout, re.M).group(1)
