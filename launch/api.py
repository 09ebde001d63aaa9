"""The Python launcher: ``tessera.launch(model=..., plan=...)`` -> a running :class:`Handle`.

A handle owns one :class:`~tessera.runtime.controller.Controller` (its
placement groups and worker actors) and, when a model is given, one engine
(``LLMEngine`` or ``DiffusionEngine``). Several handles of one process share
one Ray connection (:class:`~tessera.runtime.ray_env.RayConnection`), so one
handle's shutdown never pulls Ray out from under another.

Everything that can be checked before workers start is checked first: the
job (``JobFile``: plan, typed engine and offload options), the model
(exists, or is a buildable ``tiny-*`` name), the placement (the planner), the
cluster address (a GCS address, not the dashboard's ``http://`` one).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tessera.config import JobSpec, Timeouts
from tessera.errors import ConfigError, WaitTimeout
from tessera.launch.jobfile import JobFile, check_sampling
from tessera.memory.placement import Placement
from tessera.options import DiffusionOptions, LLMOptions, OffloadConfig, SamplingParams
from tessera.runtime.controller import Controller, RankInfo
from tessera.runtime.ray_env import RayConnection

log = logging.getLogger("tessera.launch")

INPROCESS = "inprocess"  # cluster value: one rank served in this process, no Ray (tessera.runtime.inprocess)


def is_inprocess(cluster: str | None) -> bool:
    return isinstance(cluster, str) and cluster.strip().lower() == INPROCESS


def resolve_address(cluster: str | None) -> str | None:
    """``None``: embedded Ray, unless ``RAY_ADDRESS`` names a cluster (as inside
    ``ray job submit`` and the SLURM scripts); ``"auto"`` or ``HOST:PORT`` otherwise."""
    if cluster is None:
        env = os.environ.get("RAY_ADDRESS", "").strip()
        cluster = env or None
    if cluster is None:
        return None
    if cluster.startswith(("http://", "https://")):
        raise ConfigError(
            f"cluster {cluster!r} is the dashboard (job submission) address; to submit there use "
            f"`tessera submit JOB --address {cluster}`, to connect directly give the GCS address HOST:6379"
        )
    return cluster


def wait_for_nodes(min_nodes: int, timeout_s: float) -> int:
    """Block until the connected Ray cluster has ``min_nodes`` alive nodes; returns the count."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive >= min_nodes:
            return alive
        if time.monotonic() > deadline:
            raise WaitTimeout(
                f"waited {timeout_s:.0f}s for {min_nodes} Ray node(s) to join; {alive} did. "
                f"Check that every worker node ran `ray start --address` with the same auth token"
            )
        time.sleep(0.25)


# -- models and engines -------------------------------------------------------------


def model_kind(model: str) -> str:
    """``"llm"`` or ``"diffusion"``, from a ``tiny-*`` name or the checkpoint's files."""
    if model.startswith("tiny-moe:"):
        return "llm"
    if model.startswith("tiny-diffusion:"):
        return "diffusion"
    path = Path(model)
    if not path.exists():
        raise ConfigError(
            f"model {model!r} is neither a checkpoint directory nor a tiny model name; "
            f"give a directory with config.json and *.safetensors, or tiny-moe:mixtral / tiny-diffusion:pixart"
        )
    if (path / "model_index.json").exists():
        return "diffusion"
    config = path / "config.json"
    if config.exists() and "_class_name" in config.read_text()[:4096]:
        return "diffusion"  # a diffusers transformer directory
    return "llm"


def _engine_class(kind: str) -> Any:
    if kind == "llm":
        from tessera.runtime.llm.engine import LLMEngine

        return LLMEngine
    from tessera.runtime.diffusion.engine import DiffusionEngine

    return DiffusionEngine


def materialise_model(model: str) -> str:
    """A checkpoint directory for ``model``; ``tiny-*:<family>`` is built once and cached
    under ``$TESSERA_CACHE`` (default ``~/.cache/tessera``)."""
    cache = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
    if model.startswith("tiny-moe:"):
        from tessera.models.tiny_moe import build_tiny_moe

        family = model.removeprefix("tiny-moe:")
        # Language models get a toy tokenizer so results carry text.
        return str(build_tiny_moe(family, cache / "tiny-moe" / family, tokenizer=True))
    if model.startswith("tiny-diffusion:"):
        from tessera.models.tiny_diffusion import build_tiny_diffusion

        family = model.removeprefix("tiny-diffusion:")
        target = cache / "tiny-diffusion" / family
        return str(build_tiny_diffusion(family, target) or target)
    return model


