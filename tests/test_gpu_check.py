"""The prepared GPU command (benchmarks/gpu_check.py) on the CPU: its dry run covers every section, so the
script cannot rot between GPU runs; its wheel installer unpacks carried wheels and refuses escaping paths.
(Not ``gpu``-marked: this runs in every suite.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tessera.benchmarks import gpu_check


def _wheel(folder: Path, dist: str, version: str, files: dict[str, str]) -> Path:
    """A minimal wheel (a zip of site-packages content with its dist-info)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                                        "Requires-Dist: tessera-no-such-dist>=1\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_are_unpacked_onto_the_path_and_unmet_requirements_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    wheels = tmp_path / "wheels"
    _wheel(wheels, "tessera_probe_dist", "1.2", {"tessera_probe_mod/__init__.py": "VALUE = 42\n"})
    _wheel(wheels, "torch", "0.0.1", {"torch_shadow/__init__.py": ""})  # installed already: left alone
    out = gpu_check.install_wheels(wheels, tmp_path / "site")
    assert out["installed"] == {"tessera-probe-dist": "1.2"} and "torch" in out["present"]
    assert out["unmet"] == ["tessera_probe_dist needs tessera-no-such-dist>=1 (installed: None)"]
    import tessera_probe_mod

    assert tessera_probe_mod.VALUE == 42
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    assert not (tmp_path / "site" / "torch_shadow").exists()


def test_a_wheel_member_escaping_the_folder_is_refused(tmp_path):
    _wheel(tmp_path / "w", "evil_dist", "1.0", {"../outside.py": "x = 1\n"})
    with pytest.raises(ValueError, match="escapes the install directory"):
        gpu_check.install_wheels(tmp_path / "w", tmp_path / "site")
    assert not (tmp_path / "outside.py").exists()


@pytest.mark.slow
def test_dry_run_covers_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TESSERA_LOG_LEVEL": "WARNING"}
    env.pop("TESSERA_GPU_TESTS_DEVICE", None)
    proc = subprocess.run([sys.executable, "-m", "tessera.benchmarks.gpu_check", "--dry-run", "--out", str(out),
                           "--wheels", str(tmp_path / "no-wheels")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    sections = result["sections"]
    assert {n: s["status"] for n, s in sections.items()} == {
        "wheels": "ok", "ceilings": "ok", "tests": "ok", "moe_decode": "ok", "dit_forward": "ok", "offload_decode": "ok"}
    assert result["dry_run"] is True and result["device"] == "cpu"
    ceilings = sections["ceilings"]["result"]
    assert all(ceilings[k] > 0 for k in ("d2d_copy_GBps", "bf16_matmul_TFLOPs", "h2d_pinned_GBps", "disk_read_GBps"))
    tests = sections["tests"]["result"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # gpu tests skip on the CPU
    moe = sections["moe_decode"]["result"]
    for batch in ("batch1", "batch2"):
        assert moe["tessera"][batch]["tok_s"] > 0 and moe["transformers"][batch]["tok_s"] > 0
        assert 0 < moe["tessera"][batch]["fraction_of_hbm_bound"] < 1
    dit = sections["dit_forward"]["result"]
    assert dit["tessera_ms"] > 0 and dit["diffusers_ms"] > 0 and dit["max_rel_diff_vs_diffusers"] < 0.05
    off = sections["offload_decode"]["result"]
    assert off["tok_s"] > 0 and off["device_peak_bytes"] <= off["device_budget_bytes"] == off["weight_bytes"] // 4
    assert off["cache_hit_rate"] is not None
    last = proc.stdout.strip().splitlines()
    assert last[-1].strip().startswith("wall time") and any("MoE decode batch1" in line for line in last[-12:])
