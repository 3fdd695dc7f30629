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
    check_output(out, "--out", "results", json_with("model", "results"), "results.json")  # never over another's file
    with replacing_dir(out_dir, "--out", "hf.py export", is_own, InteropError) as build:   # a directory, swapped
        ...                                            # in whole when the block succeeds; a kill leaves the old one

A failed write (disk full, quota, read-only filesystem, a file-size limit) raises WriteError, whose message
names the path, the space it needed and the space left; the temp file is gone and the old file untouched.
WriteError and LockError are cli.UserErrors: a script lets them rise to cli.run_main, which prints the line.
"""

import errno
import glob
import json
import os
import re
import secrets
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
    error = WriteError(f"cannot write {path}: {reason}")
    error.path, error.reason = path, reason  # (for a caller that names the file by where it will end up)
    return error

# -----------------------------------------------------------------------------
# one file: atomic writes, through a temp file of its own


def temp_path(path):
    """A fresh temp name beside path for one write of it: ckpt_0000012.pt -> ckpt_0000012.<pid>-<random>.pt.tmp.
    Its own per write, so two processes writing one file never share (and remove) each other's temp file; beside
    it, so the rename is atomic; ending in .pt.tmp / .tmp, so remove_temp_files and .gitignore know it."""
    root, ext = os.path.splitext(path)
    return f"{root}.{os.getpid()}-{secrets.token_hex(4)}{ext}.tmp"


TEMP = re.compile(r"(.*)\.\d+-[0-9a-f]{8}(\.[^.]*)?\.tmp|(.*)\.tmp")  # temp_path's names, and the older PATH.tmp


def temp_target(name):
    """The file a temp file name stands for (what temp_path or an older PATH.tmp was writing), or None."""
    m = TEMP.fullmatch(name)
    return None if m is None else m.group(3) if m.group(3) is not None else m.group(1) + (m.group(2) or "")


@contextmanager
def atomic_write(path, mode="wb", size_hint=None, encoding=None):
    """Write path through a temp file of its own (temp_path): flushed, fsynced and renamed over path only when the
    block succeeds.

    On any exception (a full disk, KeyboardInterrupt) the temp file is removed and path keeps its old content.
    A failed write becomes WriteError; other exceptions pass through unchanged. Two writers of one path each
    write their own temp file; the last rename wins, whole."""
    assert mode.startswith("w"), mode  # (a temp file always starts empty)
    while True:
        tmp = temp_path(path)
        try:  # "x": created here, never an existing file taken over
            f = open(tmp, "x" + mode[1:], encoding=encoding if "b" not in mode else None)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise write_error(path, e, size_hint) from None
    try:
        with f:
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


# -----------------------------------------------------------------------------
# outputs: a script writes over its own earlier output, never over what it did not make

RUN_MARK = re.compile(r"ckpt_\d+\.pt|log\.jsonl")  # a train.py --out_dir holds a checkpoint or a log ...
RUN_FILE = re.compile(rf"{RUN_MARK.pattern}|config\.json|\.lock")  # ... and these files of its own
PNG = b"\x89PNG\r\n\x1a\n"


def is_run_dir(path):
    """Whether path is a train.py --out_dir: a directory that holds a checkpoint or a log."""
    return os.path.isdir(path) and any(RUN_MARK.fullmatch(f) for f in os.listdir(path))


def head(path, n=1 << 16):
    """The first n bytes of a file, b"" where it cannot be read: what an output's kind is told by."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_png(path):
    """A test for check_output: the file is a PNG (a plot's)."""
    return head(path, len(PNG)) == PNG


def json_with(*keys):
    """A test for check_output: the file holds one JSON object with these keys (a results file's own)."""
    def test(path):
        if head(path, 1) != b"{":  # (a checkpoint is never read whole to find out)
            return False
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)
    return test


