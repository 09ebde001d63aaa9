"""Submit a tessera job to a running Ray cluster through Ray's Job API.

``tessera submit job.yaml --address http://HEAD:8265`` is
``ray job submit --address ... --working-dir <job's folder> -- tessera run job.yaml``
plus what a script needs: the job file is validated here first, the
submission id is printed at once, the driver's logs are followed, and the
exit status is the job's (0 only for SUCCEEDED). The job's driver runs
``tessera run`` on the head node, where ``RAY_ADDRESS`` points at the cluster.

Token auth: Ray's client sends its token (``RAY_AUTH_TOKEN``, or the file in
``RAY_AUTH_TOKEN_PATH``) only in token mode; when a token is given and
``RAY_AUTH_MODE`` is unset, tessera sets ``RAY_AUTH_MODE=token`` for its own
client (a token given is a token meant to be used). A cluster that refuses the
request for lack of a token fails with a message that says what to export.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from tessera.launch.jobfile import JobFile
from tessera.config import ConfigError
from tessera.errors import TesseraError, WaitTimeout

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(TesseraError):
    """The submitted job ended in FAILED or STOPPED; the message has Ray's reason."""


@dataclass(frozen=True)
class Submission:
    """What to submit: the job file, where it runs, and how to wait for it."""

    job_path: str
    address: str
    working_dir: str | None = None
    submission_id: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    follow: bool = True
    timeout_s: float = 3600.0
    tessera_cmd: str = "tessera"

    def __post_init__(self) -> None:
        if not self.address.startswith(("http://", "https://")):
            raise ConfigError(
                f"address {self.address!r} is not a Ray dashboard address; "
                f"give http://HEAD:8265 (the job submission endpoint)"
            )
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout {self.timeout_s} must be > 0 seconds")

    def resolve(self) -> tuple[str, dict[str, Any], JobFile]:
        """Validate the job file locally; return (entrypoint, runtime_env, jobfile)."""
        path = Path(self.job_path).resolve()
        jobfile = JobFile.from_yaml(path)
        jobfile.check_runnable()
        working_dir = Path(self.working_dir).resolve() if self.working_dir else path.parent
        if not working_dir.is_dir():
            raise ConfigError(f"working dir {str(working_dir)!r} is not a directory")
        try:
            relative = path.relative_to(working_dir)
        except ValueError:
            raise ConfigError(
                f"job file {str(path)!r} is not inside the working dir {str(working_dir)!r}, so the cluster "
                f"would not receive it; move it there or pass --working-dir {path.parent}"
            ) from None
        runtime_env: dict[str, Any] = {
            "working_dir": str(working_dir),
            "excludes": [".git", ".venv", "__pycache__", "*.pyc"],
        }
        if self.env_vars:
            runtime_env["env_vars"] = dict(self.env_vars)
        entrypoint = f"{self.tessera_cmd} run {shlex.quote(relative.as_posix())}"
        return entrypoint, runtime_env, jobfile


@dataclass(frozen=True)
class Outcome:
    submission_id: str
    status: str
    message: str
    seconds: float


def explicit_token_mode() -> None:
    """Token mode for this process's Ray client when the user gave a token but no mode (Ray would not send it)."""
    if os.environ.get("RAY_AUTH_MODE") is None and (os.environ.get("RAY_AUTH_TOKEN")
                                                    or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        from tessera.runtime.ray_env import reset_ray_token_cache

        os.environ["RAY_AUTH_MODE"] = "token"
        reset_ray_token_cache()  # Ray caches the mode it read at import


def _auth_refused(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(k in text for k in ("401", "unauthorized", "authentication", "auth token", "unauthenticated"))


def _auth_error(address: str, err: BaseException) -> ConfigError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return ConfigError(
        f"the Ray cluster at {address} refused the request for lack of a valid token ({first}); it uses token "
        "authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or "
        "RAY_AUTH_TOKEN_PATH=<a 0600 file holding it>), then submit again"
    )


def submit(sub: Submission, echo: Callable[[str], None] = print, note: Callable[[str], None] = print) -> Outcome:
    """Submit, print the id, follow logs until the job ends (or ``timeout_s``)."""
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's SDK logs uploads and websocket closes at INFO on stderr; a script
    # reading our stderr should see only real errors.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.dashboard") or name.startswith("ray._private.runtime_env"):
            logging.getLogger(name).setLevel(logging.WARNING)
    entrypoint, runtime_env, jobfile = sub.resolve()
    started = time.monotonic()
    explicit_token_mode()
    submission_id = sub.submission_id or f"tessera-{re.sub(r'[^A-Za-z0-9_.-]', '-', jobfile.name)}-{uuid.uuid4().hex[:8]}"
    try:
        client = JobSubmissionClient(sub.address)
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    except Exception as err:  # noqa: BLE001 - only an auth refusal is rewritten; the rest propagates as is
        if _auth_refused(err):
            raise _auth_error(sub.address, err) from None
        raise
    note(f"tessera submit: submitted {submission_id} to {sub.address}: {entrypoint}")
    if not sub.follow:
        return Outcome(submission_id, "PENDING", "submitted; not followed", time.monotonic() - started)
    deadline = started + sub.timeout_s
    try:
        asyncio.run(asyncio.wait_for(_tail(client, submission_id, echo), timeout=sub.timeout_s))
    except asyncio.TimeoutError:
        pass
    # Logs end when the job ends; poll the status briefly for it to settle.
    while True:
        info = client.get_job_info(submission_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return Outcome(submission_id, status, info.message or "", time.monotonic() - started)
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            raise WaitTimeout(
                f"job {submission_id} still {status} after {sub.timeout_s:.0f}s; stopped it. "
                f"Raise --timeout for longer jobs"
            )
        time.sleep(0.5)


async def _tail(client: Any, submission_id: str, echo: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        for line in chunk.rstrip("\n").split("\n"):
            echo(line)
