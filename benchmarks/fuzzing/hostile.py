"""Hostile values and the raw file edits that the pack and output mutators share."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

HOSTILE_INTS = (-1, 0, -(2**31), 2**31 - 1, 2**31, 2**40, 2**63, 2**64, -(2**63))
HOSTILE_VALUES = (None, True, False, -1, 0, 2**31, 2**40, 2**63, 2**64, 1.5, 1e308, -1e308, "", "x", "../../etc/passwd",
                  "/etc/passwd", [], {}, [1, 2], {"a": None})  # fmt: skip
HOSTILE_NAMES = ("../evil", "..", "a/b", "/abs", "", ".hidden", "x" * 65, "a\\b", "ad1/../..", "a\x00b", "\u202e",
                 " ", "a" * 1000)  # fmt: skip


def read_st(path: Path) -> tuple[dict, bytes, int]:
    """A safetensors file as (header dict, data section, header length)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :], n


def write_st(path: Path, header: dict | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def pick(rng: random.Random, seq: Sequence):
    """One element of ``seq``, drawn from ``rng``."""
    return seq[rng.randrange(len(seq))]


def symlink(link: Path, target: Path | str) -> None:
    """Replace whatever is at ``link`` (a file, a directory, a link) by a symlink to ``target``."""
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif os.path.lexists(link):
        link.unlink()
    os.symlink(target, link)
