"""The worker-side half of the diffusion engine: one denoising loop per rank (SPMD).

The driver attaches one :class:`DiffusionWorker` per rank (``load_worker``,
from a typed :class:`~tessera.runtime.diffusion.protocol.LoadSpec`), then per
request either calls ``run_request`` (the whole denoising loop runs here: one
fan-out per image) or ``DiffusionWorker.begin``, ``run_steps`` per chunk of steps
and ``end``: the driver shows a live progress bar over the chunks and keeps
each rank's step checkpoint after every chunk, so a fault resumes there
(``checkpoint.py``).
Answers are the frozen dataclasses of ``protocol.py``. Every rank keeps the
latent rows of its patch band; ranks exchange activations only inside
attention (``parallel/patch.py``, ``parallel/ulysses.py``) and predictions
over the ``cfg`` dim (``parallel/cfg.py``). Prompt encoding and VAE decoding
happen on global rank 0 only, so text encoders and the VAE are not
replicated. Everything family-specific comes from the family file
(``DiffusersDir.module``: its ``Pipeline``, ``TP_PLAN``, ``STAGES``,
``JOINT_TEXT``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch
import torch.distributed as dist

from tessera.models.diffusers_loader import DiffusersDir, load_transformer
from tessera.models.dit_family import Conditioning
from tessera.models.dit_layers import TokenShard, local_self_attention, split_rows
from tessera.parallel.cfg import COND, cfg_batched_combine, cfg_parallel_combine
from tessera.parallel.counted import CommCounter, gather_tokens
from tessera.parallel.patch import PatchParallelAttention
from tessera.parallel.ulysses import UlyssesAttention, check_ulysses_heads
from tessera.runtime.diffusion.checkpoint import host_scheduler, host_trace, restore_scheduler
from tessera.runtime.diffusion.protocol import (ChunkResult, LoadSpec, RequestResult, RequestStart, StepCheckpoint,
                                                StepResult, TraceStep, WorkerInfo)
from tessera.runtime.diffusion.request import DiffusionRequest, keeps_stale_kv

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHM_SLOT_BYTES = 8 << 20  # per rank: a 1024-token Flux exchange fits; larger ones go through gloo


def _degree(worker: Any, dim: str) -> int:
    return int(getattr(worker, "plan_degrees", {}).get(dim, 1))


class DiffusionWorker:
    """Per-rank state: the (possibly sharded) transformer, its family's pipeline, and the request in flight."""

    def __init__(self, worker: Any, spec: LoadSpec) -> None:
        self.worker = worker
        self.spec = spec
        self.dir = DiffusersDir.open(spec.model_dir)
        self.family = self.dir.module
        self.dtype = _DTYPES[spec.dtype]
        self.device = worker.device
        self.sp = _degree(worker, "sp")
        self.cfg = _degree(worker, "cfg")
        self.tp = _degree(worker, "tp")
        # patch / Ulysses / CFG / tp exchanges of CPU ranks on one node meet in shared memory
        self.sp_comm = worker.comm("sp", SHM_SLOT_BYTES)
        self.cfg_comm = worker.comm("cfg", SHM_SLOT_BYTES)
        coords = worker.coordinates() if worker.mesh is not None else {}
        self.sp_rank = coords.get("sp", 0)
        self.cfg_rank = coords.get("cfg", 0)
        self.counter = CommCounter()
        tp_prepare, self.pipe = None, None
        if self.tp > 1:
            from tessera.parallel.dit_tensor import tensor_parallel_prepare

            tp_prepare = tensor_parallel_prepare(self.family.TP_PLAN, self.family.TP_PIECES,
                                                 worker.comm("tp", SHM_SLOT_BYTES), coords.get("tp", 0), self.tp,
                                                 self.counter)
        if _degree(worker, "pp") > 1:  # pipeline stages: only this stage's blocks are built and read
            from tessera.parallel.dit_pipeline import DiTPipeline

            self.pipe = DiTPipeline.for_worker(worker, self.counter)

        def prepare(model):
            if self.pipe is not None:
                self.pipe.prepare(model, self.family.STAGES)
            return tp_prepare(model) if tp_prepare is not None else None

        started = time.perf_counter()
        self.loaded: dict = {}
        self.model = load_transformer(self.dir, self.device, self.dtype, prepare=prepare, report=self.loaded)
        self.offloaded = None
        if spec.offload is not None:  # tessera.offload: transformer blocks streamed stage by stage within a budget
            from tessera.offload.modules import offload_model_blocks

            self.offloaded = offload_model_blocks(self.model, self.family.STAGES.blocks, spec.offload, self.device,
                                                  tag=f"rank{worker.rank}")
        self.load_s = time.perf_counter() - started
        self.pipeline = self.family.Pipeline(self.dir, self.model)
        vae_cfg = json.loads((self.dir.path / "vae" / "config.json").read_text())
        self.vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [1])) - 1)
        self.vae = None
        self.req: DiffusionRequest | None = None
        self.attn = None

    def close(self) -> None:
        if self.req is not None and self.attn is not None:
            self.attn.finish()
        if self.offloaded is not None:
            self.offloaded.close()
            self.offloaded = None
        self.model = None

    def offload_stats(self) -> dict | None:
        """This rank's block-streaming counters (reads, bytes, peaks); None when the blocks are resident."""
        return self.offloaded.stats() if self.offloaded is not None else None

    def describe(self) -> WorkerInfo:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return WorkerInfo(rank=self.worker.rank, param_bytes=params, loaded_bytes=self.loaded["bytes_read"],
                          load_s=self.load_s, blocks=self.pipe.block_range() if self.pipe is not None else None)

    # -- one request ---------------------------------------------------------------

    def begin(self, req: DiffusionRequest, resume: tuple[StepCheckpoint, ...] | None = None) -> RequestStart:
        """Set up ``req`` on this rank: its band, the encoded prompts, the noise; with ``resume`` (every rank's
        checkpoint, from the driver) continue from this rank's saved step instead of the first."""
        if self.req is not None and self.attn is not None:
            self.attn.finish()
        self.req = req
        self.counter.reset()
        unit = self.model.config.row_unit
        lat_h, lat_w = req.height // self.vae_scale, req.width // self.vae_scale
        if req.height % self.vae_scale or req.width % self.vae_scale or lat_h % unit or lat_w % unit:
            step = self.vae_scale * unit
            raise ValueError(f"height and width must be multiples of {step} pixels for this model "
                             f"(VAE factor {self.vae_scale} x patch {unit}); got {req.height}x{req.width}")
        grid_h, grid_w = lat_h // unit, lat_w // unit
        bands = split_rows(grid_h, self.sp)
        r0, r1 = bands[self.sp_rank]
        self.shard = TokenShard(grid_h, grid_w, r0, r1)
        self.bands = bands
        self.rows = slice(r0 * unit, r1 * unit)
        # Prompt encoding on global rank 0, broadcast to all (text encoders are not replicated).
        payload: list[Any] = [None]
        if self.worker.rank == 0:
            try:
                cond, uncond = self._encode(req)
                payload = [(cond.tensors, uncond.tensors)]
            except Exception as err:  # noqa: BLE001 - every rank must leave the broadcast, then all raise
                payload = [f"{type(err).__name__}: {err}"]
        if dist.is_initialized() and self.worker.world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], str):
            self.req = None
            raise RuntimeError(f"prompt encoding failed on rank 0: {payload[0]}")
        cond, uncond = (Conditioning({k: v.to(self.device) for k, v in d.items()}) for d in payload[0])
        self.guided = req.guided and self.model.config.uses_cfg
        if not self.guided:
            self.text = cond
        elif self.cfg == 2:
            self.text = cond if self.cfg_rank == COND else uncond
        else:
            self.text = uncond.cat(cond)  # diffusers' batch order [uncond, cond]
        self.embeds = (cond.tensors, uncond.tensors) if req.trace and self.worker.rank == 0 else None
        self.text_counts = self._shard_text(req)
        self.per_image = self._per_image(req)
        # Same noise as diffusers' randn_tensor with a CPU generator, then this rank's rows.
        self.scheduler = self._fresh_scheduler()
        self.timesteps = self.pipeline.set_timesteps(self.scheduler, req.steps, lat_h, lat_w)
        noise = req.noise(self.pipeline.latent_channels, lat_h, lat_w)
        sigma0 = float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        self.latents = (noise[:, :, self.rows] * sigma0).to(self.device, self.dtype)
        self.attn = self._attention(req)
        self.step_index = 0
        self.trace: list[TraceStep] = []
        if resume is not None:
            self._restore(resume[self.worker.rank])
        return RequestStart(rank=self.worker.rank, rows=(r0, r1), steps=len(self.timesteps))

    def checkpoint(self) -> StepCheckpoint:
        """This rank's state between two steps, on the host (the driver keeps it; see ``checkpoint.py``)."""
        return StepCheckpoint(rank=self.worker.rank, step=self.step_index,
                              latents=self.latents.detach().to("cpu", copy=True),
                              scheduler=host_scheduler(self.scheduler), trace=host_trace(self.trace))

    def _restore(self, saved: StepCheckpoint) -> None:
        if saved.rank != self.worker.rank or keeps_stale_kv(self.req.mode, self.sp):
            raise RuntimeError(f"rank {self.worker.rank} was given rank {saved.rank}'s checkpoint, or a mode "
                               f"({self.req.mode}) that keeps stale activations between steps")
        if saved.latents.shape != self.latents.shape:
            raise RuntimeError(f"checkpoint latents {tuple(saved.latents.shape)} do not fit this rank's band "
                               f"{tuple(self.latents.shape)}: the plan changed between the fault and the resume")
        self.latents = saved.latents.to(self.device, self.dtype)
        self.scheduler = restore_scheduler(saved.scheduler, self.device)
        self.step_index = saved.step
        self.trace = [TraceStep(s.t, s.latents.to(self.device), s.pred.to(self.device)) for s in saved.trace]

    def _encode(self, req: DiffusionRequest) -> tuple[Conditioning, Conditioning]:
        """The prompts' conditioning (cond, uncond): batched, or one prompt at a time for a batch-invariant
        request (the text encoder's matmuls then have the shapes they have alone)."""
        if not req.batch_invariant or len(req.prompts) == 1:
            return self.pipeline.encode(list(req.prompts), list(req.negative_prompts), req.max_sequence_length)
        pairs = [self.pipeline.encode([p], [n], req.max_sequence_length)
                 for p, n in zip(req.prompts, req.negative_prompts)]
        return Conditioning.concat([c for c, _ in pairs]), Conditioning.concat([u for _, u in pairs])

    def _fresh_scheduler(self):
        template = self.dir.load_component("scheduler")
        return type(template).from_config(template.config)

    def _shard_text(self, req: DiffusionRequest) -> list[int] | None:
        """Ulysses and exact patches on joint-attention families: each sp rank keeps a contiguous share of
        the text tokens, like the image (blocks are token-local outside attention, which exchanges them),
        so no rank repeats the text stream's linears. Stale-K/V modes keep the text replicated."""
        if self.sp == 1 or req.mode not in ("ulysses", "exact") or not self.family.JOINT_TEXT:
            return None
        text = self.text.tensors["text"]
        if text.shape[1] < self.sp:
            return None
        bands = split_rows(text.shape[1], self.sp)
        t0, t1 = bands[self.sp_rank]
        self.text = Conditioning({**self.text.tensors, "text": text[:, t0:t1].contiguous()})
        return [e - s for s, e in bands]

    def _attention(self, req: DiffusionRequest):
        counts = [(e - s) * self.shard.grid_w for s, e in self.bands]
        if self.sp == 1:
            return None
        if req.mode == "ulysses":
            check_ulysses_heads(self.model.num_heads // self.tp, self.sp)
            return UlyssesAttention(self.sp_comm, self.sp_rank, counts, self.counter, text_counts=self.text_counts)
        return PatchParallelAttention(self.sp_comm, self.sp_rank, self.bands, self.shard.grid_w, req.patch_config(),
                                      len(self.timesteps), self.counter, text_counts=self.text_counts)

    def step(self) -> StepResult:
        req = self.req
        if req is None or self.step_index >= len(self.timesteps):
            raise RuntimeError("step called with no request in flight or after the last step; call begin")
        i = self.step_index
        t = self.timesteps[i]  # stays on the CPU for the scheduler (it looks itself up in its CPU timesteps)
        t_model = t.to(self.device) if isinstance(t, torch.Tensor) else t  # the model's input lives with its weights
        started, cpu_started = time.perf_counter(), time.process_time()
        before = self.counter.sent_bytes
        if self.attn is not None:
            self.attn.start_step(i)
        self_attn = self.attn if self.attn is not None else local_self_attention
        x = self.latents
        batched_cfg = self.guided and self.cfg == 1
        x_in = torch.cat([x, x]) if batched_cfg else x
        if hasattr(self.scheduler, "scale_model_input"):
            x_in = self.scheduler.scale_model_input(x_in, t)
        hw = (req.height, req.width)
        with torch.no_grad():
            if self.per_image is not None:
                pred = self._predict_each(x_in, t_model, self_attn, hw)
            elif self.pipe is None:
                pred = self.pipeline.predict(x_in, self.text, t_model, self.shard, self_attn, hw, guidance=req.guidance_scale)
            else:  # stages overlap on micro-batches unless attention keeps per-layer state (stale patch K/V)
                pred = self.pipe.predict(
                    lambda rows, stage: self.pipeline.predict(x_in[rows], self.text.select(rows), t_model, self.shard,
                                                              self_attn, hw, guidance=req.guidance_scale, stage=stage),
                    x_in, micro_batches=self.pipe.pp if self.sp == 1 or req.mode in ("exact", "ulysses") else 1)
        if batched_cfg:
            pred = cfg_batched_combine(pred, req.guidance_scale)
        elif self.guided:
            pred = cfg_parallel_combine(pred, self.cfg_comm, req.guidance_scale, self.counter)
        if req.trace:
            self.trace.append(TraceStep(float(t), x.detach().clone(), pred.detach().clone()))
        self.latents = self.scheduler.step(pred, t, x, return_dict=False)[0]
        self.step_index += 1
        return StepResult(step=i, seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started,
                          sent_bytes=self.counter.sent_bytes - before)

    def _per_image(self, req: DiffusionRequest) -> list[tuple[list[int], Conditioning]] | None:
        """For a batch-invariant request of several images (no pipeline stages): each image's rows of the model
        input (with batched guidance its uncond and cond rows, ``[i, images + i]``) and its text, selected once
        here for every step's :meth:`_predict_each`. None otherwise."""
        images = len(req.prompts)
        if not req.batch_invariant or images == 1 or self.pipe is not None:
            return None
        batched_cfg = self.guided and self.cfg == 1
        groups = [[i, images + i] if batched_cfg else [i] for i in range(images)]
        return [(g, self.text.select(g)) for g in groups]

    def _predict_each(self, x_in: torch.Tensor, t_model: Any, self_attn: Any, hw: tuple[int, int]) -> torch.Tensor:
        """The prediction of a batch-invariant request: one forward per image over the rows it has alone, so
        every matmul has the shape it has alone and the image gets the same bits; the loop, the rpcs and the
        scheduler stay shared."""
        preds = [self.pipeline.predict(x_in[rows], text, t_model, self.shard, self_attn, hw,
                                       guidance=self.req.guidance_scale) for rows, text in self.per_image]
        order = [row for rows, _ in self.per_image for row in rows]
        pred = torch.empty((len(order), *preds[0].shape[1:]), dtype=preds[0].dtype, device=preds[0].device)
        pred[order] = torch.cat(preds)
        return pred

    def end(self) -> RequestResult:
        req = self.req
        if req is None:
            raise RuntimeError("end called with no request in flight")
        if self.step_index != len(self.timesteps):
            raise RuntimeError(f"end after {self.step_index} of {len(self.timesteps)} steps")
        if self.attn is not None:
            self.attn.finish()
        latents = self._gather_rows(self.latents)
        trace = None
        if req.trace:  # every rank takes part in the gathers; rank 0 keeps the result
            trace = tuple(TraceStep(s.t, self._gather_rows(s.latents), self._gather_rows(s.pred)) for s in self.trace)
        self.req, self.attn, self.trace = None, None, []
        comm = self.counter.snapshot()
        if self.worker.rank != 0:
            return RequestResult(rank=self.worker.rank, comm=comm)
        return RequestResult(rank=0, comm=comm, latents=latents.float().cpu(),
                             images=self._decode(latents, req.batch_invariant) if req.output == "image" else None,
                             trace=trace, embeds=self.embeds if req.trace else None)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.sp == 1:
            return rows
        unit = self.model.config.row_unit
        counts = [(e - s) * unit for s, e in self.bands]
        _, finish = gather_tokens(rows.movedim(2, 0), counts, self.sp_comm, None, "gather_rows")
        return finish().movedim(0, 2)

    def _decode(self, latents: torch.Tensor, each: bool = False):
        from diffusers.image_processor import VaeImageProcessor

        if self.vae is None:  # on rank 0's device, in fp32
            self.vae = self.dir.load_component("vae").eval().to(self.device)
        with torch.no_grad():  # a batch-invariant request decodes each image with the shapes it has alone
            scaled = self.pipeline.to_vae(latents.float().to(self.device), self.vae)
            parts = scaled.split(1) if each else (scaled,)
            image = torch.cat([self.vae.decode(part, return_dict=False)[0] for part in parts])
        return VaeImageProcessor(vae_scale_factor=self.vae_scale).postprocess(image, output_type="np")


# -- the verbs the driver fans out (through Worker.attach / Worker.call) ----------------------------------------


def load_worker(worker: Any, engine_id: str, spec: LoadSpec) -> WorkerInfo:
    """Build this rank's :class:`DiffusionWorker` as engine ``engine_id``, or keep the loaded one when the spec
    is the same (tests and benchmarks reload the same model on cached workers)."""
    old = worker.engines.get(engine_id)
    if isinstance(old, DiffusionWorker) and old.spec == spec:
        return old.describe()
    return worker.attach(engine_id, DiffusionWorker, spec)


def run_request(dw: DiffusionWorker, request: DiffusionRequest) -> RequestResult:
    """The whole request in one call: begin, every denoising step, end (the driver's one rpc per image)."""
    dw.begin(request)
    steps = tuple(dw.step() for _ in range(len(dw.timesteps)))
    return dataclasses.replace(dw.end(), steps=steps)


def run_steps(dw: DiffusionWorker, count: int, checkpoint: bool = True) -> ChunkResult:
    """Up to ``count`` more denoising steps; then, if asked, this rank's checkpoint, unless the loop is done or
    its mode cannot resume (stale K/V)."""
    steps = tuple(dw.step() for _ in range(min(count, len(dw.timesteps) - dw.step_index)))
    done = dw.step_index == len(dw.timesteps)
    keep = checkpoint and not done and not keeps_stale_kv(dw.req.mode, dw.sp)
    return ChunkResult(rank=dw.worker.rank, steps=steps, checkpoint=dw.checkpoint() if keep else None)