def plan_placement(job: JobSpec, inventory: Any = None) -> Placement:
    """The planner's Placement for ``job`` (degrees chosen for ``plan: auto``, else checked)."""
    if job.plan_auto or job.model:
        from tessera.memory.planner import plan_job  # reads safetensors headers (imports torch)

        return plan_job(job, inventory=inventory)
    return Placement.from_job(job)


def plan_inprocess(job: JobSpec, min_nodes: int = 1) -> Placement:
    """The one-rank Placement of ``cluster="inprocess"``: planned for this process's one device, or refused."""
    from tessera.memory.inventory import detect_inventory

    if min_nodes > 1:
        raise ConfigError(f"cluster {INPROCESS!r} runs one rank in this process; min_nodes={min_nodes} needs a Ray "
                          "cluster (cluster=None, 'auto' or an address)")
    if job.plan.world_size != 1:
        raise ConfigError(
            f"cluster {INPROCESS!r} runs exactly one rank in this process, but plan {job.plan} has "
            f"{job.plan.world_size} ranks; use a one-rank plan (or plan auto), or a Ray cluster (cluster=None for an "
            "embedded one, 'auto' or an address) for more ranks"
        )
    # The planner sees one device: this GPU (cuda), or this host's memory (cpu).
    inventory = detect_inventory(job.device, replace(job.planning, world_size=1)) if job.plan_auto or job.model else None
    placement = plan_placement(job, inventory)
    if placement.world_size != 1:  # pragma: no cover - one device cannot yield more ranks
        raise ConfigError(f"the planner chose plan {placement.plan} ({placement.world_size} ranks) for one device")
    return placement


# -- the handle -----------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchTimings:
    """Where the launch time went, in seconds."""

    ray_connect_s: float
    wait_nodes_s: float
    model_s: float
    plan_s: float
    workers_s: float
    engine_load_s: float

    @property
    def total_s(self) -> float:
        return self.ray_connect_s + self.wait_nodes_s + self.model_s + self.plan_s + self.workers_s + self.engine_load_s


