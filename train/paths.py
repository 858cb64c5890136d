"""One path abstraction for run directories: local paths, or object storage (`gs://bucket/run`,
as on TPU pods) through fsspec (for gs://: gcsfs, the `gcs` extra; orbax and tensorstore write
their own parts of a step through their gs:// support). Local paths keep the plain `os` calls
(atomic renames, free-space checks).

    is_remote(p)  absolute(p)  join(p, *names)  isdir  isfile  exists  listdir  makedirs
    open_(p, mode)  size(p)  walk_files(root)  file_sizes(root)  read_blocks(p, size)
    replace(src, dst)  remove(p)  move(src, dst)  upload(local, remote)  glob_(pattern)

Object stores have no directories and no appends: `makedirs` is a no-op there, `isdir` means
"some object lies below", and writers that append (metrics.jsonl) rewrite the whole object
(train.metrics).
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path) -> bool:
    return bool(_SCHEME.match(os.fspath(path)))


_FS: dict = {}


def _fs(path):
    """(the fsspec file system of a remote path, the path without its scheme). One instance per
    scheme, its directory-listing cache off: a run directory is read while another process
    writes it (a resumed run, an eval sweep), and a cached listing would hide new steps."""
    scheme, rest = os.fspath(path).split("://", 1)
    if scheme not in _FS:
        if scheme == "gs":
            try:
                import gcsfs  # noqa: F401
            except ImportError:
                raise ImportError(f"{path}: gs:// run directories need gcsfs "
                                  "(pip install -e '.[gcs]')") from None
            # gcsfs warns on every new bucket handle when no default credentials exist (an
            # emulator, STORAGE_EMULATOR_HOST): its fallback is the right one
            logging.getLogger("gcsfs").setLevel(logging.ERROR)
        import fsspec
        _FS[scheme] = fsspec.filesystem(scheme, use_listings_cache=False)
    return _FS[scheme], rest


def absolute(path) -> str:
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path, *names) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return "/".join([path.rstrip("/"), *names])
    return os.path.join(path, *names)


def basename(path) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def dirname(path) -> str:
    path = os.fspath(path)
    return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def isdir(path) -> bool:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.isdir(p)
    return os.path.isdir(path)


def isfile(path) -> bool:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.isfile(p)
    return os.path.isfile(path)


def exists(path) -> bool:
    if is_remote(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def listdir(path) -> list[str]:
    if is_remote(path):
        fs, p = _fs(path)
        return [basename(e) for e in fs.ls(p, detail=False)]
    return os.listdir(path)


def makedirs(path) -> None:
    if not is_remote(path):        # an object store has no directories
        os.makedirs(path, exist_ok=True)


def open_(path, mode: str = "r", **kw):
    if is_remote(path):
        fs, p = _fs(path)
        return fs.open(p, mode, **kw)
    return open(path, mode, **kw)


def size(path) -> int:
    if is_remote(path):
        fs, p = _fs(path)
        return int(fs.size(p))
    return os.path.getsize(path)


def walk_files(root) -> list[str]:
    """Every file under `root`, as paths relative to it ('/'-separated)."""
    if is_remote(root):
        fs, base = _fs(root)
        base = base.rstrip("/")
        return sorted(p[len(base) + 1:] for p in fs.find(base))
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in files]
    return sorted(out)


def file_sizes(root) -> dict[str, int]:
    """{path relative to `root` ('/'-separated): size in bytes} of every file under it: on an
    object store one listing request (not one metadata request per object)."""
    if is_remote(root):
        fs, base = _fs(root)
        base = base.rstrip("/")
        return {p[len(base) + 1:]: int(info["size"])
                for p, info in fs.find(base, detail=True).items()}
    return {rel: os.path.getsize(os.path.join(root, rel)) for rel in walk_files(root)}


BLOCK = 64 << 20


def read_blocks(path, size: int):
    """The bytes of a file of known `size`, in blocks of at most 64 MiB: on an object store one
    ranged GET per block (no metadata request first)."""
    if is_remote(path):
        fs, p = _fs(path)
        for start in range(0, size, BLOCK):
            yield fs.cat_file(p, start=start, end=min(start + BLOCK, size))
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            yield block


def replace(src, dst) -> None:
    """Rename a file over `dst` (atomic on a local file system). On an object store an object
    appears whole when its upload completes, so writers there may write `dst` directly; this
    copies the bytes and deletes `src` (plain uploads: no server-side copy or move)."""
    if is_remote(src):
        fs, s = _fs(src)
        fs.pipe_file(_fs(dst)[1], fs.cat_file(s))
        fs.rm_file(s)
    else:
        os.replace(src, dst)


def remove(path) -> None:
    if is_remote(path):
        fs, p = _fs(path)
        fs.rm_file(p)
    else:
        os.remove(path)


def upload(local_path, remote_path) -> None:
    """Copy a local file to a remote path (one upload)."""
    fs, p = _fs(remote_path)
    with open(local_path, "rb") as f:
        fs.pipe_file(p, f.read())


def move(src, dst) -> None:
    """Move a file or a directory tree (remote: copy every object's bytes, then delete)."""
    if not is_remote(src):
        shutil.move(src, dst)
        return
    if isfile(src):
        replace(src, dst)
        return
    fs, rest = _fs(src)
    for rel in walk_files(src):
        fs.pipe_file(_fs(join(dst, rel))[1], fs.cat_file(f"{rest.rstrip('/')}/{rel}"))
    fs.rm(rest, recursive=True)


def glob_(pattern: str) -> list[str]:
    if is_remote(pattern):
        fs, rest = _fs(pattern)
        scheme = pattern.split("://", 1)[0]
        return sorted(f"{scheme}://{p}" for p in fs.glob(rest))
    return sorted(glob.glob(pattern))
