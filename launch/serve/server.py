"""Start and stop a tessera server on Ray Serve: ``start(jobfile, options) -> ServeHandle``.

What happens, in order: the job is checked on this machine before anything
starts (a model to serve, a plan the planner accepts, a tiny model built),
then Ray is connected (embedded, ``--address``/``cluster``, or
``$RAY_ADDRESS`` as under ``ray job submit`` and in SLURM scripts), Serve is
started with its proxy on ``host:port`` on the head node (or an already
running Serve with the same address is used), and the application is
deployed: one replica that launches the job (placement group, workers,
engine) and serves it. ``start`` returns when the application is RUNNING, or
raises with the replica's error.

``ServeHandle.shutdown`` (``tessera serve`` calls it on SIGTERM/SIGINT)
deletes the application (the replica stops its loop, shuts the engine down,
kills its workers and removes their placement group), stops Serve if it was
started here and nothing else runs on it, and releases Ray (an embedded Ray
stops with all its processes).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from tessera.errors import ConfigError, WaitTimeout
from tessera.launch.jobfile import JobFile
from tessera.launch.serve.options import ServeOptions

log = logging.getLogger("tessera.serve")


def prepare(jobfile: JobFile) -> tuple[JobFile, str, Any]:
    """The job to serve, with its model built (``tiny-*``) and its plan checked: (job, kind, placement)."""
    from tessera.launch.api import is_inprocess, materialise_model, model_kind, plan_placement

    job = jobfile.job
    if not job.model:
        raise ConfigError("tessera serve needs a model: a checkpoint directory, tiny-moe:<family> or "
                          "tiny-diffusion:<family> (model: in the job file, or --model)")
    if is_inprocess(job.cluster):
        raise ConfigError("tessera serve runs on Ray Serve, so it cannot use cluster 'inprocess'; leave cluster out "
                          "(embedded Ray), or give a Ray address")
    kind = model_kind(job.model)
    model_dir = materialise_model(job.model)
    # The model decides what is served (engine options of the other kind are refused here, by JobFile).
    jobfile = replace(jobfile, task="generate" if kind == "llm" else "images", job=replace(job, model=model_dir))
    placement = plan_placement(jobfile.job)  # a plan that cannot work is refused here, before Ray and Serve start
    return jobfile, kind, placement


@dataclass
class ServeHandle:
    """A running server: its ``url``, the served ``model`` name; ``shutdown()`` (or use as a context manager)."""

    url: str
    model: str
    kind: str
    options: ServeOptions
    started_serve: bool
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __enter__(self) -> "ServeHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def api_key(self) -> str | None:
        return self.options.api_key

    def deployment(self):
        """A Ray handle on the replica (``.ranks.remote()``, ``.stats.remote()``), through Ray's token auth."""
        from ray import serve

        return serve.get_app_handle(self.options.app_name)

    def ranks(self) -> list[dict[str, Any]]:
        return self.deployment().ranks.remote().result(timeout_s=60)

    def stats(self) -> dict[str, Any]:
        return self.deployment().stats.remote().result(timeout_s=60)

    def shutdown(self) -> None:
        """Delete the application (engine, workers, placement group), stop Serve if started here, release Ray."""
        from ray import serve

        from tessera.runtime.ray_env import RayConnection

        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            try:
                serve.delete(self.options.app_name, _blocking=True)
            except Exception as err:  # noqa: BLE001 - keep stopping
                log.warning("could not delete the Serve application %r: %s", self.options.app_name, err)
            if self.started_serve and not _other_apps(self.options.app_name):
                try:
                    serve.shutdown()
                except Exception as err:  # noqa: BLE001
                    log.warning("could not stop Serve: %s", err)
        finally:
            RayConnection.release()
        log.info("tessera serve: stopped %s", self.url)


def _other_apps(name: str) -> list[str]:
    from ray import serve

    try:
        return [a for a in serve.status().applications if a != name]
    except Exception:  # noqa: BLE001
        return []


def _serve_running() -> Any:
    """The running Serve's client on this Ray cluster, or None."""
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001
        return None


def start(jobfile: JobFile, options: ServeOptions, runtime_env: Mapping[str, Any] | None = None,
          num_cpus: int | None = None) -> ServeHandle:
    """Deploy ``jobfile``'s model behind an OpenAI-compatible HTTP API; returns once it answers."""
    from tessera.launch.api import resolve_address
    from tessera.runtime.ray_env import RayConnection

    jobfile, kind, placement = prepare(jobfile)
    job = jobfile.job
    address = resolve_address(job.cluster)
    needed = int(placement.world_size * placement.cpus_per_rank + 0.999)
    RayConnection.acquire(address, runtime_env, num_cpus or needed)
    started_serve = False
    try:
        from ray import serve

        from tessera.launch.serve.deployment import make_deployment, served_name

        client = _serve_running()
        if client is not None:
            http = client.http_config
            if (http.host, http.port) != (options.host, options.port):
                raise ConfigError(
                    f"Ray Serve already runs on this cluster with its proxy on {http.host}:{http.port}; serve there "
                    f"(--host {http.host} --port {http.port}) or stop that Serve first")
            if options.app_name in serve.status().applications:
                raise ConfigError(f"a Serve application named {options.app_name!r} already runs on this cluster; "
                                  "stop it, or give this server another --app-name")
        else:
            serve.start(http_options={"host": options.host, "port": options.port}, proxy_location="HeadOnly")
            started_serve = True
        image_defaults = {f: getattr(jobfile.images, f) for f in ("steps", "height", "width", "guidance_scale",
                                                                  "seed", "mode")} if kind == "diffusion" else None
        # The job travels as its mapping (what SLURM scripts embed too): Serve pickles the arguments with plain
        # pickle, which the frozen plan's mapping refuses.
        job_data = jobfile.to_dict()
        job_data.pop("output", None)  # a batch run's output paths mean nothing to a server (and are
        job_data.get("images", {}).pop("output_dir", None)  # confined to the driver's folder, not the replica's)
        app = make_deployment(options).bind(job_data, options, image_defaults)
        serve.run_many([serve.RunTarget(target=app, name=options.app_name, route_prefix="/")],
                       wait_for_applications_running=False)
        _wait_running(options.app_name, options.ready_timeout_s)
    except BaseException:
        _cleanup(options.app_name, started_serve)
        RayConnection.release()
        raise
    handle = ServeHandle(url=options.url, model=served_name(options, job.model), kind=kind, options=options,
                         started_serve=started_serve)
    log.info("tessera serve: %s (%s) at %s", handle.model, kind, handle.url)
    return handle


def _wait_running(name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        status = app.status if app is not None else None
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            details = app.message or ""
            for dep in app.deployments.values():
                details = details or dep.message
            raise RuntimeError(f"the server failed to start: {details.strip() or status}")
        time.sleep(0.5)
    raise WaitTimeout(f"the server was not ready within {timeout_s:.0f}s (application {name!r} is {status}); "
                      "raise ready_timeout_s for a large model, or see the replica's log")


def _cleanup(name: str, started_serve: bool) -> None:
    try:
        from ray import serve

        if _serve_running() is not None:
            if name in serve.status().applications:
                serve.delete(name, _blocking=True)
            if started_serve and not _other_apps(name):
                serve.shutdown()
    except Exception as err:  # noqa: BLE001 - best effort after a failed start
        log.warning("cleanup after a failed start: %s", err)
