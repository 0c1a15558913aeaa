"""The output directory: atomic writes, shards with completion markers, the index and a reader.

Layout of an output directory::

    run.json                     the configuration and its hash (written first, by rank 0)
    shards/shard-00000.safetensors   maps + sample index / target / prediction of one shard
    shards/shard-00000.done.json     the completion marker, written *after* the shard file:
                                     sha256 and size of the shard file, sample ids, failures
    index.json                   every sample: id, dataset index, target, prediction, shard, row
    parameter_saliency.pt        merged parameter-saliency statistics (ParameterSaliency.load format)
    report.json                  the last run's report

Every file is written to a temporary file in the same folder, flushed, ``fsync``-ed and renamed
over its final name with :func:`os.replace` (atomic on POSIX), then the folder is ``fsync``-ed. A
shard counts as complete only when its marker exists, parses, names this configuration's hash and
matches the shard file's size and sha256; anything else (a torn or missing shard file, a missing
marker) is recomputed on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "ShardWriteError",
    "OutputLock",
    "OutputLockedError",
    "file_fingerprint",
    "fingerprint_changed",
    "atomic_write_bytes",
    "atomic_write_json",
    "shard_paths",
    "write_shard",
    "read_marker",
    "shard_is_complete",
    "RunOutput",
]

SHARD_DIR = "shards"
LOCK_FILE = ".lock"

# mkstemp creates files 0600; final files get the usual 0666 & ~umask (read once, at import)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ShardWriteError(OSError):
    """Writing a shard (or its marker) failed; the shard is not marked complete."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    On any error the temporary file is removed, ``path`` is left as it was, and the error
    propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def shard_paths(out: Union[str, Path], shard: int) -> Tuple[Path, Path]:
    """``(shard file, completion marker)`` of shard number ``shard``."""
    d = Path(out) / SHARD_DIR
    return d / f"shard-{shard:05d}.safetensors", d / f"shard-{shard:05d}.done.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(
    out: Union[str, Path],
    shard: int,
    tensors: Dict[str, Tensor],
    marker: Dict[str, Any],
    metadata: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Write one shard then its completion marker, both atomically; return the marker.

    The marker (with the shard file's ``sha256`` and ``size`` added) is written only after the
    shard file is durably in place. Any failure raises :class:`ShardWriteError` naming the shard
    and leaves no marker behind, so the shard is recomputed on the next run.
    """
    from safetensors.torch import save

    data_path, marker_path = shard_paths(out, shard)
    try:
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        atomic_write_bytes(data_path, data)
        full = dict(marker, shard=shard, file=data_path.name, sha256=sha256_bytes(data), size=len(data))
        atomic_write_json(marker_path, full)
    except Exception as e:
        try:
            marker_path.unlink()
        except OSError:
            pass
        raise ShardWriteError(
            f"could not write shard {shard} to {data_path.parent} ({type(e).__name__}: {e}); the shard is NOT "
            "marked complete. Fix the cause (free disk space, permissions) and rerun the same command to resume"
        ) from e
    return full


def read_marker(out: Union[str, Path], shard: int) -> Optional[Dict[str, Any]]:
    """The parsed completion marker of ``shard``, or None when absent or unreadable."""
    _, marker_path = shard_paths(out, shard)
    try:
        m = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def shard_is_complete(
    out: Union[str, Path], shard: int, config_hash: str, verify: str = "checksum"
) -> Optional[Dict[str, Any]]:
    """The marker of ``shard`` if the shard is complete and intact, else None.

    Complete means: the marker parses, names ``config_hash``, and the shard file exists with the
    recorded size (and, with ``verify="checksum"``, the recorded sha256).
    """
    m = read_marker(out, shard)
    if m is None or m.get("config_hash") != config_hash or m.get("shard") != shard:
        return None
    data_path, _ = shard_paths(out, shard)
    try:
        if data_path.stat().st_size != m.get("size"):
            return None
        if verify == "checksum" and sha256_file(data_path) != m.get("sha256"):
            return None
    except OSError:
        return None
    return m


# ---------------------------------------------------------------------------------------------
# fingerprints of the inputs (images, checkpoints) that the outputs depend on
# ---------------------------------------------------------------------------------------------
FINGERPRINT_MODES = ("stat", "content")


def file_fingerprint(path: Union[str, Path], mode: str = "stat") -> Dict[str, Any]:
    """What identifies a file's contents: ``size`` and ``mtime_ns`` (``"stat"``: one ``stat``
    call), plus the streamed ``sha256`` of the bytes with ``mode="content"`` (reads the file).

    A missing file gives ``{"missing": True}``.
    """
    try:
        st = os.stat(path)
    except OSError:
        return {"missing": True}
    fp: Dict[str, Any] = {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    if mode == "content":
        fp["sha256"] = sha256_file(Path(path))
    return fp


def fingerprint_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """Why a file changed between two :func:`file_fingerprint` results, or None if it did not.

    The sha256 when both have one (a touched or copied file with the same bytes is unchanged),
    else the size, then the modification time.
    """
    if old.get("missing") or new.get("missing"):
        return None if old.get("missing") and new.get("missing") else ("removed" if new.get("missing") else "re-created")
    size = "" if old.get("size") == new.get("size") else f"size {old.get('size')} -> {new.get('size')} bytes"
    if "sha256" in old and "sha256" in new:
        if old["sha256"] == new["sha256"]:
            return None
        return f"content sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}" + (f", {size}" if size else "")
    if size:
        return size
    if old.get("mtime_ns") != new.get("mtime_ns"):
        return f"modified {_iso(old.get('mtime_ns'))} -> {_iso(new.get('mtime_ns'))} (same size)"
    return None


def _iso(ns: Any) -> str:
    import datetime as _dt

    try:
        return _dt.datetime.fromtimestamp(int(ns) / 1e9, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ns)


# ---------------------------------------------------------------------------------------------
# the lock of an output folder
# ---------------------------------------------------------------------------------------------
class OutputLockedError(OSError):
    """The output folder's lock cannot be taken: another live run holds it (or it is a symlink)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