class Handle:
    """A launched job: placed workers plus (with a model) a loaded engine.

    Use as a context manager, or call :meth:`shutdown`; both release the
    engine, the workers, the placement groups and (if this handle was the
    last user of a Ray it started) Ray itself.
    """

    def __init__(self, job: JobSpec, placement: Placement, controller: Controller, engine: Any,
                 engine_kind: str | None, model_dir: str | None, timings: LaunchTimings, uses_ray: bool = True) -> None:
        self.job = job
        self.uses_ray = uses_ray  # False for cluster="inprocess": no Ray connection to release
        self.placement = placement
        self.controller = controller
        self.engine = engine
        self.engine_kind = engine_kind
        self.model_dir = model_dir
        self.timings = timings
        self._closed = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<tessera Handle {self.placement.plan} on {self.placement.device}, model={self.job.model!r}, {state}>"

    # -- where things are -------------------------------------------------------

    @property
    def ranks(self) -> list[RankInfo]:
        """Where every rank landed: node, pid, device, mesh coordinates."""
        return self.controller.describe()

    def describe(self) -> str:
        """A table of the placement: one line per rank."""
        lines = [f"plan {self.placement.plan} ({self.placement.world_size} ranks, {self.placement.device})"]
        lines.append(f"  {'rank':>4}  {'node':<16} {'host':<16} {'pid':>7}  {'device':<7} mesh coords")
        for info in self.ranks:
            coords = ", ".join(f"{d}={c}" for d, c in info.coords.items())
            lines.append(
                f"  {info.rank:>4}  {info.node_ip:<16} {info.hostname[:16]:<16} {info.pid:>7}  {info.device:<7} {coords}"
            )
        return "\n".join(lines)

    def stats(self) -> dict[str, Any]:
        """Launch timings, worker health and, with an engine, the engine's own stats."""
        self._check_open()
        out: dict[str, Any] = {
            "plan": str(self.placement.plan),
            "world_size": self.placement.world_size,
            "nodes": len({r.node_id for r in self.ranks}),
            "launch_s": {**self.timings.__dict__, "total_s": self.timings.total_s},
            "controller_startup_s": dict(self.controller.startup_timings),
            "health": self.controller.health(),
        }
        if self.engine is not None:
            out["engine"] = self.engine.stats()
        return out

    # -- work --------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str], sampling: Any = None, **sampling_kw: Any) -> list[Any]:
        """Generate text for each prompt (MoE LM); returns the engine's GenerationResults."""
        engine = self._engine("llm", "generate")
        single = isinstance(prompts, str)
        results = engine.generate([prompts] if single else list(prompts), self._sampling(sampling, sampling_kw))
        return results

    def stream(self, prompt: str, sampling: Any = None, **sampling_kw: Any) -> Iterator[int]:
        """Token ids of one prompt as they are produced (MoE LM)."""
        engine = self._engine("llm", "stream")
        return engine.stream(prompt, self._sampling(sampling, sampling_kw))

    def generate_images(self, prompts: str | Sequence[str], **options: Any) -> list[Any]:
        """Images (PIL) for each prompt (diffusion); options go to DiffusionEngine.generate_images."""
        engine = self._engine("diffusion", "generate_images")
        return engine.generate_images([prompts] if isinstance(prompts, str) else list(prompts), **options)

    def offload_stats(self) -> list[dict[str, Any] | None]:
        """Per rank: the offload tiers' counters (reads, bytes, cache hits, peaks); None where nothing is offloaded."""
        self._check_open()
        if self.engine is None:
            raise ConfigError("offload_stats() needs a model; this handle was launched without one")
        return self.engine.offload_stats()

    def check_mesh(self, payload_bytes: int = 1 << 16) -> dict[str, Any]:
        """Run the collectives check over every mesh dim; verify each value against the plan."""
        from tessera.runtime.diagnostics import check_mesh

        self._check_open()
        results, failures = check_mesh(self.controller, payload_bytes)
        return {
            "correct": not failures,
            "failures": failures,
            "timings_ms": {dim: got["timings_ms"] for dim, got in results[0]["dims"].items()},
            "dims": {dim: got["group_size"] for dim, got in results[0]["dims"].items()},
        }

    def shutdown(self) -> None:
        """Release engine, workers, placement groups, and Ray if this was its last user."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.engine is not None:
                self.engine.close()
        finally:
            try:
                self.controller.shutdown()
            finally:
                if self.uses_ray:
                    RayConnection.release()

    # -- helpers -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this tessera handle is shut down; launch a new one")

    def _engine(self, kind: str, verb: str) -> Any:
        self._check_open()
        if self.engine is None:
            raise ConfigError(f"{verb}() needs a model; this handle was launched without one (launch(model=...))")
        if self.engine_kind != kind:
            other = "generate_images()" if self.engine_kind == "diffusion" else "generate()"
            raise ConfigError(f"{verb}() needs a {kind} model, but {self.job.model!r} is a {self.engine_kind} model; use {other}")
        return self.engine

    def _sampling(self, sampling: Any, overrides: Mapping[str, Any]) -> Any:
        if sampling is not None and not overrides:
            return sampling
        base = dict(sampling.__dict__) if sampling is not None else {}
        base.update(check_sampling(overrides))
        return SamplingParams(**base)


def launch(
    model: str | None = None,
    plan: str | Mapping[str, int] | Any = "auto",
    cluster: str | None = None,
    *,
    device: str = "cpu",
    offload: Mapping[str, Any] | OffloadConfig | None = None,
    cpus_per_rank: float = 1.0,
    timeouts: Timeouts | None = None,
    log_level: str | None = None,
    engine_options: Mapping[str, Any] | LLMOptions | DiffusionOptions | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    min_nodes: int = 1,
    num_cpus: int | None = None,
) -> Handle:
    """Place workers for ``model`` with ``plan`` on ``cluster`` and load the engine.

    ``model``: checkpoint directory, ``tiny-moe:<family>``, ``tiny-diffusion:<family>``,
    or ``None`` (workers and mesh only). ``plan``: degrees (``{"tp": 2}``,
    ``"tp=2,ep=2"``, a ParallelPlan) or ``"auto"`` (tessera.memory.planner).
    ``cluster``: ``None`` (embedded Ray, or ``$RAY_ADDRESS`` when set),
    ``"auto"`` or a GCS address; ``"inprocess"``: one rank served in this
    process with no Ray (:mod:`tessera.runtime.inprocess`; a plan of more
    than one rank is refused). ``offload``: an :class:`~tessera.options.OffloadConfig`
    or a dict of its fields (``{"device_budget_bytes": "768MiB", "nvme_dir": ...}``).
    ``engine_options``: :class:`~tessera.options.LLMOptions` /
    :class:`~tessera.options.DiffusionOptions` or a dict of their fields.
    Both are validated here, before Ray starts. ``num_cpus``: logical CPUs of
    an embedded Ray (default: enough for the plan, at least 8, so several
    handles fit).
    """
    jobfile = _jobfile_from_keywords(model, plan, cluster, device=device, offload=offload,
                                     cpus_per_rank=cpus_per_rank, timeouts=timeouts, log_level=log_level,
                                     engine_options=engine_options, min_nodes=min_nodes)
    return launch_job(jobfile, runtime_env=runtime_env, num_cpus=num_cpus)


def _jobfile_from_keywords(model: str | None, plan: Any, cluster: str | None, *, device: str,
                           offload: Any, cpus_per_rank: float, timeouts: Timeouts | None, log_level: str | None,
                           engine_options: Any, min_nodes: int = 1) -> JobFile:
    """The JobFile that :func:`launch` and :func:`serve` keywords describe; the task follows the model."""
    data: dict[str, Any] = {
        "task": {None: "mesh", "llm": "generate", "diffusion": "images"}[model_kind(model) if model else None],
        "plan": plan if not hasattr(plan, "degrees") else dict(plan.degrees),
        "device": device,
        "cpus_per_rank": cpus_per_rank,
        "min_nodes": min_nodes,
    }
    optional = {"model": model, "cluster": cluster, "log_level": log_level, "offload": offload,
                "engine": engine_options}
    data.update({k: v for k, v in optional.items() if v is not None})
    jobfile = JobFile.from_dict(data)
    return jobfile.with_overrides(timeouts=timeouts) if timeouts is not None else jobfile


def launch_job(jobfile: JobFile, runtime_env: Mapping[str, Any] | None = None, num_cpus: int | None = None) -> Handle:
    """Launch a validated JobFile (what ``tessera run`` and :func:`launch` both do)."""
    job = jobfile.job
    if is_inprocess(job.cluster):
        return _launch_inprocess(jobfile)
    address = resolve_address(job.cluster)
    # The mesh check needs no engine: a model given with task mesh is not loaded.
    kind = model_kind(job.model) if job.model and jobfile.task != "mesh" else None
    if jobfile.task == "mesh" and job.model and not job.plan_auto:
        job = replace(job, model=None)  # not loaded, so not planned for either
    t0 = time.perf_counter()
    model_dir = materialise_model(job.model) if job.model and kind else job.model
    if model_dir != job.model:
        job = replace(job, model=model_dir)
    t1 = time.perf_counter()
    placement = plan_placement(job)
    t2 = time.perf_counter()
    needed = int(placement.world_size * placement.cpus_per_rank + 0.999)
    RayConnection.acquire(address, runtime_env, num_cpus or needed)
    t_connected = time.perf_counter()
    controller = None
    try:
        if jobfile.min_nodes > 1:
            wait_for_nodes(jobfile.min_nodes, jobfile.wait_nodes_s)
        t3 = time.perf_counter()
        controller = Controller(placement, address=address, timeouts=job.timeouts, log_level=job.log_level)
        controller.start()
        t4 = time.perf_counter()
        engine = None
        if kind is not None:
            engine = _engine_class(kind).load(controller, model_dir, job.engine, offload=job.offload)
        t5 = time.perf_counter()
    except BaseException:
        if controller is not None:
            controller.shutdown()
        RayConnection.release()
        raise
    timings = LaunchTimings(
        ray_connect_s=t_connected - t2, wait_nodes_s=t3 - t_connected, model_s=t1 - t0, plan_s=t2 - t1, workers_s=t4 - t3, engine_load_s=t5 - t4
    )
    return Handle(job, placement, controller, engine, kind if engine is not None else None, model_dir, timings)


def _launch_inprocess(jobfile: JobFile) -> Handle:
    """``cluster="inprocess"``: plan for one device, serve the rank in this process (no Ray), load the engine."""
    from tessera.runtime.inprocess import InProcessController

    job = jobfile.job
    kind = model_kind(job.model) if job.model and jobfile.task != "mesh" else None
    if jobfile.task == "mesh" and job.model and not job.plan_auto:
        job = replace(job, model=None)
    t0 = time.perf_counter()
    model_dir = materialise_model(job.model) if job.model and kind else job.model
    if model_dir != job.model:
        job = replace(job, model=model_dir)
    t1 = time.perf_counter()
    placement = plan_inprocess(job, jobfile.min_nodes)
    t2 = time.perf_counter()
    controller = InProcessController(placement, timeouts=job.timeouts, log_level=job.log_level)
    try:
        controller.start()
        t3 = time.perf_counter()
        engine = _engine_class(kind).load(controller, model_dir, job.engine, offload=job.offload) if kind else None
        t4 = time.perf_counter()
    except BaseException:
        controller.shutdown()
        raise
    timings = LaunchTimings(ray_connect_s=0.0, wait_nodes_s=0.0, model_s=t1 - t0, plan_s=t2 - t1, workers_s=t3 - t2,
                            engine_load_s=t4 - t3)
    return Handle(job, controller.placement, controller, engine, kind if engine is not None else None, model_dir,
                  timings, uses_ray=False)


def serve(
    model: str | None = None,
    plan: str | Mapping[str, int] | Any = "auto",
    cluster: str | None = None,
    *,
    job: JobFile | str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_waiting: int = 256,
    device: str = "cpu",
    offload: Mapping[str, Any] | OffloadConfig | None = None,
    cpus_per_rank: float = 1.0,
    timeouts: Timeouts | None = None,
    log_level: str | None = None,
    engine_options: Mapping[str, Any] | LLMOptions | DiffusionOptions | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    num_cpus: int | None = None,
    **server_options: Any,
) -> Any:
    """Serve a model over an OpenAI-compatible HTTP API on Ray Serve; returns a running ``ServeHandle``.

    The job is given like :func:`launch` (``model``, ``plan``, ``cluster``,
    ``engine_options``, ...) or as a job file (``job``: a path or a JobFile).
    ``host``/``port``: where the API listens (127.0.0.1 unless asked; any
    other address needs ``api_key``, which clients send as ``Authorization:
    Bearer KEY``). ``max_waiting``: requests that may wait to start before
    new ones get 429. More :class:`~tessera.launch.serve.options.ServeOptions`
    fields may be given as keywords. ``handle.url`` is the base URL;
    ``handle.shutdown()`` (or ``with``) stops the server, its engine and its
    workers.
    """
    from tessera.launch.serve.options import ServeOptions
    from tessera.launch.serve.server import start

    options = ServeOptions(host=host, port=port, api_key=api_key, served_model_name=served_model_name,
                           max_waiting=max_waiting, **server_options)
    if job is not None:
        if model is not None:
            raise ConfigError("give the model either in the job file (job=...) or as model=..., not both")
        jobfile = job if isinstance(job, JobFile) else JobFile.from_yaml(job)
    else:
        if model is None:
            raise ConfigError("serve() needs a model: a checkpoint directory, tiny-moe:<family> or "
                              "tiny-diffusion:<family> (or job=PATH of a job file)")
        jobfile = _jobfile_from_keywords(model, plan, cluster, device=device, offload=offload,
                                         cpus_per_rank=cpus_per_rank, timeouts=timeouts, log_level=log_level,
                                         engine_options=engine_options)
    return start(jobfile, options, runtime_env=runtime_env, num_cpus=num_cpus)
