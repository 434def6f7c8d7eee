"""Path operations (DESIGN.md §14) compared with ``os`` on the same inputs.

Shared by ``test_pathops.py`` (every asyncio adapter) and the trio/anyio
scenarios. Two identical trees are made; every case runs once with ``os``
(or ``Path``) on tree A and once through a context on tree B, and the
outcomes are compared after the tree's root is replaced by ``ROOT`` in
results and in error file names: same value, or same exception type,
``errno``, ``strerror``, ``filename``, ``filename2``. Cases that change
the tree are followed by a comparison of both trees.
"""

import errno
import os
import stat as stat_mod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

LONG = "n" * 300  # longer than NAME_MAX: ENAMETOOLONG
DATA = bytes(range(256)) * 16  # 4 KiB
BIG = os.urandom(200 * 1024)


def make_tree(root: str) -> None:
    os.makedirs(root)
    Path(root, "file").write_bytes(DATA)
    Path(root, "empty").write_bytes(b"")
    Path(root, "big").write_bytes(BIG)
    os.mkdir(os.path.join(root, "dir"))
    Path(root, "dir", "inner").write_bytes(b"inner")
    os.mkdir(os.path.join(root, "dir2"))
    os.symlink("file", os.path.join(root, "link"))
    os.symlink("dir", os.path.join(root, "dirlink"))
    os.symlink("missing", os.path.join(root, "dangling"))
    os.symlink("loop2", os.path.join(root, "loop1"))
    os.symlink("loop1", os.path.join(root, "loop2"))


