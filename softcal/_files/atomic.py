"""Outputs that never damage a file: checked against the inputs by identity, written whole.

Every file a command writes goes through this module:

1. :func:`check_outputs`, before anything is computed or opened for writing: each output is not a
   directory, its folder exists (or may be created), it is none of the inputs (compared by device
   and inode, so that a hard link, a symbolic link or another spelling of an input's path is
   refused) and no two outputs are the same file;
2. :func:`atomic_output`: the content is written to a temporary file beside the target (same
   folder, hidden name ``.NAME.XXXX.softcal-partial.SUFFIX``) and renamed onto the target only
   when complete, so that the target holds either its old content or the complete new one; the
   temporary file is removed on an error, Ctrl-C or (with :func:`signals_raise`) SIGTERM/SIGHUP.
   A SIGKILL leaves the target as it was and the hidden temporary file beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from .common import InputError

__all__ = ["Terminated", "atomic_output", "check_outputs", "same_file", "signals_raise",
           "write_text"]

PARTIAL = ".softcal-partial"
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (raised by :func:`signals_raise`'s handler)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum, frame):  # noqa: ARG001
    raise Terminated(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise :class:`Terminated` (so that ``finally`` blocks,
    and with them :func:`atomic_output`'s clean-up, run). Only in the main thread; elsewhere
    (and for signals left at SIG_IGN by the parent, such as nohup's SIGHUP) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN:
            continue
        old[sig] = prev
        signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def _identity(path: Path) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same existing file (device and inode; links followed)."""
    ia = _identity(a)
    return ia is not None and ia == _identity(b)


def check_outputs(outputs: Sequence[Tuple[str, Path]], inputs: Sequence[Path],
                  create_folders: bool = False) -> None:
    """Refuse (InputError, before anything is written) an output (option, path) that is a
    directory, whose folder is missing (unless ``create_folders``, which allows any missing
    folders that can be made: no part of the path is a file), that is one of ``inputs`` by
    identity, or that is the same file as another output."""
    inputs = [Path(p) for p in inputs if p is not None]
    seen: List[Tuple[str, Path]] = []
    for opt, out in outputs:
        out = Path(out)
        if out.is_dir():
            raise InputError(f"{opt} {out} is a directory; name a file")
        folder = Path(os.path.realpath(out)).parent
        if not folder.is_dir():
            if not create_folders:
                raise InputError(f"{opt} {out}: the folder {folder} does not exist")
            up = folder
            while not up.exists():
                up = up.parent
            if not up.is_dir():
                raise InputError(f"{opt} {out}: {up} is a file, not a folder")
        for inp in inputs:
            if same_file(out, inp):
                how = "" if os.path.realpath(out) == os.path.realpath(inp) else \
                    " (the same file through a link)"
                raise InputError(f"{opt} {out} is the input file {inp}{how}; write to another file")
        real = os.path.realpath(out)
        for opt2, out2 in seen:
            if real == os.path.realpath(out2) or same_file(out, out2):
                raise InputError(f"{opt} {out} and {opt2} {out2} are the same file")
        seen.append((opt, out))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write to; on success it is flushed to disk and
    renamed onto ``target`` (through a symbolic link: onto the file it points to; the mode of a
    file replaced is kept), on any exception it is removed and ``target`` is left as it was.
    An OSError about the output (permissions, a full disk) becomes one InputError line."""
    target = Path(target)
    real = Path(os.path.realpath(target))
    real.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{real.stem}.", suffix=f"{PARTIAL}{real.suffix}",
                                    dir=real.parent)
    except OSError as e:
        raise InputError(f"{target}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = stat.S_IMODE(os.stat(real).st_mode) if real.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, real)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if str(e.filename) in (str(tmp), str(real), str(target)) or e.errno in _WRITE_ERRORS:
            raise InputError(f"{target}: could not write it ({e.strerror or e})") from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` whole (:func:`atomic_output`)."""
    with atomic_output(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
