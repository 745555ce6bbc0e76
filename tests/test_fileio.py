"""qvlib.fileio: the one way qvlib writes a file (atomic_write and the text, JSON and Parquet writers on
it) and the checks a command makes of its outputs before any work."""

import json
import os
import stat
from pathlib import Path

import pytest

from qvlib.fileio import atomic_write, check_output, check_output_path, check_outputs, write_json, write_parquet, write_text


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.safetensors"

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed overwrite unchanged
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def _fail(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial")
    raise RuntimeError("disk full")


def test_failed_write_keeps_folders_it_did_not_make(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing_empty").mkdir()
    # "new" is made (the kernel needs it to resolve ".."); "existing_empty" was there before: it stays
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(Path("new/../existing_empty/x.txt"), _fail)
    assert sorted(os.listdir(tmp_path)) == ["existing_empty"] and os.listdir(tmp_path / "existing_empty") == []
    # folders made by a failing write go, innermost first; the ones that were there stay
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "existing_empty" / "a" / "b" / "x.txt", _fail)
    assert sorted(os.listdir(tmp_path)) == ["existing_empty"] and os.listdir(tmp_path / "existing_empty") == []
    # a folder it made that another writer has put a file into since is kept
    def other_writer(tmp):
        (tmp_path / "made" / "theirs.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "made" / "x.txt", other_writer)
    assert os.listdir(tmp_path / "made") == ["theirs.txt"]
    # a successful write through ".." keeps what it made
    atomic_write(Path("fresh/../existing_empty/y.txt"), lambda tmp: Path(tmp).write_text("y"))
    assert (tmp_path / "existing_empty" / "y.txt").read_text() == "y" and (tmp_path / "fresh").is_dir()


def test_a_folder_another_process_makes_first_is_not_removed(tmp_path, monkeypatch):
    target = tmp_path / "race" / "x.txt"
    real_mkdir = os.mkdir

    def beaten(path, *args, **kwargs):  # another job creates the folder between our check and our mkdir
        real_mkdir(path, *args, **kwargs)
        raise FileExistsError(17, "File exists", str(path))

    monkeypatch.setattr(os, "mkdir", beaten)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, _fail)
    assert os.listdir(tmp_path / "race") == []


def test_temporary_file_is_created_with_the_umask_applied_by_the_kernel(tmp_path, monkeypatch):
    import stat

    calls = []
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or 0o022)  # atomic_write must not touch the umask
    seen = {}

    def write(tmp):
        seen["name"] = os.path.basename(tmp)
        seen["mode"] = stat.S_IMODE(os.stat(tmp).st_mode)
        Path(tmp).write_text("x")

    path = atomic_write(tmp_path / "t.txt", write)
    assert calls == [] and seen["name"].startswith(f".t.txt.{os.getpid()}.") and seen["name"].endswith(".tmp")
    assert seen["mode"] == stat.S_IMODE(path.stat().st_mode)


def test_text_json_and_parquet_writers_write_exactly_these_bytes_and_leave_no_temporary(tmp_path):
    assert write_text(tmp_path / "a" / "t.md", "héllo\n") == tmp_path / "a" / "t.md"
    assert (tmp_path / "a" / "t.md").read_text() == "héllo\n"
    out = write_json(tmp_path / "m.json", {"b": [1, 2], "a": Path("x")})
    assert out.read_text() == '{\n "a": "x",\n "b": [\n  1,\n  2\n ]\n}'  # indent 1, sorted keys, str() for the rest
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"x": [1, 2], "y": ["a", None]})
    assert write_parquet(df, tmp_path / "t.parquet") == tmp_path / "t.parquet"
    assert pl.read_parquet(tmp_path / "t.parquet").equals(df)
    assert sorted(os.listdir(tmp_path)) == ["a", "m.json", "t.parquet"] and os.listdir(tmp_path / "a") == ["t.md"]
    # a replaced file gets the mode of a new file (the umask applied), not a temporary file's 0o600
    (tmp_path / "m.json").chmod(0o600)
    mode = stat.S_IMODE(write_text(tmp_path / "new.txt", "x").stat().st_mode)
    assert stat.S_IMODE(write_json(tmp_path / "m.json", []).stat().st_mode) == mode
    assert json.loads((tmp_path / "m.json").read_text()) == []


def test_an_output_must_name_a_writable_file_that_is_no_input(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError) as err:
        check_output_path(tmp_path / "dir")
    assert str(err.value) == f"cannot write {tmp_path / 'dir'}: it is a directory; give a file name"
    with pytest.raises(ValueError) as err:
        check_output_path(tmp_path / "file" / "deeper" / "x")
    assert str(err.value) == f"cannot write {tmp_path / 'file' / 'deeper' / 'x'}: {tmp_path / 'file'} is a file, not a directory"
    check_output_path(tmp_path / "new" / "folders" / "x")  # folders that can be made are fine
    check_output(tmp_path / "out", tmp_path / "file", None)  # an output that does not exist yet replaces nothing
    os.link(tmp_path / "file", tmp_path / "link")
    with pytest.raises(ValueError) as err:
        check_output(tmp_path / "link", None, tmp_path / "file")
    assert str(err.value) == (f"-o {tmp_path / 'link'} is the input {tmp_path / 'file'}: writing it would replace that "
                              "file; give another output path")
    check_outputs([tmp_path / "a", str(tmp_path / "b")], tmp_path / "file")
    with pytest.raises(ValueError) as err:
        check_outputs([tmp_path / "a", tmp_path / "dir" / ".." / "a"])
    assert str(err.value) == (f"{tmp_path / 'a'} and {tmp_path / 'dir' / '..' / 'a'} are the same output file: "
                              "give each output its own path")
    assert sorted(os.listdir(tmp_path)) == ["dir", "file", "link"]  # checking writes nothing
