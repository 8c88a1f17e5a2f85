"""Content-addressed, atomically written artifacts (tensors in safetensors, metadata in JSON, never pickle)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ActsparseError


def content_key(*parts) -> str:
    """Return a short stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors_json(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `path/` = tensors.safetensors + meta.json (with the tensors' checksum), atomically; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "tensors.safetensors"))
        meta = dict(meta, checksum=_sha256(tmp / "tensors.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        follow_umask(tmp)
        if path.exists():  # replace: move the old one aside first so the rename is atomic
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            _rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _rmtree(tmp)
        raise
    return path


def follow_umask(folder: Path) -> None:
    """Give a folder made by mkdtemp (mode 700) and its files the modes the user's umask asks for, as a plain
    mkdir and open would: a group sharing a store reads what any of them wrote."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def current_umask() -> int:
    """The process's umask (read from /proc where it is shown, so no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_tensors_json(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an artifact written by save_tensors_json; raise ActsparseError if missing or corrupt."""
    path = Path(path)
    meta_p, ten_p = path / "meta.json", path / "tensors.safetensors"
    if not meta_p.exists() or not ten_p.exists():
        raise ActsparseError(f"artifact {path} is missing or incomplete (expected meta.json + tensors.safetensors)")
    try:
        meta = json.loads(meta_p.read_text())
    except json.JSONDecodeError as e:
        raise ActsparseError(f"artifact {path} has a corrupt meta.json: {e}") from e
    if meta.get("checksum") != _sha256(ten_p):
        raise ActsparseError(f"artifact {path} is corrupt: tensors.safetensors does not match its checksum")
    return load_file(str(ten_p)), meta


def is_valid(path: str | os.PathLike) -> bool:
    """True when the artifact at `path` exists and its checksum matches."""
    try:
        load_tensors_json(path)
        return True
    except ActsparseError:
        return False


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
