"""The artifact store: ONNX files named by their sha256, outside the database.

A trial's ONNX is re-made from its plan on demand (the export reproduces the measured sha256), so
the store only has to keep what a job or a front needs now; ``prune`` removes the rest. By default
it is a folder beside a SQLite database file (``hwprune.db`` -> ``hwprune.artifacts/``), or under
the user cache for other databases; any fsspec URL (``s3://bucket/prefix``, ``gcs://...``) serves
workers and a hub on several machines when fsspec (and its backend, e.g. s3fs) is installed.

Files are ``<root>/<sha[:2]>/<sha>.onnx``; a file is written under a temporary name and renamed,
and every read checks the bytes against their name, so a torn or tampered file is never served.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.errors import ConfigError, StorageError

SUFFIX = ".onnx"
_CHUNK = 1 << 20


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(sha256: str) -> None:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise StorageError(f"artifact name {sha256[:80]!r} is not a sha256 (64 lowercase hex digits)")


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What ``ArtifactStore.prune`` did."""

    removed: int
    freed_bytes: int
    kept: int


class ArtifactStore:
    """Content-addressed ONNX files in a folder or at an fsspec URL.

    Args:
        url: a folder path, ``file://`` URL, or any URL fsspec knows (``s3://bucket/prefix``).

    Raises:
        ConfigError: a non-local URL without fsspec (or its backend) installed.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._fs: Any = None
        if url.startswith("file://"):
            url = url[len("file://"):]
        if "://" in url:
            try:
                from fsspec.core import url_to_fs
            except ImportError:
                raise ConfigError(f"artifact store {url!r} needs fsspec: pip install fsspec "
                                  "(and its backend, e.g. s3fs for s3://), or use a folder") from None
            try:
                self._fs, self._root = url_to_fs(url)
            except (ImportError, ValueError) as exc:
                raise ConfigError(f"artifact store {url!r} cannot be used: {exc}") from None
            self._root = str(self._root).rstrip("/")
        else:
            self._root = str(Path(url).expanduser())

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def _key(self, sha256: str) -> str:
        _check_name(sha256)
        return f"{self._root}/{sha256[:2]}/{sha256}{SUFFIX}"

    # --- writing ------------------------------------------------------------------------------

    def put_file(self, path: Path, sha256: str | None = None) -> str:
        """Store the file at ``path`` (copied); returns its sha256. Storing it twice is harmless.

        Raises:
            StorageError: ``sha256`` is given and the file does not match it, or the store fails.
        """
        found = _sha256_of(path)
        if sha256 is not None and found != sha256:
            raise StorageError(f"artifact {path} has sha256 {found[:12]}, expected {sha256[:12]}")
        if self.exists(found):
            return found
        key = self._key(found)
        try:
            if self._fs is None:
                target = Path(key)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
                shutil.copyfile(path, partial)
                os.replace(partial, target)
            else:
                partial_key = f"{key}.{uuid.uuid4().hex}.tmp"
                self._fs.put_file(str(path), partial_key)
                self._fs.mv(partial_key, key)
        except OSError as exc:
            raise StorageError(f"cannot write artifact {found[:12]} to {self.url}: {exc}") from exc
        return found

    def put_bytes(self, content: bytes, sha256: str | None = None) -> str:
        """Store ``content``; returns its sha256 (checked against ``sha256`` when given)."""
        found = hashlib.sha256(content).hexdigest()
        if sha256 is not None and found != sha256:
            raise StorageError(f"artifact bytes have sha256 {found[:12]}, expected {sha256[:12]}")
        if self.exists(found):
            return found
        key = self._key(found)
        try:
            if self._fs is None:
                target = Path(key)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
                partial.write_bytes(content)
                os.replace(partial, target)
            else:
                partial_key = f"{key}.{uuid.uuid4().hex}.tmp"
                self._fs.pipe_file(partial_key, content)
                self._fs.mv(partial_key, key)
        except OSError as exc:
            raise StorageError(f"cannot write artifact {found[:12]} to {self.url}: {exc}") from exc
        return found

    # --- reading ------------------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        key = self._key(sha256)
        return Path(key).is_file() if self._fs is None else bool(self._fs.exists(key))

    def local_path(self, sha256: str) -> Path | None:
        """The file itself when the store is a local folder and holds it (unchecked), else None."""
        if self._fs is not None:
            return None
        path = Path(self._key(sha256))
        return path if path.is_file() else None

    def read_bytes(self, sha256: str) -> bytes | None:
        """The artifact's bytes, or None when absent or not matching its name (then removed)."""
        key = self._key(sha256)
        try:
            content = Path(key).read_bytes() if self._fs is None else bytes(self._fs.cat_file(key))
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot read artifact {sha256[:12]} from {self.url}: {exc}") from exc
        if hashlib.sha256(content).hexdigest() != sha256:
            self.delete(sha256)  # torn or altered: re-made from its plan when needed again
            return None
        return content

    def fetch_to(self, sha256: str, dest: Path) -> bool:
        """Write the artifact to ``dest`` (checked); False when the store does not hold it."""
        content = self.read_bytes(sha256)
        if content is None:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.tmp")
        partial.write_bytes(content)
        os.replace(partial, dest)
        return True

    # --- housekeeping -------------------------------------------------------------------------

    def delete(self, sha256: str) -> None:
        key = self._key(sha256)
        try:
            if self._fs is None:
                Path(key).unlink(missing_ok=True)
            elif self._fs.exists(key):
                self._fs.rm_file(key)
        except OSError as exc:
            raise StorageError(f"cannot remove artifact {sha256[:12]} from {self.url}: {exc}") from exc

    def _entries(self) -> Iterator[tuple[str, int, float]]:
        """(sha256, size, modified time) of every stored artifact."""
        if self._fs is None:
            root = Path(self._root)
            if not root.is_dir():
                return
            for path in root.glob(f"??/*{SUFFIX}"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # pruned by another process meanwhile
                yield path.name[: -len(SUFFIX)], stat.st_size, stat.st_mtime
            return
        if not self._fs.exists(self._root):
            return
        for key, info in self._fs.find(self._root, detail=True).items():
            name = str(key).rsplit("/", 1)[-1]
            if name.endswith(SUFFIX):
                modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
                stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
                yield name[: -len(SUFFIX)], int(info.get("size") or 0), stamp

    def names(self) -> set[str]:
        return {sha for sha, _, _ in self._entries()}

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def prune(self, keep: set[str], *, min_age_s: float = 600.0) -> PruneReport:
        """Remove every artifact not in ``keep`` and older than ``min_age_s`` (the age spares an
        artifact another worker has just stored and not yet queued a job for).

        Returns:
            How many files were removed and kept, and the bytes freed.
        """
        now = time.time()
        removed = freed = kept = 0
        for sha, size, modified in list(self._entries()):
            if sha in keep or now - modified < min_age_s:
                kept += 1
                continue
            self.delete(sha)
            removed += 1
            freed += size
        return PruneReport(removed=removed, freed_bytes=freed, kept=kept)
