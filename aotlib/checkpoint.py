"""Crash-safe files: atomic writes and checksummed payloads.

A run may be killed at any moment (kill -9 included). Every file is written to a
temporary name and renamed into place, so a reader sees either the old file or the
new one, never half of one. Payloads carry a SHA-256 of their bytes, so a file that
was damaged after the fact is detected and recomputed instead of trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

_MAGIC = b"AOTCKPT1"


class CorruptFile(Exception):
    """A stored file failed its checksum or could not be parsed."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` with a checksum header, atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; raise CorruptFile if damaged."""
    raw = Path(path).read_bytes()
    header, digest, payload = raw[:8], raw[8:40], raw[40:]
    if header != _MAGIC or hashlib.sha256(payload).digest() != digest:
        raise CorruptFile(f"checkpoint {path} failed its checksum")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def save_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a JSON document with an embedded checksum of its content, atomically."""
    body = dict(obj)
    body.pop("sha256", None)
    body["sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    atomic_write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON document written by `save_json`; raise CorruptFile if damaged."""
    try:
        body = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not valid JSON: {err}") from err
    if not isinstance(body, dict) or "sha256" not in body:
        raise CorruptFile(f"{path} has no checksum")
    digest = body.pop("sha256")
    if hashlib.sha256(_canonical(body)).hexdigest() != digest:
        raise CorruptFile(f"{path} failed its checksum")
    return body
