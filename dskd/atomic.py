"""Atomic file writes, and what to say when a directory cannot be written.

Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one. Write to a
temporary sibling, flush and fsync, then `os.replace` over the target: rename is atomic on POSIX file systems. A
write that fails (a full disk) removes its temporary file, so it does not keep the space it took; a crash
mid-write leaves at most a stray `.tmp-*` file behind.

Unwritable directories (a read-only mount, no permission, a full disk or quota): `check_writable` creates a
directory and writes, fsyncs and removes a probe file in it, raising `Unwritable` (an OSError naming the directory,
with the errno a real write met) if any of it fails (the CLI's preflight, before anything loads). `write_failure`
tells whether an exception raised by a stage was such a failed write, wherever it came from: an OSError in its
chain, an error of a library that writes files itself (Rust's "(os error N)", SQLite's "database or disk is full",
torch's checkpoint writer, which gives no errno) confirmed by probing the directory the stage writes.
`cannot_write` is the one-line message that names the path, the reason and what to do.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

# What a write can fail of because of where it writes (not what): the user fixes the place, not the recipe.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# A directory with less room than this is full for a stage: a checkpoint or an export does not fit.
PROBE_BYTES = 1 << 20
_PROBE = ".dskd-write-probe"


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through `write(file)` to a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


class Unwritable(OSError):
    """`check_writable` failed: errno and reason of the step that failed, filename the directory checked."""


def check_writable(directory: Path, size: int = 1) -> None:
    """Create `directory` (and its parents) and write `size` bytes to a probe file in it, fsync'd, then remove
    it; raises `Unwritable` if any step fails."""
    directory = Path(directory)
    probe = directory / f"{_PROBE}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            for start in range(0, size, 1 << 16):
                handle.write(os.urandom(min(1 << 16, size - start)))  # a compressing file system stores it all
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:  # the directory is what cannot be written, not a parent's or the probe's name
        raise Unwritable(exc.errno, exc.strerror, str(directory)) from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # e.g. its directory could not be created
            pass


def write_failure(exc: BaseException, directory: Path | None) -> OSError | None:
    """The failed write behind `exc` (see the module docstring), or None when `exc` is something else."""
    seen, chain = set(), exc
    library_write_error = False
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in WRITE_ERRNOS and (
                chain.errno not in (errno.EACCES, errno.EPERM) or _inside(chain.filename, directory)):
            return chain  # a permission error counts where the stage writes, not on a file it reads
        text = str(chain)
        if match := re.search(r"\(os error (\d+)\)", text):  # Rust's io::Error (safetensors, tokenizers)
            if int(match.group(1)) in WRITE_ERRNOS:
                return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
        if "database or disk is full" in text:  # SQLITE_FULL, from the MLflow store
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        library_write_error |= "file write failed" in text or "unexpected pos" in text or "iostream error" in text
        chain = chain.__cause__ or chain.__context__
    if directory is None or not (library_write_error or isinstance(exc, OSError)):
        return None
    try:
        check_writable(directory, PROBE_BYTES)
    except OSError as probe_exc:
        if probe_exc.errno in WRITE_ERRNOS:
            return probe_exc
    return None


def _inside(path, directory: Path | None) -> bool:
    """Whether `path` is under `directory` (where the stage writes: a permission error there is the place's)."""
    if path is None or directory is None:
        return False
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(directory))


def cannot_write(failure: OSError, directory: Path) -> str:
    """'cannot write <path>: <reason>; <what to do>' for a failure from `write_failure` or `check_writable`
    (`directory`: the path to name when the failure has none)."""
    path = failure.filename or directory
    reason = failure.strerror or str(failure)
    if failure.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = ("free space there (or point run.output_dir elsewhere), then run the stage again: a finished stage "
                "is reused and `--resume auto` continues training from the last complete checkpoint")
    elif failure.errno == errno.EROFS:
        todo = "point run.output_dir (or --output-dir) at a writable directory"
    else:
        todo = "point run.output_dir (or --output-dir) at a directory you can write, or fix its permissions"
    return f"cannot write {path}: {reason}; {todo}"
