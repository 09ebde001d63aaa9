"""Readers that move one tier-file extent into an aligned buffer, off the compute thread.

Two implementations of one small interface (``submit(path, offset, out,
then)`` -> Future):

- :class:`AioReader`: DeepSpeed's async I/O op (libaio, O_DIRECT, a queue
  depth and block size, page-locked buffers from ``new_cpu_locked_tensor``).
  Used when the op is already built: it takes ~5 minutes to JIT-compile, so
  "auto" never compiles it (see README: pre-build with ``AsyncIOBuilder().load()``).
- :class:`PreadvReader`: an ``os.preadv`` thread pool on an O_DIRECT file
  descriptor, each extent split into chunks read in parallel (measured here
  as fast as aio: ~2 GB/s on the VM disk). Works everywhere; on a file system
  without O_DIRECT (tmpfs) it falls back to buffered reads and says so.

``then`` runs on an I/O thread after the bytes have landed (checksum,
unpacking, host-to-device copy), so that work overlaps compute too, and
never holds up the next read.

Reads are served by urgency: ``submit(..., urgent=True)`` (a read the model
waits for now) goes ahead of every queued ``urgent=False`` read (a
prefetch), so a wrong prediction can delay the disk but never a demanded
expert that queues behind it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import heapq
import importlib
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import platform
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from tessera.offload.buffers import aligned_empty
from tessera.options import ALIGNMENT, OffloadConfig
from tessera.offload.errors import OffloadError

log = logging.getLogger("tessera.offload.aio")

# The loaded aio extension: a documented process-wide registry (a compiled op is loaded once per
# process, as Python's own sys.modules keeps it), guarded by a lock.
_AIO_MODULE: Any = None
_AIO_LOCK = threading.Lock()


def _aio_builder():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator probe
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder()


def env_extensions_dir() -> Path:
    """Where ``make test`` pre-builds DeepSpeed's ops (``python -m tessera.offload.aio_build``): inside this
    Python environment, keyed by what the compiled library depends on.

    The library is built with ``-march=native`` against this torch and this deepspeed, so the key holds
    the Python version, both package versions and a digest of the CPU's feature flags: a venv copied to
    another CPU, or an upgraded torch/deepspeed, gets a fresh directory (and a fresh build) instead of
    loading a library that crashes or does not link.
    """
    try:
        ds = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds = "none"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    cpu = hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:10]
    key = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-deepspeed{ds}-cpu{cpu}"
    return Path(sys.prefix) / "torch_extensions" / key


def _extension_dirs(name: str) -> list[Path]:
    """Build directories of op ``name``, most specific first: this environment's pre-build, then torch's
    own cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/pyXY_cpu``). Creates nothing."""
    dirs = [env_extensions_dir() / name]
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        try:
            from torch.utils.cpp_extension import get_default_build_root

            accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
            root = os.path.join(get_default_build_root(),
                                f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}")
        except Exception:  # noqa: BLE001
            root = None
    if root is not None:
        dirs.append(Path(root) / name)
    return dirs


def _cached_library(name: str) -> str | None:
    """Path of a JIT-built DeepSpeed op ``name`` (this environment's pre-build first), if one is there."""
    for d in _extension_dirs(name):
        found = sorted(glob.glob(os.path.join(d, f"{name}*.so")))
        if found:
            return found[0]
    return None


def _cached_aio_library() -> str | None:
    """Path of a JIT-built aio library in the torch extensions cache, if one is there."""
    try:
        builder = _aio_builder()
    except Exception:  # noqa: BLE001 - deepspeed missing or broken: no aio
        return None
    return _cached_library(builder.name)


def _load_cached_aio(builder: Any, library: str) -> Any:
    """Import the cached aio op directly. On CPU it resolves its pinned-buffer
    manager from DeepSpeed's pin_memory op, which must be loaded first and
    globally (as DeepSpeed's own loader does)."""
    import ctypes

    # The pin_memory op built next to this library (same build root), else any cached one.
    sibling = sorted(glob.glob(os.path.join(Path(library).parent.parent, "pin_memory", "pin_memory*.so")))
    pin_memory = sibling[0] if sibling else _cached_library("pin_memory")
    if pin_memory is not None:
        ctypes.CDLL(pin_memory, mode=ctypes.RTLD_GLOBAL)
    spec = importlib.util.spec_from_file_location(builder.name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aio_built() -> bool:
    """Whether DeepSpeed's aio op can be loaded without compiling (prebuilt or JIT-cached)."""
    if _AIO_MODULE is not None:
        return True
    try:
        builder = _aio_builder()
    except Exception:  # noqa: BLE001 - deepspeed missing or broken: no aio
        return False
    try:
        importlib.import_module(builder.absolute_name())
        return True
    except Exception:  # noqa: BLE001
        pass
    return _cached_aio_library() is not None


def load_aio(allow_build: bool = False):
    """DeepSpeed's aio op module; compiles it only when ``allow_build`` (minutes on 2 cores)."""
    global _AIO_MODULE
    with _AIO_LOCK:
        if _AIO_MODULE is not None:
            return _AIO_MODULE
        if not allow_build and not aio_built():
            raise OffloadError(
                "DeepSpeed's async I/O op is not built; install libaio-dev and pre-build it with "
                "`python -c \"from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load()\"`, "
                "or use reader='preadv'"
            )
        builder = _aio_builder()
        if not allow_build:
            # Load what is there without going through the JIT: from another
            # virtual environment (other include paths) torch would decide the
            # cached build is stale and recompile for minutes.
            try:
                _AIO_MODULE = importlib.import_module(builder.absolute_name())
                return _AIO_MODULE
            except Exception:  # noqa: BLE001 - not a prebuilt wheel: try the JIT cache
                pass
            library = _cached_aio_library()
            if library is not None:
                _AIO_MODULE = _load_cached_aio(builder, library)
                return _AIO_MODULE
        if not builder.is_compatible(verbose=False):
            raise OffloadError("DeepSpeed's async I/O op cannot build here: install libaio-dev (apt-get install libaio-dev)")
        _AIO_MODULE = builder.load(verbose=False)
        return _AIO_MODULE


class _UrgencyPool:
    """Worker threads that run queued jobs urgent-first, then in submission order.

    ``concurrent.futures.ThreadPoolExecutor`` serves its queue first-in first-out: a
    demanded read would wait behind every prefetch queued before it.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], None], urgent: bool = True) -> None:
        with self._cv:
            if self._closed:
                raise OffloadError("the tier reader is closed")
            heapq.heappush(self._queue, (0 if urgent else 1, next(self._seq), job))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return  # closed and drained
                _, _, job = heapq.heappop(self._queue)
            job()  # jobs deliver their own errors to their futures

    def shutdown(self) -> None:
        """Run what is queued, then stop the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class Reader:
    """Reads whole aligned extents into aligned CPU buffers, asynchronously."""

    name = "reader"
    direct = True  # whether reads bypass the page cache

    def submit(
        self, path: str, offset: int, out: torch.Tensor, then: Callable[[], Any] | None = None, urgent: bool = True
    ) -> "Future[Any]":
        """Read ``out.numel()`` bytes at ``offset`` into ``out``, then run ``then``; urgent reads go first."""
        raise NotImplementedError

    def in_flight(self) -> int:
        """How many requests this reader keeps outstanding at most (for the disk bound it is compared with)."""
        raise NotImplementedError

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A buffer reads can land in directly (aligned; page-locked for aio)."""
        return aligned_empty(nbytes)

    def free(self, buf: torch.Tensor) -> None:  # noqa: B027 - plain buffers are freed by refcount
        pass

    def close(self) -> None:  # noqa: B027
        pass

    @staticmethod
    def _check(offset: int, out: torch.Tensor) -> None:
        if offset % ALIGNMENT or out.numel() % ALIGNMENT or out.data_ptr() % ALIGNMENT or out.dtype != torch.uint8:
            raise ValueError(
                f"O_DIRECT reads need offset, length and address aligned to {ALIGNMENT} and a uint8 buffer "
                f"(offset {offset}, length {out.numel()}, address {out.data_ptr():#x}, {out.dtype})"
            )


class PreadvReader(Reader):
    """O_DIRECT ``os.preadv`` over a thread pool; an extent is split into ``chunk_bytes`` pieces."""

    name = "preadv"

    def __init__(self, io_threads: int = 4, chunk_bytes: int = 4 << 20, read_delay_s: float = 0.0) -> None:
        self.chunk_bytes = chunk_bytes
        self.io_threads = io_threads
        self.read_delay_s = read_delay_s  # tests: an artificially slow disk
        self._pool = _UrgencyPool(io_threads, "tessera-preadv")
        self._post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-preadv-post")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.direct = True

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.warning("%s: O_DIRECT is not supported on this file system; reading through the page cache", path)
                    self.direct = False
                    fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def _read_chunk(self, fd: int, mv: memoryview, offset: int) -> None:
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OffloadError(f"short read at offset {offset + done}: the tier file is truncated; delete it to rebuild")
            done += n

    def in_flight(self) -> int:
        return self.io_threads  # one synchronous chunk per thread

    def submit(self, path, offset, out, then=None, urgent=True):
        self._check(offset, out)
        fd = self._fd(path)
        mv = memoryview(out.numpy())
        total = out.numel()
        result: Future = Future()
        pieces = [(a, min(a + self.chunk_bytes, total)) for a in range(0, total, self.chunk_bytes)]
        remaining = [len(pieces)]
        errors: list[BaseException] = []
        lock = threading.Lock()

        def finish() -> None:
            if errors:
                result.set_exception(errors[0])
                return
            try:
                result.set_result(then() if then is not None else None)
            except BaseException as exc:  # noqa: BLE001 - delivered to the waiter
                result.set_exception(exc)

        def piece(a: int, b: int) -> None:
            try:
                if self.read_delay_s and a == 0:
                    threading.Event().wait(self.read_delay_s)
                self._read_chunk(fd, mv[a:b], offset + a)
            except BaseException as exc:  # noqa: BLE001
                with lock:
                    errors.append(exc)
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._post.submit(finish)

        for a, b in pieces:
            self._pool.submit(lambda a=a, b=b: piece(a, b), urgent)
        return result

    def close(self) -> None:
        self._pool.shutdown()
        self._post.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class AioReader(Reader):
    """DeepSpeed async I/O: libaio with O_DIRECT, ``queue_depth`` in flight, page-locked buffers."""

    name = "aio"

    def __init__(
        self,
        block_size: int = 1 << 20,
        queue_depth: int = 32,
        io_threads: int = 4,
        allow_build: bool = False,
        read_delay_s: float = 0.0,
    ) -> None:
        aio = load_aio(allow_build=allow_build)
        self.handle = aio.aio_handle(block_size, queue_depth, False, True, io_threads)
        self.read_delay_s = read_delay_s
        # One submitter thread: the handle's wait() completes every op in flight on it. What runs once
        # the bytes are in (``then``: checksum, unpacking, copies) runs on another thread, so the next
        # extent is already being read meanwhile: the disk never waits for a checksum.
        self.queue_depth, self.io_threads = queue_depth, io_threads
        self._thread = _UrgencyPool(1, "tessera-aio")
        self._post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tessera-aio-post")
        self._example = torch.empty(0, dtype=torch.uint8)

    def alloc(self, nbytes: int) -> torch.Tensor:
        buf = self.handle.new_cpu_locked_tensor(nbytes, self._example)
        if buf.data_ptr() % ALIGNMENT:
            self.handle.free_cpu_locked_tensor(buf)
            return aligned_empty(nbytes)
        return buf

    def free(self, buf: torch.Tensor) -> None:
        if self.handle.is_pinned(buf):
            self.handle.free_cpu_locked_tensor(buf)

    def in_flight(self) -> int:
        return self.queue_depth * self.io_threads  # the handle's threads, each with its libaio queue

    def submit(self, path, offset, out, then=None, urgent=True):
        self._check(offset, out)
        result: Future = Future()

        def finish() -> None:
            try:
                result.set_result(then() if then is not None else None)
            except BaseException as exc:  # noqa: BLE001 - delivered to the waiter
                result.set_exception(exc)

        def job() -> None:
            try:
                if self.read_delay_s:
                    threading.Event().wait(self.read_delay_s)
                n = self.handle.async_pread(out, path, offset)
                if n != 0:
                    raise OffloadError(f"aio read of {path} at {offset} could not be submitted (code {n})")
                done = self.handle.wait()
                if done < 1:
                    raise OffloadError(f"aio read of {path} at {offset} did not complete ({done} ops)")
            except BaseException as exc:  # noqa: BLE001 - delivered to the waiter
                result.set_exception(exc)
                return
            self._post.submit(finish)

        self._thread.submit(job, urgent)
        return result

    def close(self) -> None:
        self._thread.shutdown()
        self._post.shutdown(wait=True)


def make_reader(config: OffloadConfig, read_delay_s: float = 0.0) -> Reader:
    """The reader ``config.reader`` asks for; "auto" takes aio only when it is already built."""
    if config.reader == "aio" or (config.reader == "auto" and aio_built()):
        try:
            return AioReader(config.block_size, config.queue_depth, config.io_threads, read_delay_s=read_delay_s)
        except Exception as exc:  # noqa: BLE001
            if config.reader == "aio":
                raise
            log.warning("DeepSpeed aio unavailable (%s); using the O_DIRECT preadv reader", exc)
    return PreadvReader(config.io_threads, config.chunk_bytes, read_delay_s=read_delay_s)
