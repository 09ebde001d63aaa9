"""The Ray Serve deployment: one replica owns one tessera job (controller, workers, engine) and its HTTP app.

The replica's constructor launches the job exactly as ``tessera run`` does
(``launch_job``: the planner's placement, one placement group per engine,
the worker actors, the loaded engine); the workers are owned by the replica
(actors it created), so they live and die with it. It then starts the
engine's loop (:class:`~tessera.runtime.llm.async_engine.AsyncLLMEngine`, or
the image loop) and builds the FastAPI app (``__serve_build_asgi_app__``,
Ray Serve's late-bound ingress). When Serve stops the replica (``serve.delete``,
``serve.shutdown``, a SIGTERM of ``tessera serve``) ``__del__`` stops the loop
and shuts the job down: engine, workers, placement groups.

Methods other than the HTTP routes (``ranks``, ``stats``) are reachable only
through a Ray deployment handle (Ray's token auth), for tests and operators.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tessera.launch.serve.options import ServeOptions

log = logging.getLogger("tessera.serve")


def served_name(options: ServeOptions, model: str) -> str:
    return options.served_model_name or Path(model).name or "tessera-model"


class TesseraServer:
    """A Ray Serve replica's callable (wrapped by :func:`make_deployment`)."""

    def __init__(self, job: dict[str, Any], options: ServeOptions, image_defaults: dict[str, Any] | None = None) -> None:
        from tessera.launch.api import launch_job
        from tessera.launch.jobfile import JobFile
        from tessera.runtime.logs import configure_logging, default_log_level

        jobfile = JobFile.from_dict(job)
        configure_logging(jobfile.job.log_level or default_log_level())
        self.options = options
        self.closed = False
        self.handle = launch_job(jobfile)
        try:
            self._start(image_defaults or {})
        except BaseException:
            self.handle.shutdown()
            raise

    def _start(self, image_defaults: dict[str, Any]) -> None:
        from tessera.launch.serve.chat_template import ChatTemplate
        from tessera.launch.serve.images import ImageService
        from tessera.launch.serve.llm import LLMService
        from tessera.launch.serve.metrics import ServeMetrics
        from tessera.runtime.llm.async_engine import AsyncLLMEngine

        handle, options = self.handle, self.options
        self.model_name = served_name(options, handle.model_dir)
        self.image_defaults = image_defaults
        if handle.engine_kind == "llm":
            self.loop = AsyncLLMEngine(handle.engine, options.max_waiting, options.retry_after_s).start()
            self.metrics = ServeMetrics(lambda: self.loop.snapshot)
            self.service = LLMService(self.loop, self.model_name, self.metrics, ChatTemplate.load(handle.model_dir))
            self.model_info = {"max_model_len": handle.engine.options.max_model_len}
            self.state = lambda: self.loop.state
        else:
            self.loop = ImageService(handle.engine, options.max_waiting, options.retry_after_s,
                                     max_batch_images=options.max_image_batch,
                                     exact_batches=options.image_batching == "exact").start()
            self.metrics = ServeMetrics(self.loop.snapshot)
            self.service = self.loop
            self.model_info = {}
            self.state = lambda: self.loop.state
        log.info("serving %s (%s) as %r", handle.model_dir, handle.engine_kind, self.model_name)

    def __serve_build_asgi_app__(self):
        from tessera.launch.serve.app import build_app

        return build_app(self.service, self.metrics, self.options, self.model_name, self.model_info,
                         self.image_defaults, self.state)

    # -- reachable through a deployment handle only -------------------------------------------------

    def ranks(self) -> list[dict[str, Any]]:
        """Where every rank of the engine runs (node, pid, device, mesh coordinates)."""
        return [dataclasses.asdict(r) for r in self.handle.ranks]

    def stats(self) -> dict[str, Any]:
        """The loop's snapshot (queue, running, KV blocks, tokens/s, recoveries, ...)."""
        snap = self.loop.snapshot
        return dict(snap() if callable(snap) else snap)

    def check_health(self) -> None:
        """Ray Serve's periodic check: a dead loop makes Serve replace the replica."""
        if not self.closed and not self.loop.running:
            raise RuntimeError("the engine loop stopped")

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.close(self.options.shutdown_timeout_s)
        finally:
            self.handle.shutdown()
        log.info("the tessera job behind %r is shut down", self.model_name)

    def __del__(self) -> None:
        if hasattr(self, "handle"):
            self.shutdown()


def make_deployment(options: ServeOptions):
    """The Ray Serve deployment class for these options (one replica, CPU-free: the workers hold the resources)."""
    from ray import serve

    ingress = serve.ingress()(TesseraServer)
    return serve.deployment(
        name="TesseraServer",
        num_replicas=1,
        max_ongoing_requests=options.max_ongoing_requests,
        max_constructor_retry_count=1,  # the job was checked before deploying: a failing load fails the start
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=options.shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=10,
        health_check_timeout_s=60,
    )(ingress)
