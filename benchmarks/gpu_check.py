"""The one prepared command for a lent GPU: carried wheels, the gpu tests, the GPU figures, one table, one JSON.

On the GPU machine (bare: Python, torch with CUDA, transformers; no Ray, no diffusers, no network),
from the repository root::

    bash benchmarks/gpu_check.sh "$OUT"          # = python3 benchmarks/gpu_check.py --out "$OUT"

Anywhere, on the CPU, in seconds (tiny sizes, the same code paths; CI runs it)::

    python -m tessera.benchmarks.gpu_check --dry-run --out /tmp/gpu-dry

In order, each section bounded and recorded even when it fails (a failure never stops the rest):

1. wheels: every ``*.whl`` in ``--wheels`` (default ``.gpu-wheels/``, filled here by
   ``benchmarks/gpu_wheels.sh``) whose distribution is not installed is unpacked into a temp dir
   put first on ``sys.path`` and ``PYTHONPATH`` (diffusers and the few pure-Python packages it
   needs that the machine lacks); nothing is installed into the system.
2. ceilings, measured on the device: device-to-device copy GB/s (bytes read + written), bf16
   matmul TFLOP/s, page-locked host->device copy GB/s, disk read GB/s (O_DIRECT, the offload
   tier's own reader, cold: the file's pages are dropped with ``posix_fadvise`` first).
3. tests: ``pytest -m gpu`` over ``tests/test_gpu_*.py`` (junit XML kept).
4. MoE decode: a random Qwen3-MoE with Qwen3-30B-A3B layer shapes (hidden 2048, 32 heads / 4 kv
   heads of 128, 128 experts top-8 of intermediate 768; 4 layers, vocab 32768 so the layers, not
   the LM head, dominate the bytes as in the real 48-layer model), bf16, in-process on the GPU:
   tokens/s at batch 1 and 32; the weight bytes each decode step reads, counted from the recorded
   routing (distinct experts per layer and step, plus every dense weight and the KV read), over
   the measured copy bandwidth: the HBM bound and the fraction reached; transformers ``generate``
   on the same GPU and checkpoint (decode rate from per-forward timestamps).
5. DiT forward: a Flux-shaped transformer at real Flux widths (hidden 3072 = 24 heads x 128, text
   4096, pooled 768; 2 double + 4 single blocks) on 4096 image tokens (1024x1024) + 512 text
   tokens, bf16: tessera's forward vs diffusers' FluxTransformer2DModel with the same weights.
6. Offloaded decode: the same MoE checkpoint with a device budget of 1/4 of its weights (experts
   in page-locked host memory, streamed through the expert cache): tokens/s, host->device GB/s
   against the pinned copy ceiling, and the overlap achieved: how much of the shorter of
   (compute: the no-offload step time) and (copy: the step's H2D bytes at the pinned ceiling)
   was hidden, ``(compute + copy - measured) / min(compute, copy)``.

Writes ``OUT/gpu.json`` after every section (so a run cut short still leaves its figures) and
prints the table last. ``--budget-s`` (default 480) bounds the whole run: a section that would
not fit its estimate in what is left is skipped, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]

if __package__ in (None, ""):  # run as a file on a bare machine: make this checkout importable as ``tessera``
    _link_dir = Path(tempfile.mkdtemp(prefix="tessera-import-"))
    (_link_dir / "tessera").symlink_to(REPO_ROOT, target_is_directory=True)
    sys.path.insert(0, str(_link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_link_dir), os.environ.get("PYTHONPATH")) if p)


# -- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What each section measures with: the GPU run, or the tiny CPU dry run."""

    copy_mib: int
    matmul_n: int
    disk_mib: int
    moe: dict
    moe_prompt: int
    moe_new_tokens: int
    moe_batches: tuple[int, ...]
    offload_prompt: int
    offload_new_tokens: int
    flux: dict
    flux_latent: int  # latent side: (side / 2)^2 image tokens
    flux_text_tokens: int
    repeats: int
    tests_timeout_s: int


