"""The driver-side diffusion engine: load a diffusers directory onto the workers, make images.

One ``collective_rpc`` per image when no progress bar is shown (the
denoising loop runs on the workers, SPMD); with the bar, one per denoising
step, so the driver shows a tqdm bar over steps and records per-step wall
time. The per-layer exchanges happen between ranks, never through the driver.
Workers answer with the typed results of ``protocol.py``.
Plans and requests are checked here, before any worker does work: the
``cfg`` degree must be 1 or 2, ``tp`` must divide the heads, ``pp`` may not
exceed the number of transformer blocks, Ulysses needs heads divisible by
``sp x tp``, the image must be tall enough to give every ``sp`` rank a row
and fit the checkpoint's position table; prompts, sizes, steps, seeds,
guidance and ``max_sequence_length`` are validated (``request.py``) with the
family's limits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tessera.errors import ConfigError
from tessera.models.diffusers_loader import DiffusersDir
from tessera.options import DiffusionOptions, OffloadConfig, from_mapping
from tessera.runtime.diffusion.protocol import (ChunkResult, LoadSpec, RequestResult, StepCheckpoint, StepResult,
                                                WorkerInfo)
from tessera.runtime.diffusion.request import DiffusionRequest, keeps_stale_kv, prompt_tuple
from tessera.runtime.diffusion.worker import DiffusionWorker, load_worker, run_request, run_steps
from tessera.runtime.recovery import FAULTS, Recovery, StepDeadline

ENGINE_ID = "diffusion"  # one diffusion model per set of workers: a new load replaces the old one


class DiffusionEngine:
    """Text-to-image on a started :class:`~tessera.runtime.controller.Controller`."""

    def __init__(self, controller: Any, model_dir: DiffusersDir, info: list[WorkerInfo],
                 options: DiffusionOptions, spec: LoadSpec) -> None:
        self.controller = controller
        self.spec = spec
        self.recovery = Recovery(controller, options.recovery, self._reload)
        ceiling = getattr(getattr(controller, "timeouts", None), "call_s", 600.0)
        self.deadline = StepDeadline(options.recovery, ceiling)
        self.dir = model_dir
        self.config = model_dir.module.parse(model_dir.transformer_config)
        self.defaults = model_dir.module.defaults(self.config)
        self.info = info
        self.options = options
        self.degrees = dict(controller.placement.plan.degrees)
        self.vae_scale = _vae_scale(model_dir)
        self.last: dict[str, Any] = {}
        self.history: list[dict] = []
        self._seconds_per_unit: float | None = None  # measured denoising time per (step x image x pixel)
        self._pending_replay: tuple[Any, float] | None = None  # (recovery record, resume time) until replayed

    @classmethod
    def load(cls, controller: Any, model_dir: str | Path, options: DiffusionOptions | Mapping[str, Any] | None = None,
             offload: OffloadConfig | Mapping[str, Any] | None = None, **overrides: Any) -> "DiffusionEngine":
        """Open and check ``model_dir`` here, then have every rank build its shard of the transformer.

        ``options``: :class:`~tessera.options.DiffusionOptions` (``dtype``, ``progress``: a tqdm bar)
        or a dict of its fields; keyword ``overrides`` are more of them. ``offload``
        (:class:`~tessera.options.OffloadConfig`): transformer blocks live in host memory or an NVMe
        tier file and stream in stage by stage within its device budget.
        """
        opts = from_mapping(DiffusionOptions, options, "DiffusionEngine.load")
        if overrides:
            opts = from_mapping(DiffusionOptions, {**opts.__dict__, **overrides}, "DiffusionEngine.load")
        if offload is not None:
            offload = from_mapping(OffloadConfig, offload, "offload")
        model = DiffusersDir.open(model_dir)
        model.check_components()  # vae, scheduler, text encoders: a missing config fails here, not per request
        degrees = dict(controller.placement.plan.degrees)
        cls.check_plan(model, degrees, offload=offload)
        spec = LoadSpec(model_dir=str(model.path), dtype=opts.dtype, offload=offload)
        info = controller.collective_rpc(load_worker, args=(ENGINE_ID, spec))
        return cls(controller, model, info, opts, spec)

    @staticmethod
    def check_plan(model: DiffusersDir, degrees: dict, offload: Any = None) -> None:
        """Refuse a plan that cannot work, on the driver, before any worker loads anything."""
        from tessera.models.diffusers_loader import build_transformer
        from tessera.parallel.dit_pipeline import check_pp, count_blocks
        from tessera.parallel.dit_tensor import check_tp

        unsupported = [d for d in degrees if d not in ("sp", "cfg", "tp", "pp", "dp") and degrees[d] > 1]
        if unsupported:
            raise ConfigError(f"diffusion runs over sp, cfg, tp and pp; the plan also has {unsupported} > 1: drop "
                              "them (sp: patch/sequence parallel, cfg: guidance branches, tp: weight sharding, "
                              "pp: block stages)")
        if degrees.get("dp", 1) > 1:
            raise ConfigError("diffusion does not use dp yet; run independent controllers for replicas")
        if degrees.get("cfg", 1) not in (1, 2):
            raise ConfigError(f"cfg degree is {degrees['cfg']}; classifier-free guidance has exactly 2 branches, "
                              "use cfg=2")
        config = model.module.parse(model.transformer_config)  # refuses unsupported flags, naming them
        check_tp(config.num_heads, degrees.get("tp", 1))
        pp = degrees.get("pp", 1)
        if pp > 1:
            check_pp(count_blocks(build_transformer(model.family, model.transformer_config), model.module.STAGES), pp)
            if offload is not None:
                raise ConfigError("offload streams all blocks through one device; with pp > 1 every stage already "
                                  "holds only its blocks: use pp or offload, not both")

    def generate_images(self, prompts: str | Sequence[str], *, steps: int | None = None, height: int = 64,
                        width: int = 64, guidance_scale: float | None = None, seed: int | Sequence[int] = 0,
                        mode: str = "exact",
                        warmup_steps: int = 1, partial_fraction: float = 0.25,
                        negative_prompt: str | Sequence[str] | None = "", max_sequence_length: int | None = None,
                        output: str = "image", trace: bool = False, batch_invariant: bool = False) -> list:
        """Return one ``PIL.Image`` per prompt (``output="latent"``: the final latents tensor instead).

        ``mode``: "exact", "displaced", "partial" (patch parallel) or "ulysses" (sequence parallel).
        ``warmup_steps``: exact steps before displaced/partial start using stale K/V.
        ``partial_fraction``: share of each neighbour band refreshed per step in "partial" mode.
        ``steps``, ``guidance_scale``, ``max_sequence_length``: the family's pipeline defaults when None.
        ``seed``: one seed (one batch-shaped noise draw, as diffusers with one generator), or one per prompt
        (each prompt's noise drawn alone: its image does not depend on what it is batched with; concurrent
        requests that share a size, step count, mode and guidance run as one batch this way).
        ``batch_invariant``: each image's text encoding, transformer forward and decode run with the shapes they
        have alone, so with one seed per prompt every image has the bits it gets alone (what ``tessera serve``
        does for concurrent requests); the denoising loop, its rpcs and exchanges stay shared. Without it the
        batch runs as one forward (faster where a larger matmul is: GPUs) and equals each image alone to fp32
        rounding. Needs a plan and mode without per-step shared state (no ``pp``; ``exact`` or ``ulysses``
        when ``sp`` > 1): see :meth:`supports_batch_invariance`.
        """
        req = self._request(prompts, steps, height, width, guidance_scale, seed, mode, warmup_steps,
                            partial_fraction, negative_prompt, max_sequence_length, output, trace, batch_invariant)
        started = time.perf_counter()
        per_step, step_s, results = self._run_recovering(req)
        step_bytes = [sum(s.sent_bytes for s in ranks) for ranks in per_step]
        step_cpu = [max(s.cpu_seconds for s in ranks) for ranks in per_step]  # the busiest rank per step
        head = results[0]
        self.last = {
            "mode": req.mode, "steps": req.steps, "height": req.height, "width": req.width,
            "batch": len(req.prompts),
            "seconds": time.perf_counter() - started, "step_seconds": step_s, "step_cpu_seconds": step_cpu,
            "sent_bytes_per_step": step_bytes,
            "sent_bytes_total": sum(r.comm.sent_bytes for r in results),
            "comm_by_rank": [r.comm.as_dict() for r in results],
            "latents": head.latents,
        }
        if trace:
            self.last["trace"] = [{"t": s.t, "latents": s.latents, "pred": s.pred} for s in head.trace]
            self.last["embeds"] = head.embeds
        self.history.append({k: v for k, v in self.last.items() if k not in ("latents", "trace", "embeds")})
        if output == "latent":
            return [head.latents]
        from PIL import Image

        return [Image.fromarray((img * 255).round().clip(0, 255).astype("uint8")) for img in head.images]

    def _run_recovering(self, req: DiffusionRequest):
        """Run ``req``; after a fault (a rank died, stalled or failed mid-loop) restart every rank, reload and
        resume from the ranks' last step checkpoints (or rerun from the seed: the same noise and schedule), so
        the same latents come out. A request that cannot finish within the restart budget fails with
        :class:`~tessera.runtime.recovery.RecoveryFailed`."""
        units = req.steps * len(req.prompts) * req.height * req.width
        if self.options.progress or self._worth_checkpointing(req, units):
            return self._run_in_chunks(req, units)
        while True:  # one rpc per image: the denoising loop runs on the workers, per-step times measured there
            started = time.perf_counter()
            try:
                results: list[RequestResult] = self.controller.collective_rpc(
                    "call", args=(ENGINE_ID, run_request, req), timeout_s=self.deadline.seconds(units),
                    stall_s=self.options.recovery.stall_floor_s)
            except FAULTS as fault:
                record = self.recovery.recover(fault, detect_s=time.perf_counter() - started)
                self._pending_replay = (record, time.perf_counter())
                continue
            self.deadline.record(time.perf_counter() - started, units)
            self._replayed()  # the rerun of the whole image was the replay
            self._seconds_per_unit = (time.perf_counter() - started) / units
            per_step = [[r.steps[i] for r in results] for i in range(req.steps)]
            return per_step, [max(s.seconds for s in ranks) for ranks in per_step], results

    def _worth_checkpointing(self, req: DiffusionRequest, units: float) -> bool:
        """Chunked with checkpoints when the mode can resume and the image takes longer than one checkpoint
        interval (or its time is not known yet); a short image stays one rpc."""
        every = self.options.checkpoint_s
        if every is None or keeps_stale_kv(req.mode, self.degrees.get("sp", 1)):
            return False
        return self._seconds_per_unit is None or self._seconds_per_unit * units > every

    def _chunk_steps(self, req: DiffusionRequest, units: float) -> int:
        """Steps per rpc: one with the bar or before any step was timed, else a checkpoint interval's worth."""
        every = self.options.checkpoint_s
        if self.options.progress or self._seconds_per_unit is None or every is None:
            return 1
        return max(1, int(every / (self._seconds_per_unit * units / req.steps)))

    def _run_in_chunks(self, req: DiffusionRequest, units: float):
        """begin, ``run_steps`` per chunk (timed here, shown on a tqdm bar when ``progress``), end. After each chunk
        the driver keeps every rank's checkpoint; after a fault the ranks restart from it."""
        from tqdm.auto import tqdm

        ctl, stall_s, every = self.controller, self.options.recovery.stall_floor_s, self.options.checkpoint_s
        keep = every is not None and not keeps_stale_kv(req.mode, self.degrees.get("sp", 1))
        per_step: list[list[StepResult]] = []
        step_s: list[float] = []
        saved: tuple[StepCheckpoint, ...] | None = None
        saved_at = time.perf_counter()
        reached = 0  # the steps done or in flight when the last fault struck: the replay ends once past them
        bar = tqdm(total=req.steps, desc=f"denoise ({req.mode}, {self.dir.family})", unit="step", leave=False,
                   disable=not self.options.progress)
        try:
            while True:
                started, in_flight = time.perf_counter(), len(per_step)
                try:
                    # begin and end encode and decode, and may first load the text encoders or the VAE (lazy):
                    # no step-sized deadline for them, heartbeats still find a stalled rank
                    ctl.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.begin, req, saved),
                                       timeout_s=self.deadline.ceiling_s, stall_s=stall_s)
                    while len(per_step) < req.steps:
                        count = min(self._chunk_steps(req, units), req.steps - len(per_step))
                        work = units * count / req.steps
                        started, in_flight = time.perf_counter(), len(per_step) + count
                        # a checkpoint after every chunk, or with the bar's one-step chunks every ``every`` seconds
                        want = keep and (not self.options.progress or started - saved_at >= every)
                        chunk: list[ChunkResult] = ctl.collective_rpc(
                            "call", args=(ENGINE_ID, run_steps, count, want), timeout_s=self.deadline.seconds(work),
                            stall_s=stall_s)
                        elapsed = time.perf_counter() - started
                        self.deadline.record(elapsed, work)
                        self._seconds_per_unit = elapsed / work
                        per_step += [[r.steps[i] for r in chunk] for i in range(count)]
                        step_s += [elapsed / count] * count if self.options.progress \
                            else [max(s.seconds for s in ranks) for ranks in per_step[-count:]]
                        if chunk[0].checkpoint is not None:
                            saved, saved_at = tuple(r.checkpoint for r in chunk), time.perf_counter()
                        if len(per_step) >= reached:
                            self._replayed()  # the lost steps ran again, through the interrupted chunk
                        bar.set_postfix_str(f"{elapsed / count * 1e3:.0f} ms/step")
                        bar.update(count)
                    started, in_flight = time.perf_counter(), req.steps
                    results = ctl.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.end),
                                                 timeout_s=self.deadline.ceiling_s, stall_s=stall_s)
                    self._replayed()
                    return per_step, step_s, results
                except FAULTS as fault:
                    record = self.recovery.recover(fault, detect_s=time.perf_counter() - started)
                    self._pending_replay = (record, time.perf_counter())
                    done = record.resume_step = saved[0].step if saved is not None else 0
                    reached = max(reached, in_flight)
                    del per_step[done:], step_s[done:]  # the steps after the checkpoint run again
                    bar.reset(total=req.steps)
                    bar.update(done)
        finally:
            bar.close()

    def _replayed(self) -> None:
        """Close the pending recovery record: ``replay_s`` is the time from the resume (or rerun) until the work
        lost to the fault ran again: the steps since the last checkpoint through the interrupted chunk (the whole
        image without checkpoints)."""
        if self._pending_replay is not None:
            record, resumed = self._pending_replay
            record.replay_s = time.perf_counter() - resumed
            self._pending_replay = None

    def _reload(self) -> None:
        """Rebuild every rank's shard on the restarted workers (Recovery's reload step)."""
        self.info = self.controller.collective_rpc(load_worker, args=(ENGINE_ID, self.spec))
        self.deadline.expect_cold_start()

    def supports_batch_invariance(self, mode: str) -> bool:
        """Whether images of ``mode`` can be computed one forward each inside a shared loop: not with pipeline
        stages (their micro-batches split the batch) nor when patch-parallel ranks keep stale K/V of the whole
        batch between steps (``displaced``, ``partial`` with ``sp`` > 1)."""
        return self.degrees.get("pp", 1) == 1 and not keeps_stale_kv(mode, self.degrees.get("sp", 1))

    def _request(self, prompts, steps, height, width, guidance_scale, seed, mode, warmup_steps, partial_fraction,
                 negative_prompt, max_sequence_length, output, trace, batch_invariant=False) -> DiffusionRequest:
        """The validated request: arguments, then what this model and plan allow."""
        prompts = prompt_tuple(prompts, "prompts")
        if negative_prompt is None:
            negative_prompt = ""
        negatives = (negative_prompt,) * len(prompts) if isinstance(negative_prompt, str) \
            else prompt_tuple(negative_prompt, "negative_prompt")
        d = self.defaults
        req = DiffusionRequest(
            prompts=prompts, negative_prompts=negatives, steps=d.steps if steps is None else steps, height=height,
            width=width, guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
            seed=seed if isinstance(seed, int) or not isinstance(seed, Sequence) else tuple(seed),
            mode=mode, warmup_steps=warmup_steps, partial_fraction=partial_fraction,
            max_sequence_length=d.max_sequence_length if max_sequence_length is None else max_sequence_length,
            output=output, trace=trace, batch_invariant=batch_invariant,
        )
        if req.batch_invariant and len(req.prompts) > 1 and not self.supports_batch_invariance(req.mode):
            raise ValueError(f"batch_invariant images need one forward per image, which mode {req.mode!r} on plan "
                             f"{self.degrees} cannot do (pipeline stages, or stale K/V shared by the batch); "
                             "use mode='exact' or 'ulysses' on a plan without pp, or generate the prompts one by one")
        if req.max_sequence_length > d.max_sequence_limit:
            raise ValueError(f"max_sequence_length {req.max_sequence_length} exceeds {d.max_sequence_limit}, the "
                             f"longest text this {self.dir.family} pipeline encodes; use at most "
                             f"{d.max_sequence_limit} (default {d.max_sequence_length})")
        sp, cfg, tp = self.degrees.get("sp", 1), self.degrees.get("cfg", 1), self.degrees.get("tp", 1)
        uses_cfg = self.config.uses_cfg
        if cfg == 2 and not (req.guided and uses_cfg):
            raise ValueError(f"the plan has cfg=2 but this request has one branch (guidance_scale={req.guidance_scale}"
                             f"{'; this checkpoint embeds guidance instead of CFG' if not uses_cfg else ''}); "
                             "use guidance_scale > 1 with a CFG model, or a plan without cfg")
        if mode == "ulysses":
            heads = self.config.num_heads
            if heads % (sp * tp):
                raise ValueError(f"Ulysses needs the {heads} heads divisible by sp x tp = {sp * tp}; "
                                 "use mode='exact' (patch parallel works for any sp)")
        patch = self.config.row_unit
        unit = self.vae_scale * patch
        if height % unit or width % unit:
            raise ValueError(f"height and width must be multiples of {unit} pixels for this model "
                             f"(VAE factor {self.vae_scale} x patch {patch}); got {height}x{width}")
        if height // unit < sp:
            raise ValueError(f"height {height} gives {height // unit} patch rows, fewer than sp={sp} ranks; "
                             f"use height >= {sp * unit}")
        self.config.check_grid(height // unit, width // unit)
        return req

    def stats(self) -> dict:
        """The last request's timing and communication, plus model placement info."""
        last = {k: v for k, v in self.last.items() if k not in ("latents", "trace", "embeds")}
        return {"family": self.dir.family, "plan": self.degrees,
                "param_bytes_per_rank": [i.param_bytes for i in self.info],
                "loaded_bytes_per_rank": [i.loaded_bytes for i in self.info],
                "load_seconds_per_rank": [i.load_s for i in self.info],
                "requests": len(self.history), "last": last, "recovery": self.recovery.summary()}

    def offload_stats(self) -> list[dict | None]:
        """Per rank: block-streaming counters (reads, bytes, device peak); None where the blocks are resident."""
        return self.controller.collective_rpc("call", args=(ENGINE_ID, DiffusionWorker.offload_stats))

    def close(self) -> None:
        """Drop the model from every rank (the controller stays up)."""
        self.controller.collective_rpc("detach", args=(ENGINE_ID,))


def _vae_scale(model_dir: DiffusersDir) -> int:
    """Pixels per latent pixel: 2 per VAE down block after the first (diffusers' vae_scale_factor)."""
    vae_cfg = json.loads((model_dir.path / "vae" / "config.json").read_text())
    return 2 ** (len(vae_cfg.get("block_out_channels", [1])) - 1)
