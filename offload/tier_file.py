"""The NVMe tier file: 4 KiB-aligned extents, one per weight group, plus a JSON manifest.

Layout: each weight group is one extent starting on a 4096-byte boundary and
padded to a multiple of 4096, so a group is exactly one O_DIRECT read. Inside
an extent the group's tensors sit at 64-byte aligned offsets (any dtype can be
viewed in place). The manifest records, per group, its offset, size and a
CRC32 of the whole padded extent, and per tensor its name, dtype, shape and
offset; plus a fingerprint of the source checkpoint so a later run reuses the
file only when the checkpoint has not changed. The CRCs cover data only, so
the manifest carries a SHA-256 of itself (every name, shape, dtype and
offset): an edited or damaged manifest is refused or rebuilt, never used to
view the bytes with a wrong shape. The digest guards against accidents, not
an attacker who can write the tier directory (keep it private to the user).

The tier file's disk space is reserved (``posix_fallocate``) before the first
group is written: a disk without room fails at once, before any byte is
written, and one that other writers fill up meanwhile cannot fail the data
write. Any ENOSPC/EDQUOT that still happens (a caller's size too small, the
manifest) names the file, the bytes needed, written and free, and the fix.

Writes are crash-safe: data goes to ``NAME.tier.tmp``, is fsynced and renamed,
and the manifest is written (and renamed) last, so a half-written file never
has a valid manifest and is rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from tessera.offload.buffers import align_up
from tessera.options import ALIGNMENT
from tessera.offload.errors import CorruptTierFileError, DiskSpaceError, TierDirError, TierFileError

FORMAT = "tessera-tier/2"  # /2: the manifest carries manifest_sha256 (a /1 file is rebuilt)
TENSOR_ALIGN = 64
DIGEST_KEY = "manifest_sha256"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger("tessera.offload")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # within the group's extent
    nbytes: int


@dataclass(frozen=True)
class GroupEntry:
    name: str
    offset: int  # in the file, multiple of ALIGNMENT
    nbytes: int  # padded extent length, multiple of ALIGNMENT
    checksum: int  # CRC32 of the padded extent
    tensors: tuple[TensorEntry, ...]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TierFileError(f"manifest names an unknown dtype {name!r}")
    return dtype


def layout_group(tensors: Mapping[str, torch.Tensor]) -> tuple[list[TensorEntry], int]:
    """Offsets of a group's tensors inside its extent, and the padded extent size."""
    entries, pos = [], 0
    for name, t in tensors.items():
        pos = align_up(pos, TENSOR_ALIGN)
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, _dtype_name(t.dtype), tuple(t.shape), pos, nbytes))
        pos += nbytes
    return entries, align_up(max(pos, 1))


def group_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """The padded extent size a group takes in a tier file (and in a read buffer)."""
    return layout_group(tensors)[1]


