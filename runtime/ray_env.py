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
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any, Mapping

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


class RayConnection:
    """Reference-counted ``ray.init``: the first user connects, the last one disconnects."""

    _lock = threading.Lock()
    _users = 0
    _owned = False  # True when this process started (or connected) Ray through here
    _embedded = False  # True when that Ray is a private local one (fixed size: infeasible requests fail at once)
    _temp_dir: str | None = None

    @classmethod
    def acquire(cls, address: str | None = None, runtime_env: Mapping[str, Any] | None = None,
                num_cpus: int | None = None) -> None:
        """Connect (or count one more user of the existing connection)."""
        import ray

        with cls._lock:
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {"namespace": "tessera", "log_to_driver": True}
                if runtime_env:
                    kwargs["runtime_env"] = dict(runtime_env)
                if address is None:
                    kwargs.update(embedded_ray_kwargs(max(num_cpus or 0, os.cpu_count() or 1, 8)))
                    cls._temp_dir = kwargs["_temp_dir"]
                else:
                    kwargs["address"] = address
                ray.init(**kwargs)
                cls._owned, cls._embedded = True, address is None
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        """One user fewer; the last one shuts down a Ray this class started."""
        import ray

        with cls._lock:
            cls._users = max(0, cls._users - 1)
            if cls._users == 0 and cls._owned:
                ray.shutdown()
                cls._owned = cls._embedded = False
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