GPU = Sizes(
    copy_mib=1024, matmul_n=8192, disk_mib=2048,
    moe=dict(hidden=2048, layers=4, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_intermediate=768,
             intermediate=6144, vocab=32768, init_std=0.02, max_positions=4096),
    moe_prompt=32, moe_new_tokens=64, moe_batches=(1, 32), offload_prompt=12, offload_new_tokens=32,
    flux=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56)),
    flux_latent=128, flux_text_tokens=512, repeats=3, tests_timeout_s=240,
)
DRY = Sizes(
    copy_mib=16, matmul_n=256, disk_mib=32,
    moe=dict(hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, experts=16, top_k=2, moe_intermediate=64,
             intermediate=128, vocab=128, init_std=0.02, max_positions=256),
    moe_prompt=8, moe_new_tokens=4, moe_batches=(1, 2), offload_prompt=4, offload_new_tokens=4,
    flux=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
              num_attention_heads=4, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4)),
    flux_latent=16, flux_text_tokens=8, repeats=1, tests_timeout_s=240,
)
# seconds each section needs at most (GPU run); a section is skipped when less than this is left
ESTIMATE_S = {"wheels": 5, "ceilings": 30, "tests": 240, "moe_decode": 120, "dit_forward": 45, "offload_decode": 75}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- 1. wheels -----------------------------------------------------------------------------