def check_output(path, what, kind, is_ours, example):
    """Make ready to write a script's output file path (given as the flag `what`, e.g. "--out"): one line, before
    any work, if that would replace what the script did not make. A directory ("dir/" too) needs a file named in it
    (example: the usual name); a train.py run's own files (checkpoints, log.jsonl, config.json, its lock) are never
    written; an existing file is replaced only when is_ours(path) says it is one of the script's own outputs (of
    this kind, told by its content: a PNG, a results JSON with its keys). Then its directory is made."""
    name, parent = os.path.basename(path), os.path.dirname(path) or "."
    if not name or os.path.isdir(path):
        raise WriteError(f"{what}={path} {'is' if os.path.isdir(path) else 'names'} a directory; name the {kind} "
                         f"file, e.g. {what}={os.path.join(path, example)}")
    if RUN_FILE.fullmatch(name) and is_run_dir(parent):
        raise WriteError(f"{what}={path} is a file of the train.py run in {parent}; choose another {what}")
    if os.path.lexists(path) and not (os.path.isfile(path) and is_ours(path)):
        raise WriteError(f"{what}={path} is not a {kind} file; it is not replaced: choose another {what}, or move "
                         "it away")
    make_dir(parent, what)
    return path


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
    """Delete the temp files killed atomic_writes left in directory (a SIGKILL mid-save leaves a checkpoint-sized
    one): temp_path's names and the older PATH.tmp. Only for a directory this process holds the lock of: another
    writer's temp file would be in use."""
    for path in glob.glob(os.path.join(glob.escape(directory), "*.tmp")):
        with suppress(OSError):
            os.remove(path)


def foreign_files(directory, is_own):
    """The files in directory that is_own(name) does not claim; a killed write's temp file counts as the file it
    was writing."""
    return sorted(f for f in os.listdir(directory) if not is_own(temp_target(f) or f))


@contextmanager
def replacing_dir(path, what, owner, is_own, error=WriteError):
    """A fresh directory beside path (path.partial) to build in. When the block succeeds it replaces path whole
    (rename the old away, rename the new in, remove the old); on any failure it is removed and path stays as it
    was: a kill leaves the old directory or the new one, never a mix. A lock beside path keeps a second build out
    (owner: who builds, for its message), and the next build finishes a swap a kill cut short.

    path, path.partial and path.old are replaced or removed whole, so each may hold only files is_own(name) claims:
    else `error` (the script's UserError) names the others and nothing is touched."""
    final = os.path.realpath(path)
    partial, old = final + ".partial", final + ".old"
    parent, base = os.path.split(final)
    make_dir(parent, what)

    def ours(d):  # whether d exists; raises unless it is a directory of nothing but is_own's files
        if not os.path.exists(d):
            return False
        if not os.path.isdir(d):
            raise WriteError(f"{d} is a file, not a directory; move it away or choose another {what}")
        foreign = foreign_files(d, is_own)
        if foreign:
            raise error(f"{d} holds files {owner} did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); move them away or choose another {what}")
        return True

    def restore():  # stopped between the two renames: the old directory is whole, put it back
        if not os.path.exists(final) and ours(old):
            os.rename(old, final)

    with FileLock(os.path.join(parent, f".{base}.lock"), f"{owner} run (building {base})"):
        restore()
        for d in (partial, old):
            if ours(d):
                shutil.rmtree(d)
        ours(final)
        make_dir(partial, what)
        try:
            yield partial
            if os.path.exists(final):
                os.rename(final, old)
            os.rename(partial, final)
        except BaseException as e:
            restore()
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(e, (OSError, WriteError)):
                raise WriteError(f"{write_error(final, e) if isinstance(e, OSError) else e}; "
                                 f"{path} is as it was") from None
            raise
        shutil.rmtree(old, ignore_errors=True)


def rewrite_jsonl(path, entries):
    """Replace a jsonl file with these entries, atomically: a kill leaves the old log, never an empty one."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
