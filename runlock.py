"""
One run per run folder. A run holds a lock on its folder's .lock file for its whole life (process 0
under torchrun): a second run, or a --resume, on a folder in use is refused, naming the holder's
process id and host. The lock is flock(2)'s: the operating system releases it when the process
ends, however it ends, so a killed run leaves no stale lock. Where the file system has no locks
(ENOLCK, EOPNOTSUPP: some shared storage) a run says so and goes on without one.
"""
import datetime
import errno
import fcntl
import os
import socket
import sys
from contextlib import suppress


class Refused(Exception):
    """The folder cannot be made or taken: one line for the user."""


def new_folder(out):
    """Create the run folder out, or with out None a new one under runs/ named by the date and time
    (a second run in the same second, refused by os.mkdir, adds an x), and return it."""
    try:
        if out is not None:
            os.makedirs(out, exist_ok=True)
            return out
        os.makedirs("runs", exist_ok=True)
        out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        while True:
            try:
                os.mkdir(out)
                return out
            except FileExistsError:
                out += "x"
    except OSError as e:
        raise Refused(f"cannot create the run folder {out or 'runs'} ({e.strerror or e})") from None


_held = None  # the open .lock file: the lock lasts while it stays open (or the process lives)


def lock(out):
    """Take out/.lock for this run, before anything else in the folder is read or written."""
    global _held
    path, f = os.path.join(out, ".lock"), None
    try:
        f = open(path, "a+")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if f:
            f.close()
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
            print(f"tsalign: warning: {path}: this file system does not support locks "
                  f"({e.strerror}); nothing keeps a second run out of {out}", file=sys.stderr)
            return
        if not isinstance(e, BlockingIOError):
            raise Refused(f"cannot lock the run folder: {path} ({e.strerror or e})") from None
        with open(path) as f:
            who = f.read().strip() or "just starting"
        raise Refused(f"{out} is in use by another run ({who}); wait for it to end, "
                      "or choose another --out") from None
    with suppress(OSError):  # who holds it, for a second run to name (on a full disk: unnamed)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
    _held = f


def unlock():
    """Release the folder (at the end of main, so that a later run in this process may take it)."""
    global _held
    if _held is not None:
        _held.close()
        _held = None