def _dist_of(wheel: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    name, version = wheel.name.split("-")[:2]
    return name.replace("_", "-").replace(".", "-").lower(), version


def _installed(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def install_wheels(wheels: Path, target: Path) -> dict[str, Any]:
    """Unpack the carried wheels whose distributions are missing into ``target``, first on the import path.

    A wheel is a zip of what site-packages would hold (pure-Python, or built for this Python),
    so unpacking it is installing it for this process and its children; ``*.dist-info`` comes
    along, so ``importlib.metadata`` (which diffusers asks at import) sees it. Requirements of
    the carried wheels that the machine's own packages do not meet are reported, not changed.
    """
    out: dict[str, Any] = {"dir": str(wheels), "installed": {}, "present": {}, "unmet": []}
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        out["note"] = f"no wheels in {wheels}; using what is installed"
        return out
    target.mkdir(parents=True, exist_ok=True)
    for wheel in files:
        dist, version = _dist_of(wheel)
        have = _installed(dist)
        if have is not None:
            out["present"][dist] = have
            continue
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():  # no path in a wheel may leave the target
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ValueError(f"{wheel.name}: member {member!r} escapes the install directory")
            zf.extractall(target)
        out["installed"][dist] = version
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    import importlib

    importlib.invalidate_caches()
    out["unmet"] = _unmet_requirements(target)
    return out


def _unmet_requirements(target: Path) -> list[str]:
    """Requirements (no extras, this Python) of the unpacked wheels that nothing installed satisfies."""
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging comes with transformers
        return ["(packaging is missing: requirements not checked)"]
    unmet = []
    for dist in md.distributions(path=[str(target)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _installed(req.name)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                unmet.append(f"{dist.metadata['Name']} needs {text} (installed: {have})")
    return unmet


# -- small measuring helpers ------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], Any], device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up), device work included."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# -- 2. ceilings -----------------------------------------------------------------------------


def measure_ceilings(device, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    import torch

    n = sizes.copy_mib << 20
    out: dict[str, Any] = {}
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = _best_seconds(lambda: dst.copy_(src), device, 10)
    out["d2d_copy_GBps"] = 2 * n / t / 1e9  # bytes read + bytes written per second
    del src, dst
    m = sizes.matmul_n
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    t = _best_seconds(lambda: a @ b, device, 10)
    out["bf16_matmul_TFLOPs"] = 2 * m**3 / t / 1e12
    del a, b
    pinned = device.type == "cuda"
    host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned).fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    t = _best_seconds(lambda: dev.copy_(host, non_blocking=True), device, 5)
    out["h2d_pinned_GBps"] = n / t / 1e9
    out["h2d_note"] = "page-locked host -> device" if pinned else "dry run: host -> host copy (no GPU)"
    del host, dev
    _free(device)
    out.update(_disk_read(scratch, sizes.disk_mib << 20))
    return out


def _disk_read(scratch: Path, nbytes: int) -> dict[str, Any]:
    """Cold O_DIRECT read of a fresh file with the offload tier's reader (8 threads, 4 MiB pieces)."""
    from tessera.offload.aio import PreadvReader
    from tessera.offload.buffers import aligned_empty

    path = scratch / "disk-read.bin"
    chunk = 64 << 20
    block = os.urandom(1 << 20) * 64
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block[: min(chunk, nbytes - written)])
            written += min(chunk, nbytes - written)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop its pages: the read below is cold
    finally:
        os.close(fd)
    reader = PreadvReader(io_threads=8, chunk_bytes=4 << 20)
    piece = 256 << 20
    bufs = [aligned_empty(min(piece, nbytes)) for _ in range(2)]
    try:
        start = time.perf_counter()
        futures = []
        for i, offset in enumerate(range(0, nbytes, piece)):
            if len(futures) >= 2:
                futures.pop(0).result()
            buf = bufs[i % 2][: min(piece, nbytes - offset)]
            futures.append(reader.submit(str(path), offset, buf))
        for fut in futures:
            fut.result()
        seconds = time.perf_counter() - start
    finally:
        reader.close()
        path.unlink(missing_ok=True)
    return {"disk_read_GBps": nbytes / seconds / 1e9, "disk_direct_io": reader.direct, "disk_bytes": nbytes,
            "disk_fs": _filesystem(scratch)}


def _filesystem(path: Path) -> str | None:
    """The file system type holding ``path`` (tmpfs would make the disk figure a memory figure)."""
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        return None
    return kind


# -- 3. tests --------------------------------------------------------------------------------


def run_gpu_tests(out_dir: Path, timeout_s: int) -> dict[str, Any]:
    files = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_gpu_*.py"))
    xml = out_dir / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *files]
    env = {**os.environ, "TESSERA_LOG_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TESSERA_GPU_TESTS_DEVICE", None)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-6000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", (str(exc.stdout or "") + str(exc.stderr or ""))[-6000:]
    (out_dir / "gpu_tests.log").write_text(tail)
    result: dict[str, Any] = {"returncode": rc, "seconds": time.perf_counter() - started, "files": files}
    result.update(_junit_summary(xml))
    if result.get("failed") or result.get("errors") or rc not in (0, 5):
        result["log_tail"] = tail[-2500:]
    return result


def _junit_summary(xml: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    if not xml.is_file():
        return {"junit": "missing"}
    root = ET.parse(xml).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".split(".")[-1]
        if case.find("failure") is not None or case.find("error") is not None:
            kind = "failed" if case.find("failure") is not None else "errors"
            counts[kind] += 1
            node = case.find("failure") if kind == "failed" else case.find("error")
            failures.append(f"{name}: {(node.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


# -- 4. MoE decode -----------------------------------------------------------------------------


def moe_checkpoint(device, sizes: Sizes, scratch: Path) -> Path:
    from tessera.models.tiny_moe import build_tiny_moe

    return build_tiny_moe("qwen3_moe", scratch / "qwen3-moe", dtype="bfloat16", device=device.type, **sizes.moe)


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def _weight_facts(arch) -> dict[str, int]:
    """Bytes (bf16) of the dense weights every decode step reads, of one expert, and of all weights."""
    from tessera.models.loader import expected_shape, layer_param_names

    def numel(name):
        n = 1
        for d in expected_shape(arch, name):
            n *= d
        return n

    dense = numel("lm_head") + numel("final_norm")
    for layer in range(arch.num_layers):
        dense += sum(numel(n) for n in layer_param_names(arch, layer))
    expert = 3 * arch.moe_intermediate * arch.hidden_size
    moe_layers = sum(1 for m in arch.moe_layers if m)
    total = dense + numel("embed") + moe_layers * arch.num_experts * expert
    return {"dense_bytes": 2 * dense, "expert_bytes": 2 * expert, "total_bytes": 2 * total}


def _decode_run(engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Best decode rate of ``repeats`` generations (prefill excluded: the engine times decode steps apart)."""
    from tessera.runtime.llm.engine import SamplingParams

    best = None
    for _ in range(repeats):
        before = dict(engine.stats())
        engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
        after = engine.stats()
        tokens = after["decode_tokens"] - before["decode_tokens"]
        seconds = after["decode_s"] - before["decode_s"]
        if best is None or tokens / seconds > best["tok_s"]:
            best = {"tok_s": tokens / seconds, "decode_tokens": tokens, "decode_s": seconds,
                    "prefill_s": after["prefill_s"] - before["prefill_s"]}
    return best


def _decode_step_bytes(engine, batch: int, prompt: int, new_tokens: int, facts: dict[str, int]) -> float:
    """Mean weight + KV bytes one decode step reads, from the routing recorded during the last generation."""
    import numpy as np

    arch = engine.arch
    trace = engine.routing_trace()["layers"]
    steps_total = []
    for layer, ids in trace.items():
        # the last generation: prefill (batch x prompt tokens), then one row per sequence per decode step
        rows = ids[-(batch * prompt + batch * (new_tokens - 1)):]
        decode = rows[batch * prompt:]
        distinct = [len(np.unique(decode[i * batch:(i + 1) * batch])) for i in range(len(decode) // batch)]
        steps_total.append(distinct)
    per_step_experts = np.sum(np.array(steps_total), axis=0)  # over layers
    kv_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.qk_head_dim * 2
    mean_ctx = prompt + new_tokens / 2
    return float(facts["dense_bytes"] + per_step_experts.mean() * facts["expert_bytes"] + batch * mean_ctx * kv_per_token)


def bench_moe_decode(device, sizes: Sizes, scratch: Path, ceilings: dict[str, Any], state: dict) -> dict[str, Any]:
    import torch

    from tessera.memory.placement import Placement
    from tessera.config import ParallelPlan
    from tessera.runtime.inprocess import InProcessController
    from tessera.runtime.llm.engine import LLMEngine

    path = moe_checkpoint(device, sizes, scratch)
    state["moe_path"] = path
    out: dict[str, Any] = {"shapes": {k: v for k, v in sizes.moe.items() if k != "init_std"}, "tessera": {},
                           "transformers": {}}
    max_len = sizes.moe_prompt + sizes.moe_new_tokens + 8
    bw = ceilings.get("d2d_copy_GBps")
    with InProcessController(Placement(ParallelPlan({}), device=device.type), log_level="WARNING") as ctl:
        started = time.perf_counter()
        engine = LLMEngine.load(ctl, path, dtype="bfloat16", stop_at_eos=False, max_model_len=max_len,
                                max_num_seqs=max(sizes.moe_batches), record_routing=True)
        out["load_s"] = time.perf_counter() - started
        facts = _weight_facts(engine.arch)
        out["weights"] = facts
        engine.generate(_prompts(1, 8, engine.arch.vocab_size), {"max_new_tokens": 4})  # warm-up
        for batch in sizes.moe_batches:
            prompts = _prompts(batch, sizes.moe_prompt, engine.arch.vocab_size, seed=batch)
            run = _decode_run(engine, prompts, sizes.moe_new_tokens, sizes.repeats)
            step_bytes = _decode_step_bytes(engine, batch, sizes.moe_prompt, sizes.moe_new_tokens, facts)
            row = {**run, "step_bytes": step_bytes}
            if bw:
                bound_step_s = step_bytes / (bw * 1e9)
                row["hbm_bound_tok_s"] = batch / bound_step_s
                row["fraction_of_hbm_bound"] = run["tok_s"] / row["hbm_bound_tok_s"]
            out["tessera"][f"batch{batch}"] = row
            engine.clear_routing_trace()
            log(f"tessera decode batch {batch}: {run['tok_s']:.1f} tok/s")
        state["moe_tok_s_batch1"] = out["tessera"].get("batch1", {}).get("tok_s")
        state["moe_step_bytes_batch1"] = out["tessera"].get("batch1", {}).get("step_bytes")
        engine.close()
    _free(device)
    out["transformers"] = _hf_decode(path, device, sizes)
    for batch in sizes.moe_batches:
        ours, theirs = out["tessera"].get(f"batch{batch}"), out["transformers"].get(f"batch{batch}")
        if ours and theirs:
            ours["vs_transformers"] = ours["tok_s"] / theirs["tok_s"]
    return out


def _hf_decode(path: Path, device, sizes: Sizes) -> dict[str, Any]:
    """transformers ``generate`` on the same device: decode tok/s from one timestamp per forward."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from tessera.benchmarks.bench_moe import _Stamps

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    out: dict[str, Any] = {"load_s": time.perf_counter() - started}
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(_prompts(1, 8, model.config.vocab_size), device=device), max_new_tokens=2,
                       min_new_tokens=2, **gen)
        for batch in sizes.moe_batches:
            ids = torch.tensor(_prompts(batch, sizes.moe_prompt, model.config.vocab_size, seed=batch), device=device)
            best = 0.0
            for _ in range(sizes.repeats):
                stamps = _Stamps()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sizes.moe_new_tokens,
                               min_new_tokens=sizes.moe_new_tokens, logits_processor=LogitsProcessorList([stamps]), **gen)
                _sync(device)
                best = max(best, batch * (len(stamps.t) - 1) / (stamps.t[-1] - stamps.t[0]))
            out[f"batch{batch}"] = {"tok_s": best}
            log(f"transformers decode batch {batch}: {best:.1f} tok/s")
    del model
    _free(device)
    return out


# -- 5. DiT forward ----------------------------------------------------------------------------


def bench_dit_forward(device, sizes: Sizes) -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel

    from tessera.models.dit_layers import patchify
    from tessera.models.flux import FluxConfig, FluxTransformer

    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        ref = FluxTransformer2DModel(**sizes.flux).to(dtype).eval()
    with torch.device("meta"):
        mine = FluxTransformer(FluxConfig.from_dict(dict(ref.config)))
    mine.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the same weight tensors
    mine = mine.eval()
    c = sizes.flux["in_channels"] // 4
    side = sizes.flux_latent
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = torch.randn(1, c, side, side, generator=g).to(device, dtype)
    txt = torch.randn(1, sizes.flux_text_tokens, sizes.flux["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, sizes.flux["pooled_projection_dim"], generator=g).to(device, dtype)
    t = torch.tensor([0.7], device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device, dtype=dtype)
    rows, cols = side // 2, side // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1], ids[..., 2] = torch.arange(rows)[:, None], torch.arange(cols)[None]
    ids = ids.reshape(-1, 3).to(device)
    txt_ids = torch.zeros(sizes.flux_text_tokens, 3, device=device)
    packed = patchify(lat, 2)

    def ours():
        return mine(lat, txt, pooled, t, guidance=guidance)

    def theirs():
        return ref(packed, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t, img_ids=ids,
                   txt_ids=txt_ids, guidance=guidance).sample

    with torch.inference_mode():
        a, b = patchify(ours(), 2).float(), theirs().float()
        rel = ((a - b).abs().max() / b.abs().max()).item()
        t_ours = _best_seconds(ours, device, sizes.repeats)
        t_theirs = _best_seconds(theirs, device, sizes.repeats)
    params = sum(p.numel() for p in ref.parameters())
    del ref, mine
    _free(device)
    return {"image_tokens": rows * cols, "text_tokens": sizes.flux_text_tokens, "params": params,
            "blocks": {"double": sizes.flux["num_layers"], "single": sizes.flux["num_single_layers"]},
            "tessera_ms": 1e3 * t_ours, "diffusers_ms": 1e3 * t_theirs, "speedup_vs_diffusers": t_theirs / t_ours,
            "max_rel_diff_vs_diffusers": rel}


# -- 6. offloaded decode -----------------------------------------------------------------------


def bench_offload_decode(device, sizes: Sizes, scratch: Path, ceilings: dict[str, Any], state: dict) -> dict[str, Any]:
    from tessera.memory.placement import Placement
    from tessera.config import ParallelPlan
    from tessera.options import OffloadConfig
    from tessera.runtime.inprocess import InProcessController
    from tessera.runtime.llm.engine import LLMEngine

    path = state.get("moe_path") or moe_checkpoint(device, sizes, scratch)
    max_len = sizes.offload_prompt + sizes.offload_new_tokens + 8
    out: dict[str, Any] = {}
    with InProcessController(Placement(ParallelPlan({}), device=device.type), log_level="WARNING") as ctl:
        probe = LLMEngine.load(ctl, path, dtype="bfloat16", stop_at_eos=False, max_model_len=max_len, max_num_seqs=1)
        facts = _weight_facts(probe.arch)
        prompts = _prompts(1, sizes.offload_prompt, probe.arch.vocab_size, seed=7)
        probe.generate(prompts, {"max_new_tokens": 4})  # warm-up
        base = _decode_run(probe, prompts, sizes.offload_new_tokens, sizes.repeats)
        probe.close()
        _free(device)
        budget = facts["total_bytes"] // 4
        cfg = OffloadConfig(device_budget_bytes=budget, predictor="both")
        started = time.perf_counter()
        engine = LLMEngine.load(ctl, path, dtype="bfloat16", stop_at_eos=False, max_model_len=max_len, max_num_seqs=1,
                                offload=cfg)
        out["load_s"] = time.perf_counter() - started
        engine.generate(prompts, {"max_new_tokens": 4})  # warm-up
        # H2D of the decode steps alone: a generation of N tokens less one of 1 token (the prefill), same prompt
        (s0,) = engine.offload_stats()
        engine.generate(prompts, {"max_new_tokens": 1})
        (s1,) = engine.offload_stats()
        run = _decode_run(engine, prompts, sizes.offload_new_tokens, 1)
        (s2,) = engine.offload_stats()
        engine.close()
    _free(device)
    h2d = max(0, (s2["store_h2d_bytes"] - s1["store_h2d_bytes"]) - (s1["store_h2d_bytes"] - s0["store_h2d_bytes"]))
    per_token_bytes = h2d / run["decode_tokens"]
    measured_s = run["decode_s"] / run["decode_tokens"]
    compute_s = 1 / base["tok_s"]
    pinned = ceilings.get("h2d_pinned_GBps")
    out.update({
        "device_budget_bytes": budget, "weight_bytes": facts["total_bytes"], "tok_s": run["tok_s"],
        "no_offload_tok_s": base["tok_s"], "decode_h2d_bytes_per_token": per_token_bytes,
        "h2d_GBps": per_token_bytes / measured_s / 1e9, "cache_hit_rate": _delta_rate(s1, s2),
        "prefetch_precision": s2.get("cache_prefetch_precision"), "device_peak_bytes": s2.get("store_device_peak"),
        "cuda_peak_allocated": s2.get("store_cuda_peak_allocated"),
        "waited_retirements": s2.get("store_copier", {}).get("waited_retirements"),
    })
    if pinned:
        out["h2d_vs_pinned_bound"] = out["h2d_GBps"] / pinned
        copy_s = per_token_bytes / (pinned * 1e9)
        out.update({"step_compute_s": compute_s, "step_copy_s": copy_s, "step_measured_s": measured_s})
        if copy_s > 0:
            hidden = compute_s + copy_s - measured_s
            out["overlap"] = max(0.0, min(1.0, hidden / min(compute_s, copy_s)))
    return out


def _delta_rate(before: dict, after: dict) -> float | None:
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    return hits / (hits + misses) if hits + misses else None


# -- the run -----------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    return {d: _installed(d) for d in ("torch", "transformers", "diffusers", "huggingface-hub", "safetensors",
                                       "tokenizers", "numpy", "pillow", "ray")}


class Run:
    """Sections in order, each timed, bounded by what is left of the budget, recorded even when it fails."""

    def __init__(self, out_dir: Path, budget_s: float, dry_run: bool) -> None:
        self.out_dir = out_dir
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.scale = 0.1 if dry_run else 1.0
        self.result: dict[str, Any] = {"benchmark": "gpu_check", "dry_run": dry_run, "sections": {}}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        need = ESTIMATE_S[name] * self.scale
        if self.left() < need:
            self.result["sections"][name] = {"status": "skipped",
                                             "reason": f"{self.left():.0f}s left of the budget, needs ~{need:.0f}s"}
            log(f"{name}: skipped (time)")
            self.save()
            return None
        log(f"{name} ...")
        started = time.perf_counter()
        try:
            value = fn()
            entry = {"status": "ok", "result": value}
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            value = None
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-3000:]}
            log(f"{name}: {entry['error']}")
        entry["seconds"] = time.perf_counter() - started
        self.result["sections"][name] = entry
        self.save()
        return value

    def save(self) -> Path:
        self.result["wall_s"] = time.monotonic() - self.started
        path = self.out_dir / "gpu.json"
        path.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        return path


def _fmt(x: Any, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, figure) rows of the summary table."""
    s = result["sections"]

    def get(name, *keys):
        node = s.get(name, {})
        if node.get("status") != "ok":
            return None
        node = node["result"]
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    rows = []
    for name, entry in s.items():
        if entry.get("status") != "ok":
            rows.append((name, f"{entry.get('status')}: {entry.get('error') or entry.get('reason', '')}"[:110]))
    rows += [
        ("d2d copy (read+write)", _fmt(get("ceilings", "d2d_copy_GBps"), " GB/s")),
        ("bf16 matmul", _fmt(get("ceilings", "bf16_matmul_TFLOPs"), " TFLOP/s")),
        ("h2d copy (pinned)", _fmt(get("ceilings", "h2d_pinned_GBps"), " GB/s")),
        ("disk read (O_DIRECT, cold)", f"{_fmt(get('ceilings', 'disk_read_GBps'), ' GB/s', 2)} "
                                       f"({get('ceilings', 'disk_fs')}, direct={get('ceilings', 'disk_direct_io')})"),
    ]
    tests = s.get("tests", {}).get("result") or {}
    if tests:
        rows.append(("gpu tests", f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                                  f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped"))
        rows += [("  failed", f[:110]) for f in tests.get("failures", [])[:8]]
    for key in sorted((get("moe_decode", "tessera") or {}), key=lambda k: int(k.removeprefix("batch"))):
        ours = get("moe_decode", "tessera", key)
        theirs = get("moe_decode", "transformers", key) or {}
        rows.append((f"MoE decode {key}", f"{_fmt(ours.get('tok_s'), ' tok/s')} = "
                                          f"{_fmt(100 * ours['fraction_of_hbm_bound'] if 'fraction_of_hbm_bound' in ours else None, '%')} "
                                          f"of HBM bound {_fmt(ours.get('hbm_bound_tok_s'), ' tok/s')}; transformers "
                                          f"{_fmt(theirs.get('tok_s'), ' tok/s')} ({_fmt(ours.get('vs_transformers'), 'x', 2)})"))
    dit = get("dit_forward")
    if dit:
        rows.append(("Flux-shaped DiT forward", f"{_fmt(dit['tessera_ms'], ' ms')} vs diffusers {_fmt(dit['diffusers_ms'], ' ms')} "
                                                f"({_fmt(dit['speedup_vs_diffusers'], 'x', 2)}; {dit['image_tokens']} image tokens)"))
    off = get("offload_decode")
    if off:
        rows.append(("offloaded decode (budget 1/4)", f"{_fmt(off['tok_s'], ' tok/s')} (no offload {_fmt(off['no_offload_tok_s'], ' tok/s')}); "
                                                      f"h2d {_fmt(off['h2d_GBps'], ' GB/s')} = {_fmt(100 * off['h2d_vs_pinned_bound'] if off.get('h2d_vs_pinned_bound') is not None else None, '%')} "
                                                      f"of pinned; overlap {_fmt(100 * off['overlap'] if off.get('overlap') is not None else None, '%')}"))
    rows.append(("wall time", _fmt(result.get("wall_s"), " s")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--wheels", default=str(REPO_ROOT / ".gpu-wheels"), help="folder of carried *.whl")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code paths in seconds")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time for the whole run (default 480)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (e.g. tests)")
    parser.add_argument("--scratch", default=None,
                        help="folder on the disk to measure, for checkpoints and the disk test (default: the temp dir)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give the output folder: --out DIR (or set $OUT)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tessera-gpu-check-", dir=args.scratch))
    os.environ.setdefault("TESSERA_CACHE", str(scratch / "cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    run = Run(out_dir, args.budget_s, args.dry_run)
    try:
        run.section("wheels", lambda: install_wheels(Path(args.wheels), scratch / "site"))
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            log("no CUDA device here: use --dry-run on a CPU machine")
            run.result["error"] = "no CUDA device (run with --dry-run on a CPU machine)"
            run.save()
            return 2
        device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
        sizes = DRY if args.dry_run else GPU
        from tessera.benchmarks._common import machine

        run.result.update({"machine": machine(), "versions": _versions(), "device": str(device),
                           "sizes": asdict(sizes), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if device.type == "cuda":
            run.result["gpu"] = {"name": torch.cuda.get_device_name(0),
                                 "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
        state: dict[str, Any] = {}
        sections: list[tuple[str, Callable[[], Any]]] = [
            ("ceilings", lambda: measure_ceilings(device, sizes, scratch)),
            ("tests", lambda: run_gpu_tests(out_dir, sizes.tests_timeout_s)),
            ("moe_decode", lambda: bench_moe_decode(device, sizes, scratch, ceilings, state)),
            ("dit_forward", lambda: bench_dit_forward(device, sizes)),
            ("offload_decode", lambda: bench_offload_decode(device, sizes, scratch, ceilings, state)),
        ]
        ceilings: dict[str, Any] = {}
        for name, fn in sections:
            if name in skip:
                run.result["sections"][name] = {"status": "skipped", "reason": "--skip"}
                continue
            value = run.section(name, fn)
            if name == "ceilings" and value:
                ceilings.update(value)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        path = run.save()
    rows = table(run.result)
    width = max(len(r[0]) for r in rows)
    print(f"\ntessera GPU check ({'dry run, CPU' if args.dry_run else run.result.get('gpu', {}).get('name', 'GPU')}); "
          f"JSON: {path}")
    for what, figure in rows:
        print(f"  {what.ljust(width)}  {figure}")
    failed = [n for n, e in run.result["sections"].items() if e.get("status") == "error"]
    tests = run.result["sections"].get("tests", {}).get("result") or {}
    return 1 if failed or tests.get("failed") or tests.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
