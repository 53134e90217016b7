"""Every JSON file sparsepack reads goes through :func:`read_json`: bounded in size before it is read, UTF-8
with the line of a bad byte named, and an object that names a key twice refused (``json`` would silently keep
the last one, so a second ``"files"`` could hide the file list a verification relies on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsepack.formats.errors import FormatError

MAX_JSON_BYTES = 64 << 20  # far above any manifest, config or record sparsepack writes (a few kB to a few MB)


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads` that refuses a key seen twice in one object."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def read_json(path: Path, error: type[FormatError] = FormatError, limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed content of the JSON file ``path``.

    Raises:
        error: the file is larger than ``limit`` bytes, unreadable, not UTF-8 (the line is named), not valid JSON,
            or names a key twice in one object.
    """
    path = Path(path)
    try:
        if path.stat().st_size > limit:
            raise error(f"larger than {limit} bytes, the limit for a JSON file sparsepack reads", path)
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"unreadable ({e.strerror})", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"not UTF-8: byte 0x{raw[e.start]:02x} on line {line}", path) from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except DuplicateKeyError as e:
        raise error(f"key {e.args[0]!r} appears twice in one object", path) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int digit limit, deep nesting
        raise error(f"invalid JSON: {type(e).__name__}: {e}", path) from None
