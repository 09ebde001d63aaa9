"""The repository installs as one import name, ``tessera``, with every subpackage in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("runtime", "parallel", "memory", "offload", "launch", "models", "tests", "benchmarks")


def _declared_packages() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared_in_pyproject():
    on_disk = {"tessera"}
    for top in TOP_FOLDERS:
        for init in (REPO / top).rglob("__init__.py"):
            if any(part in {"__pycache__", "results"} for part in init.parts):
                continue
            rel = init.parent.relative_to(REPO)
            on_disk.add("tessera." + ".".join(rel.parts))
    missing = sorted(on_disk - _declared_packages())
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (built,) = out.glob("tessera-*.whl")
    return built


def test_wheel_holds_nested_subpackages_under_tessera_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for package in sorted(_declared_packages()):
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"{init} missing from the wheel"
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"tessera"}, f"unexpected top-level names in the wheel: {top_level - {'tessera'}}"
    assert "tessera/runtime/controller.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tessera = tessera.launch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_copy_imports_as_tessera_and_not_as_bare_folders(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    probe = (
        "import importlib, tessera, tessera.runtime.controller, tessera.launch.cli\n"
        "assert tessera.__file__.startswith(%r), tessera.__file__\n"
        "for bare in ('runtime', 'parallel', 'memory', 'offload', 'launch', 'models'):\n"
        "    try:\n"
        "        importlib.import_module(bare)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(f'bare import {bare!r} works from an installed copy')\n"
        "print('ok')\n"
    ) % str(target)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    # -S keeps the editable dev install (a site-packages hook) out of the way;
    # the standard library still comes from the interpreter.
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
