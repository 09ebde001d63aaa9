"""The one way tessera connects to Ray: a reference-counted connection per process.

Why one place: the launcher, the controller, the demo and the tests all need
Ray, and a process has exactly one Ray connection (``ray.init`` is global).
The first user connects (to ``address``, or to a private embedded Ray), the
last one disconnects; a Ray initialised by someone else (the user, a test
fixture, the ``ray job`` driver) is used and never shut down. The embedded
Ray gets a private temp dir (never /tmp/ray, which other Rays on the machine
use), no dashboard, and no pre-started idle Python workers: Ray otherwise
starts one per logical CPU, which on a 2-core machine with oversubscribed
CPUs costs seconds of CPU for processes tessera never uses (its workers are
actors).

``RayConnection``'s class attributes are the process's connection state: a
documented registry (one per process, like ``ray`` itself), guarded by a lock.

Token auth is explicit for the embedded Ray (:class:`EmbeddedAuth`): Ray
2.60 would turn it on by itself, but with a token it writes to the shared
``~/.ray/auth_token`` (mode 0644, reused by every later Ray of the user). Ray
reads the mode and the token from the environment (``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN_PATH``) in the driver and in every process it starts, so
tessera sets both for the life of the embedded Ray: a fresh random token in a
0600 file inside a private 0700 directory, removed at shutdown. A token the
user set (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) is used as is;
``RAY_AUTH_MODE=disabled`` is honoured with a warning (the GCS and raylet
ports listen on every interface). Ray older than 2.52 ignores the mode, so it
is refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from typing import Any, Mapping

from tessera.errors import ConfigError

log = logging.getLogger("tessera.ray")
MIN_RAY = (2, 52)  # first Ray whose RAY_AUTH_MODE=token is honoured
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def embedded_ray_kwargs(num_cpus: int, temp_prefix: str = "tessera-ray-", **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` that start a private local Ray."""
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "_temp_dir": tempfile.mkdtemp(prefix=temp_prefix),
        "_system_config": dict(NO_PRESTART),
        "log_to_driver": True,
    }
    kwargs.update(extra)
    return kwargs


def check_ray_version(version: str | None = None) -> None:
    """Refuse a Ray too old for token auth (its ``RAY_AUTH_MODE=token`` would be silently ignored)."""
    if version is None:
        import ray

        version = ray.__version__
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return  # a development build: assume it is recent
    if parts < MIN_RAY:
        raise ConfigError(
            f"Ray {version} is too old: tessera needs Ray >= {MIN_RAY[0]}.{MIN_RAY[1]}, the first whose token "
            "authentication (RAY_AUTH_MODE=token) works; older Rays accept unauthenticated code from anyone who "
            f"reaches their ports. Upgrade: pip install 'ray[default]>={MIN_RAY[0]}.{MIN_RAY[1]}'"
        )


def reset_ray_token_cache() -> None:
    """Make Ray re-read the auth mode and token from the environment (its C++ loader caches both)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - a Ray without token auth is refused before this
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class EmbeddedAuth:
    """Token auth for a private local Ray: a random token in a 0600 file, exported for Ray to read.

    ``enable()`` before ``ray.init``; ``disable()`` after ``ray.shutdown``
    restores the environment and removes the token. Not thread-safe by itself
    (:class:`RayConnection` holds its lock around both).
    """

    def __init__(self) -> None:
        self.dir: str | None = None
        self.token_path: str | None = None
        self._saved: dict[str, str | None] = {}

    def enable(self) -> None:
        mode = os.environ.get("RAY_AUTH_MODE")
        if mode is not None and mode.lower() == "disabled":
            log.warning("RAY_AUTH_MODE=disabled: the embedded Ray runs without token authentication, and its ports "
                        "listen on every interface: anyone who reaches this machine can run code in it. Unset "
                        "RAY_AUTH_MODE to let tessera use a private token")
            return
        if mode is not None and mode.lower() != "token":
            raise ConfigError(f"RAY_AUTH_MODE={mode!r} is not a mode tessera knows; unset it (tessera then uses a "
                              "private token) or set it to token")
        if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
            self._saved = {"RAY_AUTH_MODE": mode}
            os.environ["RAY_AUTH_MODE"] = "token"  # the user's own token, explicitly in token mode
            reset_ray_token_cache()
            return
        self.dir = tempfile.mkdtemp(prefix="tessera-auth-")  # mode 0700
        self.token_path = os.path.join(self.dir, "auth_token")
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self._saved = {name: os.environ.get(name) for name in AUTH_ENV}
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = self.token_path
        reset_ray_token_cache()

    def disable(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self._saved:
            reset_ray_token_cache()
        self._saved = {}
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = self.token_path = None


class RayConnection:
    """Reference-counted ``ray.init``: the first user connects, the last one disconnects."""

    _lock = threading.Lock()
    _users = 0
    _owned = False  # True when this process started (or connected) Ray through here
    _embedded = False  # True when that Ray is a private local one (fixed size: infeasible requests fail at once)
    _temp_dir: str | None = None
    _auth: EmbeddedAuth | None = None  # the embedded Ray's private token, while it runs

    @classmethod
    def acquire(cls, address: str | None = None, runtime_env: Mapping[str, Any] | None = None,
                num_cpus: int | None = None) -> None:
        """Connect (or count one more user of the existing connection)."""
        import ray

        with cls._lock:
            if not ray.is_initialized():
                check_ray_version(ray.__version__)
                kwargs: dict[str, Any] = {"namespace": "tessera", "log_to_driver": True}
                if runtime_env:
                    kwargs["runtime_env"] = dict(runtime_env)
                if address is None:
                    kwargs.update(embedded_ray_kwargs(max(num_cpus or 0, os.cpu_count() or 1, 8)))
                    cls._temp_dir = kwargs["_temp_dir"]
                    cls._auth = EmbeddedAuth()
                    cls._auth.enable()
                else:
                    kwargs["address"] = address
                try:
                    ray.init(**kwargs)
                except BaseException:
                    cls._cleanup()
                    raise
                cls._owned, cls._embedded = True, address is None
            cls._users += 1

    @classmethod
    def release(cls, bounded_s: float = 30.0) -> None:
        """One user fewer; the last one shuts down a Ray this class started.

        ``ray.shutdown`` gets at most ``bounded_s`` (it blocks when the cluster's
        head is gone); it then finishes in the background.
        """
        import ray

        with cls._lock:
            cls._users = max(0, cls._users - 1)
            if cls._users == 0 and cls._owned:
                stopper = threading.Thread(target=ray.shutdown, name="tessera-ray-shutdown", daemon=True)
                stopper.start()
                stopper.join(bounded_s)
                cls._owned = cls._embedded = False
                cls._cleanup()

    @classmethod
    def _cleanup(cls) -> None:
        """Remove the embedded Ray's temp dir and token, restore the auth environment (lock held)."""
        if cls._auth is not None:
            cls._auth.disable()
            cls._auth = None
        if cls._temp_dir:
            shutil.rmtree(cls._temp_dir, ignore_errors=True)
            cls._temp_dir = None

    @classmethod
    def users(cls) -> int:
        return cls._users

    @classmethod
    def embedded(cls) -> bool:
        """Whether the connected Ray is a private local one that this process started."""
        return cls._embedded
