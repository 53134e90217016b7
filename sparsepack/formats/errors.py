"""Typed errors for reading and writing packs. Every message names the file (and tensor) at fault."""

from __future__ import annotations


class FormatError(Exception):
    """A pack or checkpoint is not valid. ``path`` and ``tensor`` name what is at fault."""

    def __init__(self, message: str, path: object = None, tensor: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        self.path = path
        self.tensor = tensor
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ManifestError(FormatError):
    """sparsepack.json missing fields, wrong format name, unparsable JSON."""


class VersionError(FormatError):
    """The pack declares a format version this release cannot read."""


class HashMismatchError(FormatError):
    """A file's sha256 or size differs from the manifest."""


class MissingFileError(FormatError):
    """A file named by the manifest or required by the layout is absent."""


class SafetensorsHeaderError(FormatError):
    """A safetensors file is truncated or its header is inconsistent (offsets, dtypes, shapes)."""


class ConfigError(FormatError):
    """config.json / quantize_config.json is unreadable, inconsistent, or declares impossible dimensions."""


class ShapeError(FormatError):
    """A tensor's shape or dtype does not match the model config or the layout."""


class SparseIndexError(FormatError):
    """A sparse adapter's CSR indices are out of range or row_ptr is not monotone."""


class UnsafeFileError(FormatError):
    """A pickle-based checkpoint (.bin/.pt/.pth/.ckpt) was offered: refused, never unpickled."""


class UnsafePathError(FormatError):
    """A name or path would escape the pack directory (path separators, '..', absolute paths, symlinks)."""


class OutputExistsError(FormatError):
    """The output directory exists and overwriting was not requested."""


class ForeignOutputError(OutputExistsError):
    """The output path exists but carries no sparsepack marker: it is not ours to replace or delete."""


class OutputOverlapsInputError(FormatError):
    """The output (or checkpoint) path is, holds, or lies inside one of the command's own inputs."""


class WriteError(FormatError):
    """Writing an output failed with an OS error (disk full, permissions, I/O); the output path is unchanged."""


class CheckpointError(FormatError):
    """A training checkpoint is missing, truncated, corrupt, or does not fit the run resuming from it."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """``--resume`` with settings that differ from the checkpoint's (also a ValueError, as before)."""


class OutputBusyError(FormatError):
    """Another live process is writing the same output (its checkpoint directory is locked)."""


class OnnxFormatError(FormatError):
    """An ONNX export's graph, external data or ``.onnx_adapter`` file is unreadable or inconsistent."""
