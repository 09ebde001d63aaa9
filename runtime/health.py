"""Is the ground under the workers still there? The Ray head (GCS) and the nodes (raylets), watched.

Why: actor calls go straight from the driver to the workers, so a dead Ray
head goes unnoticed until something needs it (a restart, a placement group,
``ray.kill`` at shutdown), and then Ray blocks for a minute and terminates the
process; a dead raylet leaves its workers running, orphaned. A
:class:`ClusterMonitor` thread probes the GCS port (a TCP connect, which
fails at once when the head is gone) and, while it answers, whether the
nodes holding tessera's ranks are alive; the controller turns a finding into
an :class:`~tessera.errors.InfrastructureError` at its next call and, at shutdown, stops what
it started by pid instead of asking the dead cluster.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

log = logging.getLogger("tessera.health")


def gcs_reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at the GCS ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _dead_nodes(node_ids: set[str], timeout_s: float) -> list[str] | None:
    """Our nodes that Ray reports dead; None when the answer did not come in time."""
    import ray

    box: list = []

    def ask() -> None:
        try:
            box.append({n["NodeID"]: n.get("Alive", False) for n in ray.nodes()})
        except Exception:  # noqa: BLE001 - an unreachable GCS: no answer
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        return None
    alive = box[0]
    return sorted(n for n in node_ids if not alive.get(n, False))


class ClusterMonitor:
    """A daemon thread: every ``interval_s``, the GCS port and the liveness of ``node_ids``."""

    def __init__(self, gcs_address: str, node_ids: Callable[[], set[str]], interval_s: float = 2.0) -> None:
        self.gcs_address = gcs_address
        self.node_ids = node_ids
        self.interval_s = interval_s
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tessera-cluster-monitor", daemon=True)

    def start(self) -> "ClusterMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_now(self) -> str | None:
        """Probe once (the GCS port first: cheap and immediate); the problem found, or None."""
        if not gcs_reachable(self.gcs_address):
            return (f"the Ray head (GCS at {self.gcs_address}) does not answer: the cluster is gone, so these workers "
                    "can no longer be managed")
        dead = _dead_nodes(self.node_ids(), timeout_s=5.0)
        if dead:
            return f"Ray reports node(s) {', '.join(d[:12] for d in dead)} holding tessera ranks as dead (raylet lost)"
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.problem is None:
                try:
                    self.problem = self.check_now()
                except Exception:  # noqa: BLE001 - the monitor must never kill the driver
                    log.exception("cluster check failed")
                if self.problem:
                    log.error("%s", self.problem)
