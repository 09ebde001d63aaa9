"""PixArt, SD3 and Flux on one GPU, in-process (no Ray), against diffusers.

- fp32 (TF32 off): tessera's end-to-end latents equal the diffusers pipeline's run on the same GPU
  (``assert_latents_close``: 1e-4 of the latents' scale), and every step's prediction equals the
  diffusers transformer's on the same inputs (1e-4);
- bf16 transformer: each step's prediction is as close to the fp32 diffusers prediction as
  diffusers' own bf16 transformer is on the same inputs: error (max, relative to the prediction's
  largest magnitude; ~1-4% on these tiny models) at most 1.5x diffusers' + 0.01;
- the VAE decodes on the device to an image of the asked size.

Run with ``pytest -m gpu``; skipped without CUDA (``TESSERA_GPU_TESTS_DEVICE=cpu`` runs the same
code on the CPU, to check the tests themselves). Needs diffusers (carried as a wheel to the GPU
machine by benchmarks/gpu_check.py).
"""

from __future__ import annotations


import pytest
import torch

from tessera.models.tiny_diffusion import build_tiny_diffusion
from tessera.tests import diffusion_reference as ref
from tessera.tests.gpu_testing import DEVICE, full_fp32_matmuls, gpu_controller  # noqa: F401 - fixtures

pytestmark = pytest.mark.gpu

