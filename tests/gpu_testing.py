"""What the `gpu`-marked tests share: the device they run on, one in-process rank on it, full-fp32 matmuls.

``TESSERA_GPU_TESTS_DEVICE=cpu`` runs them on CPU (how CI keeps them from rotting between GPU runs).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("TESSERA_GPU_TESTS_DEVICE", "cuda")


@pytest.fixture(scope="module")
def gpu_controller():
    """One rank served in this process on DEVICE (no Ray on the GPU machine)."""
    from tessera.runtime.inprocess import InProcessController

    ctl = InProcessController(device=DEVICE, log_level="WARNING").start()
    try:
        yield ctl
    finally:
        ctl.shutdown()


@pytest.fixture(scope="module", autouse=True)
def full_fp32_matmuls():
    """fp32 means fp32 on both sides of a comparison: no TF32 GEMMs or convolutions."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
