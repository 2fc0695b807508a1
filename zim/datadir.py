"""Private files: the data directory, the token secret and the database.

Whoever can read the token secret can log in as every user, and whoever can
read the database reads every message; whoever can write either (or replace
it: a file in a directory others may write to) can do worse. So, as sshd does
with loose key files, zim refuses to start on a data directory, secret or
database that is owned by another user or that group or others may write,
saying what to run; it never loosens anything, and it creates what it creates
private (directory 0700, files 0600).

Two things are tightened rather than refused, because zim itself made them so
before: a data directory that others may read or enter (0755) becomes 0700,
and a database file (and its ``-wal``/``-shm``) that others may read (0644)
becomes 0600, each with a warning. A secret others may read is refused: it may
have leaked already, so the operator must decide (delete it to log every user
out, or chmod it).

Every check reads ``st_uid`` and ``st_mode`` (``lstat``/``fstat``), so it
holds for root too, whom the kernel's own permission checks let through.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

log = logging.getLogger("zim")

DIR_MODE = 0o700
FILE_MODE = 0o600
_LOOSE_WRITE = stat.S_IWGRP | stat.S_IWOTH
_LOOSE_ANY = 0o077


class UnsafeFile(RuntimeError):
    """A private file or directory that zim refuses to use (the message says why
    and what to run)."""


def ensure_private_dir(path: str, what: str = "data directory") -> None:
    """Create ``path`` (mode 0700, parents as needed) or check the existing one:
    a directory of ours that no one else may write. One that others may read
    or enter is tightened to 0700 (zim made it 0755 before). Raises UnsafeFile
    or RuntimeError."""
    try:
        os.makedirs(path, mode=DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RuntimeError(f"cannot create the {what} {path}: {exc}") from exc
    else:
        os.chmod(path, DIR_MODE)    # makedirs' mode is narrowed by umask only; be exact
        return
    try:
        info = os.stat(path)        # a symlink to a directory is fine: its target is checked
    except OSError as exc:
        raise RuntimeError(f"cannot use the {what} {path}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeError(f"the {what} {path} is not a directory")
    _check_owner(path, info, what)
    mode = stat.S_IMODE(info.st_mode)
    if mode & _LOOSE_WRITE:
        raise UnsafeFile(f"the {what} {path} is writable by {_who(mode & _LOOSE_WRITE)} (mode "
                         f"{mode:04o}): anyone could replace the token secret or the database. "
                         f"Run: chmod 700 {path}")
    if mode & _LOOSE_ANY:
        os.chmod(path, mode & ~_LOOSE_ANY)
        log.warning("the %s %s was open to %s (mode %04o); made it %04o", what, path,
                    _who(mode & _LOOSE_ANY), mode, mode & ~_LOOSE_ANY)


def check_private_file(path: str, what: str, info: os.stat_result | None = None,
                       tighten: bool = False) -> None:
    """Refuse a file that is not a regular file (a symlink included: pass the
    ``lstat`` or the ``fstat`` of an ``O_NOFOLLOW`` descriptor), is owned by
    another user, or that group or others may write. Group or others reading
    it is refused too, unless ``tighten``: then it is made 0600 with a warning
    (a database written by an older zim). Raises UnsafeFile."""
    if info is None:
        info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFile(f"the {what} {path} is a symbolic link; zim uses only a regular file there. "
                         f"Remove the link, and put the file itself in its place")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"the {what} {path} is not a regular file")
    _check_owner(path, info, what)
    mode = stat.S_IMODE(info.st_mode)
    if mode & _LOOSE_WRITE or (mode & _LOOSE_ANY and not tighten):
        raise UnsafeFile(f"the {what} {path} is open to {_who(mode & _LOOSE_ANY)} (mode {mode:04o}); "
                         f"zim refuses it, as sshd refuses a loose key file. If no one else can have "
                         f"read or changed it, run: chmod 600 {path}")
    if mode & _LOOSE_ANY:
        os.chmod(path, FILE_MODE)
        log.warning("the %s %s was readable by %s (mode %04o); made it 0600", what, path,
                    _who(mode & _LOOSE_ANY), mode)


def check_public_file(path: str, what: str, info: os.stat_result) -> None:
    """A public key may be read by anyone, but written only by us or root:
    whoever replaces it can mint tokens for every user."""
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafeFile(f"the {what} {path} belongs to uid {info.st_uid}, neither this process's "
                         f"uid {os.geteuid()} nor root: run: chown {os.geteuid()} {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & _LOOSE_WRITE:
        raise UnsafeFile(f"the {what} {path} may be written by others (mode {mode:04o}): anyone "
                         f"could put their own key there. Run: chmod go-w {path}")


def read_private_file(path: str, what: str, most: int) -> bytes:
    """Up to ``most`` bytes of ``path``, never read through a symlink, refusing a
    file that is not ours or is open to group or others (``check_private_file``):
    the token secret, the server API's key. RuntimeError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"the {what} {path} is a symbolic link; zim reads only a regular file "
                             f"there. Remove the link, and put the file itself in its place") from exc
        if exc.errno == errno.ENOENT:
            raise RuntimeError(f"the {what} {path} does not exist") from exc
        raise RuntimeError(f"cannot read the {what} {path}: {exc}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise RuntimeError(f"cannot read the {what} {path}: it is a directory")
        check_private_file(path, what, info)
        try:
            return os.read(fd, most)
        except OSError as exc:
            raise RuntimeError(f"cannot read the {what} {path}: {exc}") from exc
    finally:
        os.close(fd)


def check_private_files_in(directory: str, names: list[str], what: str) -> None:
    """``check_private_file(tighten=True)`` on each of ``names`` that exists."""
    for name in names:
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        check_private_file(path, what, info, tighten=True)


def check_file_directory(path: str, what: str) -> None:
    """Refuse a file whose directory group or others may write without the
    sticky bit: anyone could put another file in its place."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError as exc:
        raise RuntimeError(f"cannot use the {what} {path}: {exc}") from exc
    mode = stat.S_IMODE(info.st_mode)
    if mode & _LOOSE_WRITE and not mode & stat.S_ISVTX:
        raise UnsafeFile(f"the {what} {path} is in {directory}, which {_who(mode & _LOOSE_WRITE)} may "
                         f"write (mode {mode:04o}): anyone could replace the file. Move it, or run: "
                         f"chmod go-w {directory}")


def create_private_file(path: str) -> int:
    """A new file, mode 0600 whatever the umask, opened for writing; never
    through a symlink and never over anything already there (``O_EXCL`` and
    ``O_NOFOLLOW``): FileExistsError then."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owner(path: str, info: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if info.st_uid != me:
        raise UnsafeFile(f"the {what} {path} belongs to uid {info.st_uid}, not to this process's "
                         f"uid {me}: zim uses only its own. Run zim as its owner, or: "
                         f"chown {me} {path}")


def _who(bits: int) -> str:
    group, others = bits & 0o070, bits & 0o007
    if group and others:
        return "group and others"
    return "group" if group else "others"
