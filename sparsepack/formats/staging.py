"""Atomic outputs: every directory and small file sparsepack writes goes through here.

A writer stages its output in a temporary sibling (``.NAME.tmp-PID@HOST-XXXXXXXX``) and renames it into place
only when complete, so a crash or an error never leaves a partial output. The deletion rule (docs/RELIABILITY.md):
a command replaces or deletes only a directory that carries one of this tool's own markers
(:data:`OWNER_MARKERS`), and never a path that holds or lies inside one of the command's own inputs; anything
else is an error naming the path, raised before any work is done (:func:`check_output`) and again at the rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from sparsepack.formats.errors import (
    ForeignOutputError,
    FormatError,
    OutputExistsError,
    OutputOverlapsInputError,
    WriteError,
)

# File names that mark a directory as written by sparsepack, each defined beside its writer (a test checks that
# every writer's constant is listed): pack manifest (formats.manifest), adapter record (formats.adapter_layout;
# PEFT exports), ONNX export record (runtime.onnx_runtime), sample-model marker (runtime.sample), checkpoint
# directory marker and checkpoint state (pipeline.checkpoint).
OWNER_MARKERS = ("sparsepack.json", "sparsepack_adapter.json", "sparsepack_onnx.json", "sparsepack_sample.json",
                 "sparsepack_checkpoints.json", "state.json")  # fmt: skip

SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)-[a-z0-9_]{8}$")


# ------------------------------------------------------------------------------------------------ the rule


def is_owned(path: Path) -> bool:
    """True when ``path`` is a real directory holding one of :data:`OWNER_MARKERS` as a regular file."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / m).is_file() and not (path / m).is_symlink() for m in OWNER_MARKERS)


def overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same path or one lies inside the other (after resolving symlinks)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(out: Path, overwrite: bool = False, inputs: Iterable[Path | str | None] = ()) -> Path:
    """Check that a command may write ``out``; returns it as an absolute path.

    Args:
        out: the output directory.
        overwrite: an existing output may be replaced (only one this tool wrote: :func:`is_owned`).
        inputs: paths the command reads (None and non-path sources are skipped); ``out`` must not be one of them,
            hold one, or lie inside one.

    Raises:
        OutputOverlapsInputError: ``out`` overlaps an input.
        OutputExistsError: ``out`` exists and ``overwrite`` is False, or it is not a directory.
        ForeignOutputError: ``out`` exists and carries no sparsepack marker.
    """
    out = Path(out).absolute()
    check_placement(out, inputs, "the output")
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise OutputExistsError("exists and is not a directory; refusing to replace it", out)
        if not overwrite:
            raise OutputExistsError("output exists (pass --overwrite to replace it)", out)
        if not is_owned(out):
            raise ForeignOutputError(
                "exists and was not written by sparsepack (it holds none of "
                f"{', '.join(OWNER_MARKERS)}); refusing to replace it: remove it yourself or choose another path",
                out,
            )
    return out


def check_placement(path: Path, inputs: Iterable[Path | str | None], what: str) -> None:
    """``path`` can be created (no parent is a regular file) and overlaps none of ``inputs``.

    Raises:
        OutputExistsError: a parent of ``path`` is a file.
        OutputOverlapsInputError: ``path`` is, holds or lies inside one of ``inputs``; ``what`` names it.
    """
    path = Path(path).absolute()
    blocker = next((p for p in path.parents if os.path.lexists(p) and not p.is_dir()), None)
    if blocker is not None:
        raise OutputExistsError(f"cannot be created: {blocker} is a file, not a directory", path)
    for src in inputs:
        if src is not None and overlaps(path, Path(src)):
            raise OutputOverlapsInputError(f"{what} overlaps the command's input {src}; choose another path", path)