class OutputLock:
    """An exclusive lock on an output folder: ``fcntl.flock`` on ``<out>/.lock``, with the owner's
    pid, host, start time and command line written into the file.

    The kernel releases a ``flock`` when its owner dies (``SIGKILL`` included), so a lock left by a
    dead run is *stale* and simply taken over; the previous owner is reported in
    :attr:`previous_owner`. The lock file itself is never deleted (deleting a locked file lets a
    third process lock a new file of the same name).

    Args:
        out (str or Path): the output folder (must exist).
        purpose (str, optional): a word for the owner record. Default: ``"run"``
    """

    def __init__(self, out: Union[str, Path], purpose: str = "run") -> None:
        self.path = Path(out) / LOCK_FILE
        self.purpose = purpose
        self.fd: Optional[int] = None
        self.previous_owner: Optional[Dict[str, Any]] = None
        self.unsupported: Optional[str] = None

    @staticmethod
    def owner_record(purpose: str = "run") -> Dict[str, Any]:
        import datetime as _dt
        import socket
        import sys

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "purpose": purpose,
            "argv": " ".join(sys.argv)[:300],
        }

    def _read_owner(self) -> Optional[Dict[str, Any]]:
        for _ in range(5):  # the owner may be writing its record right now
            try:
                text = self.path.read_text(encoding="utf-8").strip()
            except OSError:
                return None
            if not text:
                return None
            try:
                rec = json.loads(text)
                return rec if isinstance(rec, dict) else None
            except ValueError:
                import time

                time.sleep(0.05)
        return None

    def acquire(self) -> "OutputLock":
        """Take the lock or raise :class:`OutputLockedError` naming its owner."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            self.unsupported = "fcntl is not available on this platform"
            return self
        import socket

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:  # never through a symlink: truncating the owner record would truncate its target
            fd = os.open(str(self.path), flags, 0o666 & ~_UMASK)
        except OSError as e:
            if self.path.is_symlink():
                raise OutputLockedError(
                    f"{self.path} is a symbolic link (to {os.readlink(self.path)!r}); the runner does not write "
                    "through links in its output folder: delete the link and rerun"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = self._read_owner()
            if owner is None:
                who = "another process (no owner record yet)"
            else:
                who = (
                    f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
                    f" ({owner.get('argv', '')!s})"
                )
                if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
                    who += (
                        "; that pid is no longer running, so a process that inherited the lock (a worker "
                        f"left behind) still holds it: find it with `fuser {self.path}` and stop it"
                    )
            raise OutputLockedError(
                f"output directory {str(self.path.parent)!r} is in use by another run: {who}. Two runs on one "
                "folder would duplicate work; wait for it to finish (or stop it), or choose another output"
            ) from None
        except OSError as e:  # e.g. a file system without locks
            os.close(fd)
            self.unsupported = f"{type(e).__name__}: {e}"
            return self
        self.fd = fd
        prev = self._read_owner()
        if prev is not None:
            self.previous_owner = prev
        rec = json.dumps(self.owner_record(self.purpose)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, rec + b"\n", 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        """Clear the owner record and unlock (idempotent)."""
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_stale_temporaries(out: Union[str, Path]) -> int:
    """Delete ``.*.tmp`` leftovers of killed writers; return how many were removed."""
    n = 0
    for folder in (Path(out), Path(out) / SHARD_DIR):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp"):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n


@dataclass
class SampleRecord:
    """One sample of the index."""

    id: str
    index: int
    target: int
    prediction: int
    shard: int
    row: int


class RunOutput:
    """Read a finished (or partial) run directory.

    Args:
        out (str or Path): the output directory of a run.

    Examples::

        >>> res = RunOutput("out/run1")
        >>> res.keys()                       # ['normgrad/layer2', ...]
        >>> idx, maps = res.maps("normgrad/layer2")  # dataset indices, (N, 1, h, w)
        >>> res.samples[0].id, res.samples[0].target, res.samples[0].prediction
    """

    def __init__(self, out: Union[str, Path]) -> None:
        self.out = Path(out)
        if not (self.out / "run.json").is_file():
            raise FileNotFoundError(f"{self.out} is not a runner output directory (no run.json)")
        self.run = json.loads((self.out / "run.json").read_text(encoding="utf-8"))
        index_path = self.out / "index.json"
        self.index: Optional[Dict[str, Any]] = (
            json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else None
        )

    @property
    def config_hash(self) -> str:
        return str(self.run["config_hash"])

    @property
    def samples(self) -> List[SampleRecord]:
        """Every sample of the index (needs a finished run)."""
        if self.index is None:
            raise FileNotFoundError(f"{self.out} has no index.json yet; finish the run first (rerun the same command)")
        return [SampleRecord(**s) for s in self.index["samples"]]

    @property
    def failed(self) -> List[Dict[str, Any]]:
        """Samples that could not be read (id, index, error)."""
        if self.index is None:
            raise FileNotFoundError(f"{self.out} has no index.json yet; finish the run first (rerun the same command)")
        return list(self.index["failed"])

    def complete_shards(self) -> List[int]:
        """Shard numbers whose marker and file are intact (checksum verified)."""
        return [
            s
            for s in range(int(self.run["num_shards"]))
            if shard_is_complete(self.out, s, self.config_hash, "checksum") is not None
        ]

    def shard_files(self) -> Iterator[Path]:
        for s in range(int(self.run["num_shards"])):
            yield shard_paths(self.out, s)[0]

    def keys(self) -> List[str]:
        """The map keys (``method/layer`` or ``method/layer/i`` for tuple outputs)."""
        from safetensors import safe_open

        for p in self.shard_files():
            if p.is_file():
                with safe_open(str(p), framework="pt") as f:
                    keys = sorted(k for k in f.keys() if k.startswith("maps/"))
                if keys:  # (a shard whose samples were all unreadable holds no maps)
                    return keys
        return []

    def maps(self, key: str) -> Tuple[Tensor, Tensor]:
        """``(dataset indices, maps)`` of one map key over all complete shards, in index order."""
        from safetensors import safe_open

        full = key if key.startswith("maps/") else f"maps/{key}"
        idx: List[Tensor] = []
        vals: List[Tensor] = []
        for p in self.shard_files():
            if not p.is_file():
                continue
            with safe_open(str(p), framework="pt") as f:
                index = f.get_tensor("index")
                if full not in f.keys():
                    if index.numel() == 0:  # every sample of this shard was unreadable
                        continue
                    raise KeyError(f"no map {key!r} in {p.name}; available: {sorted(f.keys())}")
                idx.append(index)
                vals.append(f.get_tensor(full))
        if not idx:
            raise FileNotFoundError(f"{self.out} holds no shard files yet")
        i = torch.cat(idx)
        order = torch.argsort(i)
        return i[order], torch.cat(vals)[order]

    @property
    def statistics_path(self) -> Path:
        """``parameter_saliency.pt``: load it with ``ParameterSaliency(model).load(path)``."""
        return self.out / "parameter_saliency.pt"

    def statistics(self) -> Any:
        """The merged parameter-saliency :class:`~captum_normgrad.parameter_saliency.WelfordState`."""
        from ..parameter_saliency import WelfordState

        p = self.statistics_path
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; the run had no statistics or is not finished")
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        return WelfordState.from_state_dict(state["welford"])
