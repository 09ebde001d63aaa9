"""The job file: one YAML document (or flags) -> one validated :class:`JobFile`.

Every launch surface (``tessera run``, ``tessera submit``, ``ray job submit``,
SLURM batch scripts, the Python API) reads jobs through here, so a job that
cannot work is refused once, at the edge, before any worker starts.

A :class:`JobFile` holds the runtime's :class:`~tessera.config.JobSpec`
(plan, model, device, cluster, resources, timeouts, engine options) plus what
the job does with the workers (its ``task``) and where the result goes.

Example ``job.yaml``::

    name: tiny-moe
    task: generate            # generate (MoE LM) | images (diffusion) | mesh (collectives check)
    model: tiny-moe:mixtral   # a checkpoint directory, or tiny-moe:<family> / tiny-diffusion:<family>
    plan: {ep: 2, tp: 2}      # or "ep=2,tp=2", or auto (needs tessera.memory.planner)
    prompts: ["Hello"]
    sampling: {max_new_tokens: 8}
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from tessera.config import JobSpec, ParallelPlan, Timeouts
from tessera.errors import ConfigError
from tessera.options import DiffusionOptions, LLMOptions, OffloadConfig, from_mapping

TASKS: dict[str, str] = {
    "generate": "generate text with a Mixture-of-Experts language model (LLMEngine)",
    "images": "generate images with a diffusion transformer (DiffusionEngine)",
    "mesh": "check collectives over every mesh dim (no model needed)",
}

# Keys of SamplingParams (docs/DEVELOPING.md), checked here so that a typo
# fails before workers start rather than inside the engine.
SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int,
    "temperature": (int, float),
    "top_k": int,
    "top_p": (int, float),
    "seed": (int, type(None)),
    "stop_token_ids": (list, tuple),
}

TINY_MODEL_PREFIXES = ("tiny-moe:", "tiny-diffusion:")

# The top-level keys a job file may have, with a one-line meaning (used in errors).
JOB_KEYS: dict[str, str] = {
    "name": "a name for logs, files and SLURM (default: the file name): letters, digits, spaces, _ . , + @ = -",
    "task": "one of " + ", ".join(TASKS),
    "model": "checkpoint directory, or tiny-moe:<family> / tiny-diffusion:<family>",
    "plan": "degrees like {tp: 2, ep: 2} or 'tp=2,ep=2', or auto",
    "device": "cpu or cuda",
    "cluster": "null/local (embedded Ray), auto, or a Ray address",
    "cpus_per_rank": "logical CPUs per rank (default 1)",
    "timeouts": "placement_group_s, worker_start_s, process_group_s, call_s",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "offload": "offload tiers and budgets, e.g. {device_budget_bytes: 768MiB, nvme_dir: /mnt/nvme} (OffloadConfig)",
    "engine": "engine options: LLMOptions (generate) or DiffusionOptions (images)",
    "prompts": "list of prompts (generate, images)",
    "sampling": "max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids",
    "stream": "print tokens of the first prompt as they are produced (generate)",
    "images": "steps, height, width, guidance_scale, seed, mode, output_dir",
    "mesh": "payload_bytes of the collectives check",
    "min_nodes": "wait until the Ray cluster has this many nodes before placing",
    "wait_nodes_s": "how long to wait for min_nodes (default 180)",
    "output": "path of a JSON file to write the result to (inside the output root: see output_root())",
}

IMAGE_MODES = ("exact", "displaced", "partial", "ulysses")  # tessera.runtime.diffusion.request.MODES
# A job name becomes a file name (.tessera/slurm/<name>.sbatch, <name>-images/) and a SLURM job name:
# no path separators, no leading dot, no control or shell characters.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9 _.,+@=-]{0,99}")
OUTPUT_ROOT_ENV = "TESSERA_OUTPUT_ROOT"


def output_root() -> Path:
    """The directory job outputs may be written under: ``$TESSERA_OUTPUT_ROOT``, else the current directory.

    Why a root: a job file may come from someone else (a shared repository, a
    ``ray job`` submission); its ``output:`` must not be able to overwrite
    ``~/.bashrc`` or anything else outside the directory the job runs in.
    """
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or os.getcwd()).expanduser().resolve()


def confine_output(value: Any, key: str, example: str = "results/out.json") -> str:
    """``value`` as an absolute path inside :func:`output_root` (symlinks resolved), or a ConfigError naming ``key``."""
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{key} is {value!r}; give a path such as {example}")
    text = str(value)
    if any(ord(c) < 32 for c in text):
        raise ConfigError(f"{key} {text!r} contains a control character (newline, tab, ...); give a plain path")
    root = output_root()
    path = Path(text)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ConfigError(
            f"{key} {text!r} resolves to {resolved}, outside the output root {root}; write outputs under it "
            f"(a relative path such as {example}), or set {OUTPUT_ROOT_ENV} to a directory that may receive them"
        )
    return str(resolved)


def check_name(name: Any) -> str:
    """A job name usable as a file name and a SLURM job name; a ConfigError naming the rule otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"job name {name!r} is not allowed: use up to 100 letters, digits, spaces and _ . , + @ = -, starting "
            "with a letter, digit or _ (it names files such as .tessera/slurm/<name>.sbatch, so no / or leading .)"
        )
    return name