# ------------------------------------------------------------------------------------------------ staging


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool = False, inputs: Iterable[Path | str | None] = ()) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success rename it to ``out``, on failure delete it.

    A writer killed outright (kill -9, power loss) cannot delete its sibling; the next write to the same ``out``
    does (:func:`clean_stale_siblings`). An existing ``out`` (only one :func:`check_output` allows) is replaced by
    an atomic exchange where the OS offers one (Linux ``renameat2``), so no moment exists at which ``out`` is
    missing; elsewhere by two renames.

    Raises:
        OutputExistsError, ForeignOutputError, OutputOverlapsInputError: see :func:`check_output` (checked before
            and at the rename, so of two concurrent writers one wins and the other fails cleanly).
        WriteError: the body failed with an OS error (disk full, permissions, I/O); nothing changed at ``out``.
    """
    inputs = list(inputs)
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(out)  # first: it may put back a previous output that a dead writer had moved aside
    check_output(out, overwrite, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=sibling_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        share_like_any_file(tmp)  # mkdtemp makes it 0700 and safetensors writes 0600: follow the umask instead
        if os.path.lexists(out):
            try:
                check_output(out, overwrite, inputs)
            except OutputExistsError as e:
                raise type(e)(f"output appeared while writing (another writer?); {e.args[0]}") from None
            if _rename_exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous output
            else:
                old = Path(tempfile.mkdtemp(prefix=sibling_prefix(out, "old"), dir=out.parent))
                os.rename(out, old / "x")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError as e:  # ENOTEMPTY/EEXIST: someone else renamed into place first
                raise OutputExistsError(f"output appeared while writing ({e.strerror})", out) from None
        fsync_dir(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = _io_failure(e)
        if detail is not None:
            raise WriteError(f"writing failed ({detail}); the output path was left as it was", out) from e
        raise


@contextlib.contextmanager
def staged_file(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a fresh temp sibling (``NAME.tmp-PID-XXXXXXXX``) for the caller to write; on success fsync it and
    rename it over ``path``, on failure delete it. ``mode``: the file's permissions (default: what the umask
    gives; mkstemp's own is 0600)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def replace_file(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write the small file ``path`` atomically and durably (:func:`staged_file`)."""
    with staged_file(path, mode) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def stale_file_tmp(name: str) -> bool:
    """``name`` is a :func:`staged_file` temp (``NAME.tmp-PID-XXXXXXXX``) whose writer is dead."""
    pid = name.rsplit(".tmp-", 1)[-1].split("-", 1)[0] if ".tmp-" in name else ""
    return pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def _io_failure(e: BaseException) -> str | None:
    """A one-line description when ``e`` is an OS-level write failure (as OSError or as safetensors reports it)."""
    if isinstance(e, OSError) and not isinstance(e, FormatError):
        code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        return f"{code}: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if type(e).__name__ == "SafetensorError" and "os error" in str(e):  # save_file wraps the OSError
        return str(e)
    return None


def sibling_prefix(out: Path, tag: str) -> str:
    return f".{out.name}.{tag}-{os.getpid()}@{host()}-"


def host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_siblings(out: Path) -> list[Path]:
    """Delete temporary siblings of ``out`` whose writer is dead; returns what was deleted.

    Only siblings made on this host by a process id that no longer runs are touched: a live writer's (here or on
    another host sharing the filesystem) are left alone, and so is anything not named by :func:`staged_dir`.
    """
    removed = []
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return removed
    for path in sorted(out.parent.iterdir()):
        m = SIBLING_RE.match(path.name)
        if not m or m["name"] != out.name or m["host"] != host() or int(m["pid"]) == os.getpid():
            continue
        if pid_alive(int(m["pid"])) or not path.is_dir() or path.is_symlink():
            continue
        if m["tag"] == "old" and not os.path.lexists(out) and (path / "x").is_dir():
            os.rename(path / "x", out)  # the writer died between its two renames: put the previous output back
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings of ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``) left by writers, dead or alive."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if (m := SIBLING_RE.match(p.name)) and m["name"] == out.name)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(b))


def umask() -> int:
    """The process umask, read without setting it (os.umask() would change it for every thread for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def share_like_any_file(folder: Path) -> None:
    """Give ``folder`` and every file under it that was written here the modes the umask allows (mkdtemp and some
    writers use 0600)."""
    mask = umask()
    folder = Path(folder)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink() or (path.is_file() and path.stat().st_nlink > 1):
            continue  # a hard link shares its inode with an input file: never change what we did not write
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the rename itself durable
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