def listing(root: str) -> list[tuple[str, str, int, bytes]]:
    """The tree's names, kinds, permission bits and contents."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = stat_mod.S_IFMT(st.st_mode)
            content = b""
            if stat_mod.S_ISREG(st.st_mode):
                content = Path(p).read_bytes()
            elif stat_mod.S_ISLNK(st.st_mode):
                content = os.readlink(p).encode()
            out.append((os.path.relpath(p, root), oct(kind), st.st_mode & 0o7777, content))
    return sorted(out)


def _norm(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace(root, "ROOT")
    if isinstance(value, bytes):
        return value.replace(os.fsencode(root), b"ROOT")
    if isinstance(value, os.PathLike):
        return type(value)(_norm(os.fspath(value), root))
    return value


def outcome_of_exc(e: BaseException, root: str) -> tuple[Any, ...]:
    if isinstance(e, OSError):
        return (
            type(e),
            e.errno,
            e.strerror,
            _norm(e.filename, root),
            type(e.filename),
            _norm(e.filename2, root),
        )
    return (type(e), str(e))


# A case: (id, os side, context side, tree changed). Each side gets the
# root of its tree and a "kind" that turns a path into str, bytes or Path.
Side = Callable[[str], Any]
CtxSide = Callable[[Any, str], Awaitable[Any]]


def _fd_result(fd: int) -> tuple[int, int, int, bool]:
    # Compare what was opened, not the fd number.
    try:
        st = os.fstat(fd)
        return (st.st_mode, st.st_size, os.lseek(fd, 0, os.SEEK_CUR), os.get_inheritable(fd))
    finally:
        os.close(fd)


def path_kinds() -> list[Callable[[str], Any]]:
    return [str, os.fsencode, Path]


def cases() -> list[tuple[str, Side, CtxSide, bool]]:
    j = os.path.join
    out: list[tuple[str, Side, CtxSide, bool]] = []

    def add(name: str, os_side: Side, ctx_side: CtxSide, changes: bool = False) -> None:
        out.append((name, os_side, ctx_side, changes))

    for kind in path_kinds():
        k = kind.__name__

        # stat
        for target in ("file", "dir", "link", "dirlink", "dangling", "loop1", "missing",
                       "file/x", LONG, "big", "empty"):  # fmt: skip
            for follow in (True, False):
                add(
                    f"stat-{k}-{target[:8]}-{follow}",
                    lambda r, t=target, f=follow, kd=kind: os.stat(kd(j(r, t)), follow_symlinks=f),
                    lambda c, r, t=target, f=follow, kd=kind: c.stat(
                        kd(j(r, t)), follow_symlinks=f
                    ),
                )

        # open
        for target, flags in (
            ("file", os.O_RDONLY),
            ("file", os.O_RDWR | os.O_APPEND),
            ("missing", os.O_RDONLY),
            ("dir", os.O_WRONLY),
            ("dir", os.O_RDONLY | os.O_DIRECTORY),
            ("file", os.O_RDONLY | os.O_DIRECTORY),
            ("loop1", os.O_RDONLY),
            ("link", os.O_RDONLY | os.O_NOFOLLOW),
            ("file", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
            (LONG, os.O_RDONLY),
            ("missing/x", os.O_CREAT | os.O_WRONLY),
        ):
            add(
                f"open-{k}-{target[:8]}-{flags}",
                lambda r, t=target, fl=flags, kd=kind: _fd_result(os.open(kd(j(r, t)), fl, 0o640)),
                lambda c, r, t=target, fl=flags, kd=kind: _await_fd(c.open(kd(j(r, t)), fl, 0o640)),
            )
        add(
            f"open-create-{k}",
            lambda r, kd=kind: _fd_result(
                os.open(kd(j(r, "new")), os.O_CREAT | os.O_WRONLY, 0o604)
            ),
            lambda c, r, kd=kind: _await_fd(
                c.open(kd(j(r, "new")), os.O_CREAT | os.O_WRONLY, 0o604)
            ),
            True,
        )

        # read_file, as Path.read_bytes (open(..., "rb").read() for bytes)
        for target in ("file", "empty", "big", "link", "dir", "missing", "loop1", LONG,
                       "dangling", "file/x"):  # fmt: skip
            add(
                f"read_file-{k}-{target[:8]}",
                lambda r, t=target, kd=kind: _read_bytes(kd(j(r, t))),
                lambda c, r, t=target, kd=kind: c.read_file(kd(j(r, t))),
            )

        # write_file, as Path.write_bytes
        for target in ("new", "file", "dir", "missing/x", LONG, "link"):
            add(
                f"write_file-{k}-{target[:8]}",
                lambda r, t=target, kd=kind: _write_bytes(kd(j(r, t)), b"payload"),
                lambda c, r, t=target, kd=kind: c.write_file(kd(j(r, t)), b"payload"),
                True,
            )

        # unlink / rename / mkdir
        for target in ("file", "link", "dangling", "dir", "missing", LONG, "file/x"):
            add(
                f"unlink-{k}-{target[:8]}",
                lambda r, t=target, kd=kind: os.unlink(kd(j(r, t))),
                lambda c, r, t=target, kd=kind: c.unlink(kd(j(r, t))),
                True,
            )
        for src, dst in (
            ("file", "renamed"),
            ("file", "dir"),
            ("dir", "file"),
            ("dir", "dir2"),
            ("missing", "x"),
            ("file", "missing/x"),
            ("link", "link2"),
            ("file", LONG),
        ):
            add(
                f"rename-{k}-{src}-{dst[:8]}",
                lambda r, s=src, d=dst, kd=kind: os.rename(kd(j(r, s)), kd(j(r, d))),
                lambda c, r, s=src, d=dst, kd=kind: c.rename(kd(j(r, s)), kd(j(r, d))),
                True,
            )
        for target, mode in (("newdir", 0o750), ("file", 0o777), ("missing/x", 0o777),
                             (LONG, 0o777), ("newdir2", 0o700)):  # fmt: skip
            add(
                f"mkdir-{k}-{target[:8]}-{mode:o}",
                lambda r, t=target, m=mode, kd=kind: os.mkdir(kd(j(r, t)), m),
                lambda c, r, t=target, m=mode, kd=kind: c.mkdir(kd(j(r, t)), m),
                True,
            )

    # dir_fd (relative names)
    def with_dir(fn: Callable[[int], Any]) -> Callable[[str], Any]:
        def run(r: str) -> Any:
            d = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return fn(d)
            finally:
                os.close(d)

        return run

    def with_dir_ctx(fn: Callable[[int], Awaitable[Any]]) -> CtxSide:
        async def run(c: Any, r: str) -> Any:
            d = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return await fn(d)
            finally:
                os.close(d)

        return lambda c, r: run(c, r)

    for target in ("file", "link", "missing", "dir/inner"):
        for follow in (True, False):
            add(
                f"stat-dirfd-{target}-{follow}",
                lambda r, t=target, f=follow: with_dir(
                    lambda d: os.stat(t, dir_fd=d, follow_symlinks=f)
                )(r),
                lambda c, r, t=target, f=follow: with_dir_ctx(
                    lambda d: c.stat(t, dir_fd=d, follow_symlinks=f)
                )(c, r),
            )
    add(
        "open-dirfd",
        lambda r: with_dir(lambda d: _fd_result(os.open("file", os.O_RDONLY, dir_fd=d)))(r),
        lambda c, r: with_dir_ctx(lambda d: _await_fd(c.open("file", os.O_RDONLY, dir_fd=d)))(c, r),
    )
    add(
        "open-dirfd-missing",
        lambda r: with_dir(lambda d: os.open("missing", os.O_RDONLY, dir_fd=d))(r),
        lambda c, r: with_dir_ctx(lambda d: c.open("missing", os.O_RDONLY, dir_fd=d))(c, r),
    )
    add(
        "unlink-dirfd",
        lambda r: with_dir(lambda d: os.unlink("file", dir_fd=d))(r),
        lambda c, r: with_dir_ctx(lambda d: c.unlink("file", dir_fd=d))(c, r),
        True,
    )
    add(
        "mkdir-dirfd",
        lambda r: with_dir(lambda d: os.mkdir("made", 0o711, dir_fd=d))(r),
        lambda c, r: with_dir_ctx(lambda d: c.mkdir("made", 0o711, dir_fd=d))(c, r),
        True,
    )
    add(
        "rename-dirfds",
        lambda r: with_dir(lambda d: os.rename("file", "dir/moved", src_dir_fd=d, dst_dir_fd=d))(r),
        lambda c, r: with_dir_ctx(
            lambda d: c.rename("file", "dir/moved", src_dir_fd=d, dst_dir_fd=d)
        )(c, r),
        True,
    )
    add(
        "stat-baddirfd",
        lambda r: os.stat("file", dir_fd=987654),
        lambda c, r: c.stat("file", dir_fd=987654),
    )

    # fds: stat, ftruncate, fallocate, fadvise, close
    def with_file(fn: Callable[[int], Any]) -> Callable[[str], Any]:
        def run(r: str) -> Any:
            fd = os.open(os.path.join(r, "file"), os.O_RDWR)
            try:
                return fn(fd)
            finally:
                os.close(fd)

        return run

    def with_file_ctx(fn: Callable[[int], Awaitable[Any]]) -> CtxSide:
        async def run(c: Any, r: str) -> Any:
            fd = os.open(os.path.join(r, "file"), os.O_RDWR)
            try:
                return await fn(fd)
            finally:
                os.close(fd)

        return lambda c, r: run(c, r)

    add("stat-fd", with_file(os.stat), lambda c, r: with_file_ctx(c.stat)(c, r))
    add("stat-badfd", lambda r: os.stat(987654), lambda c, r: c.stat(987654))
    for length in (0, 100, 10000, -1):
        add(
            f"ftruncate-{length}",
            with_file(lambda fd, n=length: os.ftruncate(fd, n)),
            lambda c, r, n=length: with_file_ctx(lambda fd: c.ftruncate(fd, n))(c, r),
            True,
        )
    add("ftruncate-badfd", lambda r: os.ftruncate(987654, 0), lambda c, r: c.ftruncate(987654, 0))
    for offset, length in ((0, 65536), (8192, 100), (0, 0), (-1, 10)):
        add(
            f"fallocate-{offset}-{length}",
            with_file(lambda fd, o=offset, n=length: os.posix_fallocate(fd, o, n)),
            lambda c, r, o=offset, n=length: with_file_ctx(lambda fd: c.fallocate(fd, o, n))(c, r),
            True,
        )
    add(
        "fallocate-badfd",
        lambda r: os.posix_fallocate(987654, 0, 10),
        lambda c, r: c.fallocate(987654, 0, 10),
    )
    for advice in (os.POSIX_FADV_DONTNEED, os.POSIX_FADV_WILLNEED, 12345):
        add(
            f"fadvise-{advice}",
            with_file(lambda fd, a=advice: os.posix_fadvise(fd, 0, 0, a)),
            lambda c, r, a=advice: with_file_ctx(lambda fd: c.fadvise(fd, 0, 0, a))(c, r),
        )
    add(
        "fadvise-badfd",
        lambda r: os.posix_fadvise(987654, 0, 0, os.POSIX_FADV_NORMAL),
        lambda c, r: c.fadvise(987654, 0, 0, os.POSIX_FADV_NORMAL),
    )
    add(
        "close-fd",
        lambda r: os.close(os.open(os.path.join(r, "file"), os.O_RDONLY)),
        lambda c, r: c.close_fd(os.open(os.path.join(r, "file"), os.O_RDONLY)),
    )
    add("close-badfd", lambda r: os.close(987654), lambda c, r: c.close_fd(987654))
    return out


async def _await_fd(aw: Awaitable[int]) -> Any:
    return _fd_result(await aw)


def _read_bytes(p: Any) -> bytes:
    if isinstance(p, bytes):
        with open(p, "rb") as f:
            return f.read()
    return Path(p).read_bytes()


def _write_bytes(p: Any, data: bytes) -> int:
    if isinstance(p, bytes):
        with open(p, "wb") as f:
            return f.write(data)
    return Path(p).write_bytes(data)


def os_outcome(fn: Side, root: str) -> Any:
    try:
        return ("ok", _norm(fn(root), root))
    except Exception as e:
        return ("err", outcome_of_exc(e, root))


async def ctx_outcome(ctx: Any, fn: CtxSide, root: str) -> Any:
    try:
        return ("ok", _norm(await fn(ctx, root), root))
    except Exception as e:
        return ("err", outcome_of_exc(e, root))


async def compare_all(ctx: Any, base: str) -> int:
    """Runs every case; returns how many ran. Raises AssertionError on the
    first difference."""
    n = 0
    for i, (name, os_side, ctx_side, changes) in enumerate(cases()):
        # Cases that change nothing run on the same tree (stat results
        # include inode numbers and times); the others on twin trees.
        root_a = os.path.join(base, f"a{i}")
        root_b = os.path.join(base, f"b{i}") if changes else root_a
        make_tree(root_a)
        if changes:
            make_tree(root_b)
        expected = os_outcome(os_side, root_a)
        got = await ctx_outcome(ctx, ctx_side, root_b)
        assert got == expected, (name, got, expected)
        if changes:
            assert listing(root_b) == listing(root_a), name
        n += 1
    return n


#: The permission-denied comparison, run as an unprivileged user in a child
#: process (the suite runs as root, for whom nothing is denied).
PERMISSION_SCRIPT = r"""
import asyncio, os, sys, importlib
root, mod = sys.argv[1], sys.argv[2]
m = importlib.import_module(mod)
# Everything (modules, the context, its threads) set up before dropping
# privileges: the interpreter's own files are readable by root only.
loop = asyncio.new_event_loop()
ctx = m.AsyncioContext(loop=loop)
loop.run_until_complete(ctx.stat(root))
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
j = os.path.join
S, RO, RD = j(root, "secret"), j(root, "ro"), j(root, "rodir")
checks = [
    ("read_file", lambda: open(S, "rb").read(), lambda c: c.read_file(S)),
    ("open", lambda: os.open(S, os.O_RDONLY), lambda c: c.open(S)),
    ("open-w", lambda: os.open(RO, os.O_WRONLY), lambda c: c.open(RO, os.O_WRONLY)),
    ("stat-in-closed-dir", lambda: os.stat(j(root, "closed", "x")),
     lambda c: c.stat(j(root, "closed", "x"))),
    ("unlink", lambda: os.unlink(j(RD, "f")), lambda c: c.unlink(j(RD, "f"))),
    ("mkdir", lambda: os.mkdir(j(RD, "d")), lambda c: c.mkdir(j(RD, "d"))),
    ("rename", lambda: os.rename(j(RD, "f"), j(RD, "g")),
     lambda c: c.rename(j(RD, "f"), j(RD, "g"))),
    ("write_file", lambda: open(RO, "wb").write(b"x"), lambda c: c.write_file(RO, b"x")),
]
def outcome(e):
    return (type(e).__name__, e.errno, e.strerror, e.filename, e.filename2)
async def main():
    bad = []
    for name, sync, aio in checks:
        try:
            sync(); exp = "no error"
        except OSError as e:
            exp = outcome(e)
        try:
            await aio(ctx); got = "no error"
        except OSError as e:
            got = outcome(e)
        if exp != got or exp == "no error":
            bad.append((name, exp, got))
    ctx.close()
    print(repr(bad))
loop.run_until_complete(main())
"""


def make_permission_tree(root: str) -> None:
    os.makedirs(root)
    os.chmod(root, 0o755)
    Path(root, "secret").write_bytes(b"s")
    os.chmod(os.path.join(root, "secret"), 0o000)
    Path(root, "ro").write_bytes(b"r")
    os.chmod(os.path.join(root, "ro"), 0o444)
    os.mkdir(os.path.join(root, "closed"), 0o700)
    os.mkdir(os.path.join(root, "rodir"))
    Path(root, "rodir", "f").write_bytes(b"f")
    os.chmod(os.path.join(root, "rodir"), 0o555)


__all__ = [
    "BIG",
    "DATA",
    "LONG",
    "PERMISSION_SCRIPT",
    "compare_all",
    "errno",
    "make_permission_tree",
    "make_tree",
]