def safe_name(text: str) -> str:
    """A valid job name made from arbitrary text (a job file's stem): other characters become '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9 _.,+@=-]", "-", text).lstrip(" .,+@=-")[:100]
    return cleaned or "tessera-job"


@dataclass(frozen=True)
class ImageOptions:
    """Options of the ``images`` task, passed to ``DiffusionEngine.generate_images``."""

    steps: int = 4
    height: int = 32
    width: int = 32
    guidance_scale: float = 4.0
    seed: int = 0
    mode: str = "exact"
    output_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"images.{name} is {value!r}; it must be a positive integer")
        if (isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
                or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0):
            raise ConfigError(f"images.guidance_scale is {self.guidance_scale!r}; it must be a finite number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"images.seed is {self.seed!r}; it must be an integer >= 0")
        if self.mode not in IMAGE_MODES:
            raise ConfigError(f"images.mode is {self.mode!r}; use one of {', '.join(IMAGE_MODES)}")
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", confine_output(self.output_dir, "images.output_dir", "results/images"))

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "height": self.height,
            "width": self.width,
            "guidance_scale": float(self.guidance_scale),
            "seed": self.seed,
            "mode": self.mode,
        }


@dataclass(frozen=True)
class JobFile:
    """A validated job: the runtime's JobSpec plus the task and where its result goes.

    ``job.plan_auto`` is True when the plan is left to ``tessera.memory.planner``;
    then ``job.plan`` is a placeholder (a single rank).
    """

    job: JobSpec
    task: str = "mesh"
    name: str = "tessera-job"
    prompts: tuple[str, ...] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False
    images: ImageOptions = field(default_factory=ImageOptions)
    mesh_payload_bytes: int = 1 << 16
    min_nodes: int = 1
    wait_nodes_s: float = 180.0
    output: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.stream, bool):
            raise ConfigError(f"stream is {self.stream!r}; it must be true or false")
        if self.output is not None:
            object.__setattr__(self, "output", confine_output(self.output, "output"))
        if self.task not in TASKS:
            raise ConfigError(
                f"task {self.task!r} is unknown; use one of: " + "; ".join(f"{k} ({v})" for k, v in TASKS.items())
            )
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not all(isinstance(p, str) for p in self.prompts):
            raise ConfigError("prompts must be a list of strings, e.g. prompts: [\"Hello\"]")
        if self.task in ("generate", "images"):
            if not self.job.model:
                raise ConfigError(
                    f"task {self.task!r} needs a model: a checkpoint directory or "
                    f"{'tiny-moe:mixtral' if self.task == 'generate' else 'tiny-diffusion:pixart'}"
                )
        object.__setattr__(self, "sampling", check_sampling(self.sampling))
        expected = {"generate": LLMOptions, "images": DiffusionOptions}.get(self.task)
        if self.job.engine is not None and not isinstance(self.job.engine, expected or ()):
            want = expected.__name__ if expected else "none (the mesh task loads no engine)"
            raise ConfigError(f"engine options {type(self.job.engine).__name__} do not fit task {self.task!r}; "
                              f"it takes {want}")
        if isinstance(self.min_nodes, bool) or not isinstance(self.min_nodes, int) or self.min_nodes < 1:
            raise ConfigError(f"min_nodes is {self.min_nodes!r}; it must be an integer >= 1")
        if not (isinstance(self.wait_nodes_s, (int, float)) and math.isfinite(self.wait_nodes_s) and self.wait_nodes_s > 0):
            raise ConfigError(f"wait_nodes_s is {self.wait_nodes_s!r}; it must be a number of seconds > 0")
        if (isinstance(self.mesh_payload_bytes, bool) or not isinstance(self.mesh_payload_bytes, int)
                or self.mesh_payload_bytes < 4):
            raise ConfigError(f"mesh.payload_bytes is {self.mesh_payload_bytes!r}; it must be an integer >= 4")

    @property
    def plan_auto(self) -> bool:
        return self.job.plan_auto

    def check_runnable(self) -> None:
        """Refuse a job that a batch run (``tessera run``, Ray job, SLURM) could not finish.

        The Python API may launch without prompts (they come with each call);
        a batch job must carry them.
        """
        if self.task in ("generate", "images") and not self.prompts:
            raise ConfigError(f"task {self.task!r} needs at least one prompt; add prompts: [\"...\"] (or --prompt)")

    # -- construction --------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "JobFile":
        """Read and validate a YAML job file; errors name the file and the key."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"job file {str(path)!r} does not exist; pass the path of a YAML job file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"job file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"job file {str(path)!r} must hold a mapping of keys (task, model, plan, ...)")
        data = dict(data)
        data.setdefault("name", safe_name(path.stem))
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None) -> "JobFile":
        """Build from a mapping (a parsed YAML file, or flags turned into a dict)."""
        unknown = [k for k in data if k not in JOB_KEYS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(str(unknown[0]), list(JOB_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}: {JOB_KEYS[close[0]]}?)" if close else ""
            raise ConfigError(f"unknown job key {unknown[0]!r}{hint}; known keys: {', '.join(JOB_KEYS)}")
        plan_value = data.get("plan", None)
        plan_auto = isinstance(plan_value, str) and plan_value.strip().lower() == "auto"
        if plan_value is None:
            raise ConfigError("the job has no plan; give degrees like plan: {tp: 2, ep: 2}, or plan: auto")
        plan = ParallelPlan({}) if plan_auto else _parse_plan(plan_value)
        task = str(data.get("task", "generate" if data.get("model") else "mesh"))
        offload = from_mapping(OffloadConfig, data["offload"], "offload") if data.get("offload") is not None else None
        engine = None
        if data.get("engine") is not None:
            options_type = {"generate": LLMOptions, "images": DiffusionOptions}.get(task)
            if options_type is None:
                raise ConfigError(f"task {task!r} loads no engine, so it takes no engine options; drop the engine key")
            engine = from_mapping(options_type, data["engine"], "engine")
        cluster = data.get("cluster")
        if cluster is not None and not isinstance(cluster, str):
            raise ConfigError(f"cluster is {cluster!r}; give local, auto or a Ray address such as 10.0.0.1:6379")
        if isinstance(cluster, str) and cluster.strip().lower() in ("", "local", "none", "null"):
            cluster = None
        for key in ("model", "device", "log_level", "task"):
            if data.get(key) is not None and not isinstance(data[key], (str, os.PathLike) if key == "model" else str):
                raise ConfigError(f"{key} is {data[key]!r}; it must be a string ({JOB_KEYS[key]})")
        timeouts = data.get("timeouts") or {}
        if isinstance(timeouts, Mapping):
            known_timeouts = {f.name for f in fields(Timeouts)}
            bad = [k for k in timeouts if k not in known_timeouts]
            if bad:
                raise ConfigError(f"unknown timeout {bad[0]!r}; use {', '.join(sorted(known_timeouts))}")
        job = JobSpec(
            plan=plan,
            model=resolve_model_path(data.get("model"), base_dir),
            device=str(data.get("device", "cpu")),
            cluster=cluster,
            cpus_per_rank=_number(data.get("cpus_per_rank", 1.0), "cpus_per_rank"),
            timeouts=from_mapping(Timeouts, timeouts, "timeouts"),
            log_level=data.get("log_level"),
            plan_auto=plan_auto,
            engine=engine,
            offload=offload,
        )
        images = data.get("images") or {}
        if not isinstance(images, Mapping):
            raise ConfigError("images must be a mapping, e.g. images: {steps: 4, height: 32, width: 32}")
        bad = [k for k in images if k not in {f.name for f in fields(ImageOptions)}]
        if bad:
            raise ConfigError(f"unknown images option {bad[0]!r}; use {', '.join(f.name for f in fields(ImageOptions))}")
        mesh = data.get("mesh") or {}
        if not isinstance(mesh, Mapping) or any(k != "payload_bytes" for k in mesh):
            raise ConfigError("mesh must be a mapping with only payload_bytes, e.g. mesh: {payload_bytes: 65536}")
        prompts = data.get("prompts") or ()
        if isinstance(prompts, str):
            prompts = (prompts,)
        if not isinstance(prompts, (list, tuple)):
            raise ConfigError(f"prompts is {prompts!r}; give a list of strings, e.g. prompts: [\"Hello\"]")
        sampling = data.get("sampling") or {}
        if not isinstance(sampling, Mapping):
            raise ConfigError("sampling must be a mapping, e.g. sampling: {max_new_tokens: 8, temperature: 0}")
        return cls(
            job=job,
            task=task,
            name=data.get("name", "tessera-job"),
            prompts=tuple(prompts),
            sampling=dict(sampling),
            stream=data.get("stream", False),
            images=ImageOptions(**dict(images)),
            mesh_payload_bytes=mesh.get("payload_bytes", 1 << 16),
            min_nodes=data.get("min_nodes", 1),
            wait_nodes_s=_number(data.get("wait_nodes_s", 180.0), "wait_nodes_s"),
            output=data.get("output"),
        )

    def with_overrides(self, **changes: Any) -> "JobFile":
        """A copy with command-line overrides applied (``None`` means: keep the file's value)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        job_keys = {f.name for f in fields(JobSpec)}
        job_changes = {k: changes.pop(k) for k in list(changes) if k in job_keys and k != "plan"}
        job = self.job
        if "plan" in changes:
            value = changes.pop("plan")
            plan_auto = isinstance(value, str) and value.strip().lower() == "auto"
            job = replace(job, plan=ParallelPlan({}) if plan_auto else _parse_plan(value), plan_auto=plan_auto)
        if "cluster" in job_changes and str(job_changes["cluster"]).lower() in ("local", "none", "null", ""):
            job_changes["cluster"] = None
        if job_changes:
            job = replace(job, **job_changes)
        return replace(self, job=job, **changes)

    # -- views ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The job as a YAML-able mapping (what SLURM scripts embed); from_dict(to_dict()) round-trips."""
        job = self.job
        out: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "plan": "auto" if self.plan_auto else dict(job.plan.degrees),
            "device": job.device,
            "cpus_per_rank": job.cpus_per_rank,
            "timeouts": {f.name: getattr(job.timeouts, f.name) for f in fields(Timeouts)},
            "min_nodes": self.min_nodes,
            "wait_nodes_s": self.wait_nodes_s,
        }
        if job.log_level:
            out["log_level"] = job.log_level
        if job.model:
            out["model"] = job.model
        if job.cluster:
            out["cluster"] = job.cluster
        for key in ("offload", "engine"):
            value = getattr(job, key)
            if value is not None:
                out[key] = _changed_fields(value)
        if self.prompts:
            out["prompts"] = list(self.prompts)
        if self.sampling:
            out["sampling"] = dict(self.sampling)
        if self.stream:
            out["stream"] = True
        if self.task == "images":
            out["images"] = {f.name: getattr(self.images, f.name) for f in fields(ImageOptions)}
        if self.task == "mesh":
            out["mesh"] = {"payload_bytes": self.mesh_payload_bytes}
        if self.output:
            out["output"] = self.output
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _changed_fields(options: Any) -> dict[str, Any]:
    """The fields of an options object that differ from their defaults (what a job file needs to say)."""
    out = {}
    for f in fields(options):
        value = getattr(options, f.name)
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                               else MISSING)
        if default is MISSING or value != default:
            if is_dataclass(value):
                value = _changed_fields(value)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} is {value!r}; it must be a finite number")
    return float(value)


