"""
safeio.py: files that a kill, a full disk or a second process cannot corrupt.

Every file nanoXmodel writes that matters (checkpoints, logs, token shards, meta.json, configs, results) goes
through these few functions, so the guarantees are made once:

    with atomic_write(path, "wb", size_hint=n) as f:   # readers see the old file or the new one, whole
        torch.save(state, f)
    make_dir(out_dir, "--out_dir")                     # a path under a file, a read-only disk: one clear line
    with FileLock(os.path.join(out_dir, ".lock"), "run"):   # one process at a time; a dead owner never blocks
        ...
    entries, torn = read_jsonl(log_path)               # a log whose last line a crash tore in half still reads

A failed write (disk full, quota, read-only filesystem, a file-size limit) raises WriteError, whose message
names the path, the space it needed and the space left; the temp file is gone and the old file untouched.
WriteError and LockError are cli.UserErrors: a script lets them rise to cli.run_main, which prints the line.
"""

import errno
import glob
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager, suppress

try:
    import fcntl  # POSIX; on Windows runs go unlocked
except ImportError:
    fcntl = None

from cli import UserError


class WriteError(UserError):
    """A file could not be written; the message says which, why, and what is safe."""


class LockError(UserError):
    """Another live process holds the lock."""


def _mb(n):
    return f"{n / 2**20:,.1f} MB"


def os_error(e):
    """The OSError behind an exception, or None: torch.save's zip writer reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError, which stays in its context."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def write_error(path, e, size_hint=None):
    """A WriteError for a failed write of path: the reason, and for a full disk how much was needed."""
    e = os_error(e) or e
    free = None
    with suppress(OSError):
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full" + (f": about {_mb(size_hint)} needed" if size_hint else "") + \
                 (f", {_mb(free)} free" if free is not None else "")
    elif code == errno.EFBIG:
        reason = "the file grew past this process's file-size limit (ulimit -f)"
    elif code == errno.EROFS:
        reason = "the filesystem is read-only"
    elif code in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    else:
        text = str(e).strip()
        reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    return WriteError(f"cannot write {path}: {reason}")


@contextmanager
def atomic_write(path, mode="wb", size_hint=None, encoding=None):
    """Write path through path.tmp: flushed, fsynced and renamed over path only when the block succeeds.

    On any exception (a full disk, KeyboardInterrupt) the temp file is removed and path keeps its old content.
    A failed write becomes WriteError; other exceptions pass through unchanged."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        if os_error(e) is not None:
            raise write_error(path, e, size_hint) from None
        raise
    with suppress(OSError):  # make the rename itself durable (a power cut right after keeps the new file)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path, obj, **kw):
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **kw)


def make_dir(path, what):
    """os.makedirs(path, exist_ok=True), with one line for what can go wrong (what: e.g. '--out_dir')."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        p = os.path.abspath(path)
        while not os.path.exists(p):
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise WriteError(f"{what}={path}: {p} is a file, not a directory; choose another {what}") from None
        raise WriteError(f"{what}={path}: cannot create it ({e.strerror}); choose another {what}") from None
    if not os.access(path, os.W_OK):
        raise WriteError(f"{what}={path} is not writable (read-only filesystem or permissions); "
                         f"choose another {what}")


class FileLock:
    """An exclusive lock for the life of a process: flock on a small file that names the owner.

    The kernel drops a flock when its process dies, however it dies (kill -9 included), so a crashed run never
    blocks the next one; a live one makes acquire() raise LockError naming it. Works on local disks and NFS."""

    def __init__(self, path, what="run"):
        self.path, self.what, self.f = path, what, None

    def acquire(self):
        if fcntl is None:
            return self
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise LockError(f"{os.path.dirname(os.path.abspath(self.path))} is in use by another {self.what} "
                            f"({owner})") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
        except OSError as e:
            f.close()
            raise write_error(self.path, e) from None
        self.f = f
        return self

    def release(self):
        if self.f is not None:
            self.f.close()  # closing the file drops the flock
            self.f = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def read_jsonl(path):
    """(entries, torn): the JSON objects of a jsonl file, skipping lines that are not one (a crash or a full disk
    mid-append tears the last one), and how many were skipped. A missing file has no entries."""
    entries, torn = [], 0
    if not os.path.exists(path):
        return entries, torn
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if isinstance(entry, dict):
                    entries.append(entry)
                else:  # torn, or not one of our entries (a stray line of JSON)
                    torn += 1
    except OSError as e:
        raise WriteError(f"cannot read {path} ({e.strerror}): move it away to start a new log") from None
    return entries, torn


def remove_temp_files(directory):
    """Delete the .tmp files a killed atomic_write left in directory (a SIGKILL mid-save leaves a checkpoint-sized
    one). Only for a directory this process holds the lock of: another writer's temp file would be in use."""
    for path in glob.glob(os.path.join(glob.escape(directory), "*.tmp")):
        with suppress(OSError):
            os.remove(path)


def rewrite_jsonl(path, entries):
    """Replace a jsonl file with these entries, atomically: a kill leaves the old log, never an empty one."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