STEPS = 3
# family -> (prompt, height, width, guidance, seed); sizes as in the CPU tests
CASES = {
    "pixart": ("a red cube", 32, 48, 4.5, 3),
    "sd3": ("a white boat", 40, 24, 5.0, 4),
    "flux": ("a green tree", 40, 32, 0.0, 2),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-dit")
    return {f: str(build_tiny_diffusion(f, root / f)) for f in CASES}


def _diffusers_latents(family: str, model_dir: str) -> torch.Tensor:
    """The diffusers pipeline's final latents on DEVICE (noise from the same CPU generator as tessera's)."""
    from diffusers import DiffusionPipeline

    prompt, h, w, g, seed = CASES[family]
    pipe = DiffusionPipeline.from_pretrained(model_dir).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    common = dict(num_inference_steps=STEPS, height=h, width=w, generator=gen, output_type="latent")
    if family == "pixart":
        out = pipe(prompt, guidance_scale=g, use_resolution_binning=False, max_sequence_length=300, **common).images
    elif family == "sd3":
        out = pipe(prompt, guidance_scale=g, max_sequence_length=256, **common).images
    else:
        out = pipe._unpack_latents(pipe(prompt, guidance_scale=g, max_sequence_length=512, **common).images, h, w,
                                   pipe.vae_scale_factor)
    return out.float().cpu()


def _reference_pred(family: str, model_dir: str, step: dict, embeds, dtype=torch.float32) -> torch.Tensor:
    """diffusers' transformer (CPU; fp32 unless ``dtype``) on the step's latents and text embeddings, in fp32."""
    prompt, h, w, g, seed = CASES[family]
    latents = step["latents"].cpu().to(dtype)
    embeds = tuple({k: v.cpu().to(dtype) if v.is_floating_point() else v.cpu() for k, v in e.items()} for e in embeds)

    def pred():
        if family == "pixart":
            return ref.pixart_reference_pred(model_dir, latents, step["t"], embeds, g)
        if family == "sd3":
            return ref.sd3_reference_pred(model_dir, latents, step["t"], embeds, g)
        return ref.flux_reference_pred(model_dir, latents, step["t"], embeds)

    if dtype == torch.float32:
        return pred().float()
    return _with_pipe(_pipe_in(model_dir, dtype), pred)


_PIPES: dict = {}


def _pipe_in(model_dir: str, dtype: torch.dtype):
    """A diffusers pipeline whose transformer runs in ``dtype`` (cached per directory)."""
    from diffusers import DiffusionPipeline

    key = (model_dir, dtype)
    if key not in _PIPES:
        pipe = DiffusionPipeline.from_pretrained(model_dir)
        pipe.transformer.to(dtype)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = pipe
    return _PIPES[key]


def _with_pipe(pipe, fn):
    """Run a diffusion_reference function against ``pipe`` instead of its cached fp32 pipeline."""
    original = ref.reference_transformer
    ref.reference_transformer = lambda model_dir: pipe
    try:
        return fn().float()
    finally:
        ref.reference_transformer = original


def _run(ctl, family: str, model_dir: str, dtype: str):
    from tessera.runtime.diffusion.engine import DiffusionEngine

    prompt, h, w, g, seed = CASES[family]
    engine = DiffusionEngine.load(ctl, model_dir, progress=False, dtype=dtype)
    engine.generate_images(prompt, steps=STEPS, height=h, width=w, guidance_scale=g, seed=seed, output="latent",
                           trace=True)
    return engine


def _transformer_devices(worker) -> list[str]:
    from tessera.runtime.diffusion.engine import ENGINE_ID

    return sorted({p.device.type for p in worker.engines[ENGINE_ID].model.parameters()})


@pytest.mark.parametrize("family", list(CASES))
def test_fp32_matches_diffusers_on_the_device(gpu_controller, model_dirs, family):
    engine = _run(gpu_controller, family, model_dirs[family], "float32")
    try:
        assert gpu_controller.collective_rpc(_transformer_devices) == [[DEVICE]]
        last = engine.last
        for step in last["trace"]:
            want = _reference_pred(family, model_dirs[family], step, last["embeds"])
            diff = (want - step["pred"].float().cpu()).abs().max().item()
            assert diff <= 1e-4, f"{family} t={step['t']}: prediction differs from diffusers by {diff:.2e}"
        ref.assert_latents_close(last["latents"], _diffusers_latents(family, model_dirs[family]))
        prompt, h, w, g, seed = CASES[family]
        (image,) = engine.generate_images(prompt, steps=1, height=h, width=w, guidance_scale=g, seed=seed)
        assert image.size == (w, h)  # decoded by the VAE on the device
    finally:
        engine.close()


@pytest.mark.parametrize("family", list(CASES))
def test_bf16_transformer_within_bf16_tolerance(gpu_controller, model_dirs, family):
    engine = _run(gpu_controller, family, model_dirs[family], "bfloat16")
    try:
        last = engine.last
        for step in last["trace"]:
            assert step["pred"].dtype == torch.bfloat16
            want = _reference_pred(family, model_dirs[family], step, last["embeds"])
            theirs = _reference_pred(family, model_dirs[family], step, last["embeds"], dtype=torch.bfloat16)
            scale = want.abs().max().item()
            ours_err = (want - step["pred"].float().cpu()).abs().max().item() / scale
            theirs_err = (want - theirs).abs().max().item() / scale
            assert ours_err <= 1.5 * theirs_err + 0.01, (
                f"{family} t={step['t']}: bf16 prediction off by {ours_err:.3%} of its scale "
                f"(diffusers' bf16 transformer: {theirs_err:.3%})")
        assert torch.isfinite(last["latents"]).all()
    finally:
        engine.close()


def test_a_step_checkpoint_resumes_on_the_device(gpu_controller, model_dirs):
    """PixArt's multistep solver keeps its last model outputs on the device: a checkpoint carries them on the
    host (pickled, as Ray does) and a resume puts them back, giving the uninterrupted latents."""
    import pickle

    from tessera.runtime.diffusion.engine import ENGINE_ID, DiffusionEngine
    from tessera.runtime.diffusion.worker import DiffusionWorker, run_steps

    engine = DiffusionEngine.load(gpu_controller, model_dirs["pixart"], progress=False, checkpoint_s=None)
    try:
        prompt, h, w, g, seed = CASES["pixart"]
        want = engine.generate_images(prompt, steps=6, height=h, width=w, guidance_scale=g, seed=seed,
                                      output="latent")[0]
        req = engine._request([prompt], 6, h, w, g, seed, "exact", 1, 0.25, "", None, "latent", False)
        gpu_controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.begin, req, None))
        (chunk,) = gpu_controller.collective_rpc("call", args=(ENGINE_ID, run_steps, 3, True))
        saved = chunk.checkpoint
        assert saved.latents.device.type == "cpu"
        assert all(t is None or t.device.type == "cpu" for t in saved.scheduler.scheduler.model_outputs)
        if DEVICE != "cpu":
            assert "model_outputs" in saved.scheduler.on_device
        gpu_controller.collective_rpc("call", args=(ENGINE_ID, run_steps, 2, False))
        gpu_controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.begin, req, pickle.loads(pickle.dumps((saved,)))))
        gpu_controller.collective_rpc("call", args=(ENGINE_ID, run_steps, 10, True))
        (result,) = gpu_controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.end))
        assert torch.equal(result.latents, want)
    finally:
        engine.close()
