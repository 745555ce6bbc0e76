"""Writing output files: every file qvlib writes goes through :func:`atomic_write` (a temporary file
beside the target, renamed into place), and a command checks its outputs before any work
(:func:`check_output`, :func:`check_outputs`). Text, JSON and Parquet writers are here too, so that
each kind of file is written one way. Nothing here imports torch or polars: a Parquet frame is
written by its own ``write_parquet``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Iterable


def check_output_path(path: str | os.PathLike) -> None:
    """An output path must name a file, in a folder or where a folder can be made (a ValueError)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a directory")
            return


def _about_output(filename, tmp: str | None, path: Path) -> bool:
    """Is an OSError about the temporary file or the folders of ``path`` (not an input ``write`` reads)?"""
    return filename is None or str(filename) == str(tmp) or Path(filename) in (path, *path.parents)


def _make_folders(folder: Path, made: list[Path]) -> None:
    """Create ``folder`` and its missing parents one at a time, outermost first, appending to ``made``
    each one this call created (a folder that already exists, or that another process creates first,
    is not ours), so that ``made`` is right even when a later mkdir fails."""
    for parent in (*reversed(folder.parents), folder):
        if parent.is_dir():
            continue
        try:
            os.mkdir(parent)
        except FileExistsError:
            continue
        made.append(parent)


def _remove_folders(made: list[Path]) -> None:
    """Remove the folders ``_make_folders`` created, innermost first, each only while it is empty."""
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (another writer uses it) or gone: keep it and its parents
            break


def _create_temporary(path: Path) -> str:
    """A new empty file beside ``path``, created by the kernel with mode 0o666 less the umask (and any
    default ACL of the folder), with a name no other process or thread uses."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the permissions of any new file (``0o666`` less the umask, as the kernel applies it
    when the temporary file is created; the umask is never read), not ``mkstemp``'s ``0o600``, even
    when ``write`` replaces the temporary file with one of its own. If anything fails, the temporary file and the folders this call
    made for it (only those, only while empty) are removed and ``path`` is left untouched; an
    ``OSError`` about the temporary file is raised about ``path``.
    """
    path = Path(path)
    check_output_path(path)
    made: list[Path] = []
    tmp = None
    try:
        for attempt in range(3):  # a concurrent failing writer may remove a folder it made before our file is in it
            _make_folders(path.parent, made)
            try:
                tmp = _create_temporary(path)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the kernel gave a new file here (the umask applied)
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file (safetensors' save_file
            os.chmod(tmp, mode)                         # writes its own 0o600 temporary and renames it over ours)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        _remove_folders(made)
        if isinstance(err, OSError) and err.strerror and _about_output(err.filename, tmp, path):
            raise OSError(err.errno or errno.EIO, f"cannot write {path}: {err.strerror}") from None
        raise
    return path



def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as JSON (indent 1, sorted keys, anything else as its str) atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=str)

    return atomic_write(path, write)


def write_parquet(df, output: str | os.PathLike) -> Path:
    """Write a polars DataFrame as Parquet atomically."""
    return atomic_write(output, lambda tmp: df.write_parquet(tmp))


def check_output(output: Path, *inputs: Path | None) -> None:
    """Before any work: ``-o`` must name a file that can be written and must not be one of the
    command's inputs (writing it would replace that input)."""
    check_output_path(output)
    for path in inputs:
        if path is not None and output.exists() and path.exists() and os.path.samefile(output, path):
            raise ValueError(f"-o {output} is the input {path}: writing it would replace that file; give another output path")


def check_outputs(outputs: Iterable, *inputs: Path | None) -> None:
    """:func:`check_output` for each of a command's outputs, which must also be different files."""
    seen: dict[str, Path] = {}
    for output in outputs:
        output = Path(output)
        check_output(output, *inputs)
        key = os.path.realpath(output)
        if key in seen:
            raise ValueError(f"{seen[key]} and {output} are the same output file: give each output its own path")
        seen[key] = output