def pack_group(tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[TensorEntry]]:
    """The group's bytes as one padded uint8 extent (zero padding).

    ``out`` (a uint8 CPU buffer of the extent's size) is filled through NumPy, not torch in-place
    ops: a read buffer may have been allocated under ``torch.inference_mode()`` on the compute
    thread (an inference tensor) and be repaired here on an I/O thread outside it, where torch
    refuses in-place updates of inference tensors.
    """
    entries, size = layout_group(tensors)
    if out is None:
        out = torch.zeros(size, dtype=torch.uint8)
    elif out.numel() != size or out.dtype != torch.uint8 or out.device.type != "cpu":
        raise ValueError(f"pack_group: out must be a uint8 CPU buffer of {size} bytes, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    raw = out.numpy()
    raw[:] = 0
    for e, t in zip(entries, tensors.values()):
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        raw[e.offset : e.offset + e.nbytes] = flat.numpy()
    return out, entries


def unpack_group(buf: torch.Tensor, tensors: Iterable[TensorEntry]) -> dict[str, torch.Tensor]:
    """Views of a group's tensors inside ``buf`` (no copy)."""
    out = {}
    for e in tensors:
        raw = buf[e.offset : e.offset + e.nbytes]
        out[e.name] = raw.view(_dtype(e.dtype)).view(e.shape)
    return out


def checksum(buf: torch.Tensor) -> int:
    """CRC32 of a uint8 CPU tensor (zlib releases the GIL, so it runs on I/O threads in parallel)."""
    return zlib.crc32(memoryview(buf.numpy())) & 0xFFFFFFFF


def check_tier_dir(path: str | os.PathLike, need_bytes: int, min_free_bytes: int) -> Path:
    """Fail early and clearly if the tier directory cannot take a file of ``need_bytes``."""
    d = Path(path)
    if not d.exists():
        raise TierDirError(f"tier directory {d} does not exist; create it (mkdir -p {d}) or set nvme_dir elsewhere")
    if not d.is_dir():
        raise TierDirError(f"tier directory {d} is not a directory; point nvme_dir at a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".tessera-probe-"):
            pass
    except OSError as exc:
        raise TierDirError(
            f"tier directory {d} is not writable ({exc.strerror}); fix its permissions or set nvme_dir elsewhere"
        ) from exc
    free = shutil.disk_usage(d).free
    if free < need_bytes + min_free_bytes:
        raise DiskSpaceError(
            f"tier directory {d} has {free / 2**30:.2f} GiB free ({free} bytes) but the tier file needs "
            f"{need_bytes / 2**30:.2f} GiB ({need_bytes} bytes, +{min_free_bytes / 2**20:.0f} MiB headroom); free "
            "space, use another nvme_dir, or raise the host/device budgets so fewer groups go to NVMe"
        )
    return d


def manifest_digest(manifest: Mapping) -> str:
    """SHA-256 of the manifest's canonical JSON, without the digest itself."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_layout(man_path: Path, manifest: Mapping) -> None:
    """Offsets, sizes, dtypes and shapes are consistent with each other and with the file size."""
    file_bytes = manifest["file_bytes"]
    for g in manifest["groups"]:
        where = f"tier manifest {man_path}: group {g['name']!r}"
        if g["offset"] % ALIGNMENT or g["nbytes"] % ALIGNMENT or g["offset"] + g["nbytes"] > file_bytes:
            raise TierFileError(f"{where} has extent [{g['offset']}, +{g['nbytes']}) that is not aligned to "
                                f"{ALIGNMENT} or ends past the file ({file_bytes} bytes)")
        for t in g["tensors"]:
            dtype = _dtype(t["dtype"])
            want = math.prod(t["shape"]) * torch.empty((), dtype=dtype).element_size()
            if want != t["nbytes"] or t["offset"] < 0 or t["offset"] + t["nbytes"] > g["nbytes"]:
                raise TierFileError(f"{where}: tensor {t['name']!r} ({t['dtype']} {t['shape']}, {t['nbytes']} bytes at "
                                    f"{t['offset']}) does not fit its extent or its shape")


def _no_space(exc: OSError, path: Path, need: int, written: int) -> DiskSpaceError:
    """The clear form of ENOSPC/EDQUOT while writing ``path``."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    return DiskSpaceError(
        f"no space left writing tier file {path} ({os.strerror(exc.errno)}): it needs {need} bytes, {written} were "
        f"written, {free} bytes are free now under {path.parent}; free space there, point nvme_dir at a larger "
        "disk, or raise the host/device budgets so fewer groups go to NVMe"
    )


class TierFile:
    """An opened, validated tier file: the manifest in memory, the data file on disk."""

    def __init__(self, data_path: Path, manifest: dict) -> None:
        self.path = data_path
        try:
            self.fingerprint: str = manifest["fingerprint"]
            self.groups: dict[str, GroupEntry] = {}
            for g in manifest["groups"]:
                tensors = tuple(
                    TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"]) for t in g["tensors"]
                )
                self.groups[g["name"]] = GroupEntry(g["name"], g["offset"], g["nbytes"], g["checksum"], tensors)
            self.file_bytes: int = manifest["file_bytes"]
        except (KeyError, TypeError) as exc:
            raise TierFileError(f"the manifest of tier file {data_path} lacks or mistypes {exc}; delete it to "
                                "rebuild") from None

    @staticmethod
    def paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
        d = Path(directory)
        return d / f"{name}.tier", d / f"{name}.manifest.json"

    @classmethod
    def open(cls, directory: str | os.PathLike, name: str, fingerprint: str | None = None,
             on_corrupt: str = "rebuild") -> "TierFile | None":
        """The tier file if it exists, is complete, has an intact manifest and (when given) matches
        ``fingerprint``; else None (the caller rebuilds it).

        A manifest whose digest does not match (names, shapes, dtypes or
        offsets edited or damaged) is refused with :class:`CorruptTierFileError`
        when ``on_corrupt == "refuse"``; with ``"rebuild"`` it is logged and
        None is returned.
        """
        data, man = cls.paths(directory, name)
        if not data.exists() or not man.exists():
            return None
        try:
            manifest = json.loads(man.read_text())
        except (OSError, ValueError) as exc:
            raise TierFileError(f"tier manifest {man} is unreadable ({exc}); delete it to rebuild") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return None
        if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
            problem = (f"tier manifest {man} fails its own checksum (sha256): its names, shapes, dtypes or offsets "
                       f"were edited or damaged, so the bytes of {data} cannot be trusted to mean what it says")
            if on_corrupt == "refuse":
                raise CorruptTierFileError(f"{problem}; delete both files to rebuild (or set on_corrupt='rebuild')")
            log.warning("%s; rebuilding the tier file", problem)
            return None
        if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
            return None
        if data.stat().st_size != manifest.get("file_bytes"):
            return None  # truncated or replaced: rebuild
        try:
            _check_layout(man, manifest)
        except (KeyError, TypeError) as exc:
            raise TierFileError(f"tier manifest {man} lacks or mistypes {exc}; delete it to rebuild") from None
        return cls(data, manifest)

    def read_group(self, name: str) -> dict[str, torch.Tensor]:
        """Read and verify one group with plain buffered I/O (tests, tools; the hot path uses a Reader)."""
        g = self.groups[name]
        buf = torch.empty(g.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(g.offset)
            f.readinto(memoryview(buf.numpy()))
        self.verify(g, buf)
        return unpack_group(buf, g.tensors)

    def verify(self, g: GroupEntry, buf: torch.Tensor) -> None:
        got = checksum(buf)
        if got != g.checksum:
            raise CorruptTierFileError(
                f"tier file {self.path}: weight group {g.name!r} at offset {g.offset} fails its checksum "
                f"(crc32 {got:08x}, manifest {g.checksum:08x}); the file is corrupt: delete it to rebuild"
            )

    def verify_all(self) -> list[str]:
        """Names of the groups whose bytes do not match their checksum."""
        bad = []
        for name in self.groups:
            try:
                self.read_group(name)
            except CorruptTierFileError:
                bad.append(name)
        return bad


class TierFileWriter:
    """Streams groups into a new tier file one at a time (a loader can hand over each group and drop it).

    ``total_bytes`` (the padded size of all groups) is checked against free
    disk space before the first byte is written. ``finish`` fsyncs, renames and
    writes the manifest last; ``abort`` removes the partial file.
    """

    def __init__(self, directory: str | os.PathLike, name: str, fingerprint: str, total_bytes: int, min_free_bytes: int = 0) -> None:
        self.dir = check_tier_dir(directory, total_bytes, min_free_bytes)
        self.data, self.man = TierFile.paths(self.dir, name)
        self.tmp_data, self.tmp_man = self.data.with_suffix(".tier.tmp"), self.man.with_suffix(".json.tmp")
        self.fingerprint = fingerprint
        self.total_bytes = total_bytes
        self.entries: list[dict] = []
        self.offset = 0
        self._f = open(self.tmp_data, "wb")
        if total_bytes > 0:
            try:  # reserve the space now: a disk filling up meanwhile cannot fail the write halfway
                os.posix_fallocate(self._f.fileno(), 0, total_bytes)
            except OSError as exc:
                self.abort()
                if exc.errno in _NO_SPACE:
                    raise _no_space(exc, self.data, total_bytes, 0) from None
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate: write as usual
                    raise

    def _raise_no_space(self, exc: OSError, pending: int = 0) -> None:
        """Remove the partial file; ENOSPC/EDQUOT become a DiskSpaceError (``pending``: bytes being written)."""
        self.abort()
        if exc.errno in _NO_SPACE:
            raise _no_space(exc, self.data, max(self.total_bytes, self.offset + pending), self.offset) from None
        raise exc

    def add(self, gname: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Append one group; returns its padded size."""
        buf, tensor_entries = pack_group(tensors)
        try:
            self._f.write(memoryview(buf.numpy()))
        except OSError as exc:
            self._raise_no_space(exc, buf.numel())
        self.entries.append(
            {
                "name": gname,
                "offset": self.offset,
                "nbytes": buf.numel(),
                "checksum": checksum(buf),
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                    for t in tensor_entries
                ],
            }
        )
        self.offset += buf.numel()
        return buf.numel()

    def finish(self) -> TierFile:
        try:
            self._f.flush()
            self._f.truncate(self.offset)  # drop any reservation beyond what was written
            os.fsync(self._f.fileno())
            self._f.close()
            manifest = {
                "format": FORMAT, "fingerprint": self.fingerprint, "alignment": ALIGNMENT,
                "file_bytes": self.offset, "groups": self.entries,
            }
            manifest[DIGEST_KEY] = manifest_digest(manifest)
            self.tmp_man.write_text(json.dumps(manifest))
            os.replace(self.tmp_data, self.data)
            os.replace(self.tmp_man, self.man)
        except OSError as exc:
            self._raise_no_space(exc)
        return TierFile(self.data, manifest)

    def abort(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # closing flushes; on a full disk that fails again (the fd is closed regardless)
                pass
        for p in (self.tmp_data, self.tmp_man):
            p.unlink(missing_ok=True)


def write_tier_file(
    directory: str | os.PathLike,
    name: str,
    groups: Iterable[tuple[str, Mapping[str, torch.Tensor]]],
    fingerprint: str,
    total_bytes: int,
    min_free_bytes: int = 0,
) -> TierFile:
    """Write groups (streamed: one group in memory at a time) into a new tier file; return it opened."""
    writer = TierFileWriter(directory, name, fingerprint, total_bytes, min_free_bytes)
    try:
        for gname, tensors in groups:
            writer.add(gname, tensors)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def rewrite_group(tier: TierFile, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Rewrite one group's extent in place from its source tensors (repairs a corrupt extent).

    The bytes must reproduce the manifest's checksum; if they do not, the
    checkpoint changed under the file and the whole file must be rebuilt.
    """
    g = tier.groups[name]
    buf, _ = pack_group(tensors)
    if buf.numel() != g.nbytes or checksum(buf) != g.checksum:
        raise TierFileError(
            f"group {name!r} rebuilt from the checkpoint does not match tier file {tier.path}'s manifest; "
            "the checkpoint changed: delete the tier file to rebuild it"
        )
    fd = os.open(tier.path, os.O_WRONLY)
    try:
        os.pwrite(fd, memoryview(buf.numpy()), g.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
