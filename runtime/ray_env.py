"""How tessera starts an embedded (local, single-machine) Ray.

One place for the settings, shared by the controller, the demo and the tests:
a private temp dir (never /tmp/ray, which other Rays on the machine use), no
dashboard, and no pre-started idle Python workers — Ray otherwise starts one
per logical CPU, which on a 2-core machine with oversubscribed CPUs costs
seconds of CPU for processes tessera never uses (its workers are actors).
"""

from __future__ import annotations

import tempfile
from typing import Any

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