def _parse_plan(value: Any) -> ParallelPlan:
    if isinstance(value, ParallelPlan):
        return value
    if isinstance(value, Mapping):
        return ParallelPlan(dict(value))
    if isinstance(value, str):
        return ParallelPlan.parse(value)
    raise ConfigError(f"plan {value!r} is neither degrees ({{tp: 2}} or 'tp=2') nor auto")


def check_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(sampling, Mapping):
        raise ConfigError("sampling must be a mapping, e.g. sampling: {max_new_tokens: 8, temperature: 0}")
    out = {}
    for key, value in sampling.items():
        if key not in SAMPLING_KEYS:
            raise ConfigError(f"unknown sampling option {key!r}; use {', '.join(SAMPLING_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, SAMPLING_KEYS[key]):
            raise ConfigError(f"sampling.{key} is {value!r}, which has the wrong type")
        out[key] = tuple(value) if key == "stop_token_ids" else value
    if "max_new_tokens" in out and out["max_new_tokens"] < 1:
        raise ConfigError(f"sampling.max_new_tokens is {out['max_new_tokens']}; it must be >= 1")
    return out


def resolve_model_path(model: Any, base_dir: str | os.PathLike[str] | None) -> str | None:
    """Keep ``tiny-*:<family>`` names; make a relative checkpoint path absolute
    against the job file's folder (so a job runs the same from any cwd)."""
    if model is None:
        return None
    model = str(model)
    if model.startswith(TINY_MODEL_PREFIXES):
        return model
    path = Path(os.path.expanduser(model))
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    return str(path.resolve()) if path.exists() else model
