"""The artifact store of a sweep: stats, plans and dense evaluations by key, in a directory or behind any fsspec URL.

`launcher.store` is a directory (default `.actsparse_cache` where the sweep runs) or a URL that fsspec
opens (`s3://bucket/prefix`, `gs://...`, `file:///nfs/actsparse`): on a cluster, every node must reach
it. An artifact is one folder `<kind>/<key>/` holding `tensors.safetensors` + `meta.json`, whose
checksum covers the tensors (actsparse.artifacts); a missing or corrupt one reads as absent, so the
node that needs it computes it again.

- Directory: written in place, atomically (temp folder + rename, by actsparse.artifacts), read in place.
- URL: written to a node-local folder first, uploaded to a hidden staging folder, tensors before
  meta.json, then moved to `<kind>/<key>` (a rename on file systems; on object stores a copy, where the
  checksum still tells a whole artifact from a partial one). Readers download into a node-local cache
  (`launcher.store_cache`) and verify the checksum there.

Hidden names (`.<key>.*`, `.staging-*`) are never artifacts: they are what an interrupted writer leaves.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from ..artifacts import content_key, is_valid
from ..errors import ActsparseError

KINDS = ("stats", "plans", "dense")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(spec: str) -> bool:
    """True when the store spec is a URL (scheme://...) rather than a directory."""
    return bool(_URL.match(str(spec)))


def open_store(spec: str, cache_dir: str | None = None) -> "Store":
    """Return the store for `launcher.store`: a LocalStore for a directory, an FsspecStore for a URL."""
    if is_url(spec):
        return FsspecStore(spec, cache_dir)
    return LocalStore(str(Path(spec).expanduser().resolve()))


def check_store(spec: str) -> None:
    """Raise ActsparseError when fsspec cannot open the store URL (unknown scheme, missing backend package)."""
    if not is_url(spec):
        return
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec comes with mlflow and ray
        raise ActsparseError(f"launcher.store={spec!r} is a URL, which needs the fsspec package; "
                             "pip install fsspec, or use a directory") from e
    proto = spec.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(proto)
    except (ValueError, ImportError) as e:
        raise ActsparseError(f"launcher.store={spec!r}: fsspec cannot open {proto}:// URLs ({str(e).splitlines()[0]}); "
                             "install the backend (s3fs for s3://, gcsfs for gs://, adlfs for az://) "
                             "or use a directory every node sees") from e


class Store:
    """Where keyed artifacts live; subclasses say how they are read and written."""

    url: str

    def fetch(self, kind: str, key: str) -> Path | None:
        """Return a node-local folder holding the valid artifact, or None when it is missing or corrupt."""
        raise NotImplementedError

    def target(self, kind: str, key: str) -> Path:
        """Return the node-local folder to write an artifact into before `publish`."""
        raise NotImplementedError

    def publish(self, kind: str, key: str, local: Path) -> Path:
        """Make the artifact written at `local` visible in the store; return the node-local folder to read it from."""
        raise NotImplementedError

    def keys(self, kind: str) -> list[str]:
        """Return the keys of the visible artifacts of a kind (valid or not), sorted."""
        raise NotImplementedError


class LocalStore(Store):
    """A directory (on a cluster: one every node mounts at the same path)."""

    def __init__(self, root: str):
        self.url = root
        self.root = Path(root)

    def fetch(self, kind: str, key: str) -> Path | None:
        path = self.root / kind / key
        return path if is_valid(path) else None

    def target(self, kind: str, key: str) -> Path:
        return self.root / kind / key      # actsparse.artifacts writes it atomically

    def publish(self, kind: str, key: str, local: Path) -> Path:
        return local

    def keys(self, kind: str) -> list[str]:
        d = self.root / kind
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"


class FsspecStore(Store):
    """Any fsspec URL, with a node-local cache of what was read or written."""

    def __init__(self, url: str, cache_dir: str | None = None):
        self.url = url.rstrip("/")
        base = Path(cache_dir or os.environ.get("ACTSPARSE_STORE_CACHE")
                    or Path(tempfile.gettempdir()) / f"actsparse-store-{os.getuid()}").expanduser().absolute()
        self.cache = base / content_key(self.url)   # one cache folder per store URL
        self._fs = None

    def __getstate__(self) -> dict:                 # ship the URL to Ray workers, not the file system object
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self):
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, self._root = url_to_fs(self.url)
        return self._fs

    def _remote(self, *parts: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return "/".join([self._root.rstrip("/"), *parts])

    def fetch(self, kind: str, key: str) -> Path | None:
        try:
            meta_bytes = self.fs.cat_file(self._remote(kind, key, "meta.json"))
        except FileNotFoundError:
            return None
        try:
            checksum = json.loads(meta_bytes).get("checksum")
        except (json.JSONDecodeError, AttributeError):
            return None                                  # corrupt meta.json: absent
        local = self.cache / kind / key
        if is_valid(local) and _checksum(local) == checksum:
            return local                                 # already downloaded (or written) on this node
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=local.parent))
        try:
            self.fs.get_file(self._remote(kind, key, "tensors.safetensors"), str(tmp / "tensors.safetensors"))
            (tmp / "meta.json").write_bytes(meta_bytes)
            if not is_valid(tmp):                        # partial or corrupt upload: absent
                return None
            _replace_dir(tmp, local)
        except FileNotFoundError:
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def target(self, kind: str, key: str) -> Path:
        return self.cache / kind / f".build-{key}-{uuid.uuid4().hex[:8]}"

    def publish(self, kind: str, key: str, local: Path) -> Path:
        if not is_valid(local):
            raise ActsparseError(f"refusing to publish {local}: it is not a complete artifact")
        fs = self.fs
        staging = self._remote(kind, f".staging-{key}-{uuid.uuid4().hex[:8]}")
        final = self._remote(kind, key)
        fs.makedirs(staging, exist_ok=True)
        try:
            fs.put_file(str(local / "tensors.safetensors"), f"{staging}/tensors.safetensors")
            fs.put_file(str(local / "meta.json"), f"{staging}/meta.json")   # last: its checksum seals the tensors
            if fs.exists(final):                         # a corrupt one being replaced
                fs.rm(final, recursive=True)
            fs.mv(staging, final, recursive=True)
        except BaseException:
            try:
                fs.rm(staging, recursive=True)
            except Exception:
                pass
            raise
        dest = self.cache / kind / key
        _replace_dir(local, dest)
        return dest

    def keys(self, kind: str) -> list[str]:
        try:
            names = self.fs.ls(self._remote(kind), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (str(x).rstrip("/").rsplit("/", 1)[-1] for x in names) if not n.startswith("."))

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"


def _checksum(path: Path) -> str | None:
    try:
        return json.loads((path / "meta.json").read_text()).get("checksum")
    except (OSError, json.JSONDecodeError):
        return None


def _replace_dir(src: Path, dest: Path) -> None:
    """Move src to dest, replacing dest; the old dest is moved aside first so dest is never half-written.

    A dest that already holds the same valid artifact (another worker on this node got there first, and
    may be reading it) is kept, and src dropped.
    """
    if is_valid(dest) and _checksum(dest) == _checksum(src):
        shutil.rmtree(src, ignore_errors=True)
        return
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)
