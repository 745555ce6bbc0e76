"""Issue 31, the `qv` side: every bad argument or file is refused in one line (`qv <cmd>: error: ...`,
exit status 2) that names the file or tensor, and leaves no output behind. The commands run
in-process through ``cli.main`` on tensors of a few values each."""

import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qvlib import cli
from qvlib.checkpoints import merged_vector
from qvlib.datafree import choose_lambda
from qvlib.packing import PACKED_FORMAT
from qvlib.quant import QuantPolicy
from qvlib.vectors import WeightVector, atomic_write

QKV, FC1 = "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"
FLOAT32 = ("not float32; qv reads float32 files only: convert the file to float32 yourself "
           "(qv does not guess how it was rounded)")


def state(offset: float = 0.0) -> dict[str, torch.Tensor]:
    return {QKV: torch.arange(12.0).reshape(4, 3) / 10 - 0.5 + offset, FC1: torch.linspace(-1, 1, 6).reshape(2, 3) + offset,
            "norm.weight": torch.ones(3), "head.weight": torch.full((2, 3), 0.25)}


@pytest.fixture
def d(tmp_path):
    """ft, qat (metadata modes ft and qat) and their vector rho (mode qv)."""
    meta = {"arch": "tiny", "task": "t", "seed": 0}
    WeightVector(state()).save(tmp_path / "ft.safetensors", {**meta, "mode": "ft"})
    WeightVector(state(0.01)).save(tmp_path / "qat.safetensors", {**meta, "mode": "qat"})
    assert cli.main(["extract", "--qat", str(tmp_path / "qat.safetensors"), "--ft", str(tmp_path / "ft.safetensors"),
                     "-o", str(tmp_path / "rho.safetensors")]) == 0
    return tmp_path


def fails(capsys, args, message: str, output: Path | None = None, exact: bool = True) -> str:
    """Run ``qv args``: exit status 2, stderr exactly one line ``qv <cmd>: error: <message>`` (or one
    that starts so, ``exact`` False), nothing written to ``output`` (nor its temporary file)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1, lines
    expected = f"qv {args[0]}: error: {message}"
    assert lines[0] == expected if exact else lines[0].startswith(expected), lines[0]
    if output is not None:
        assert not output.exists() and not list(output.parent.glob(f".{output.name}.*")), list(output.parent.iterdir())
    return lines[0]


# ---------------------------------------------------------------- item 3: finite floats, positive counts
def test_non_finite_floats_and_non_positive_counts_are_refused_while_parsing(d, capsys):
    out = d / "out.safetensors"
    choose = ["choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--bits", 2]
    for bad in ("nan", "inf", "Infinity"):
        fails(capsys, [*choose, "--lambdas", 0.5, bad, "--json"],
              f"argument --lambdas: must be a finite number, got '{bad}' (see qv choose-lambda --help)")
    fails(capsys, [*choose, "--lambdas", "half"], "argument --lambdas: expected a number, got 'half' (see qv choose-lambda --help)")
    for bad in ("0", "-5", "2.5"):
        fails(capsys, [*choose, "--criterion", "outputs", "--images", bad],
              f"argument --images: must be a positive integer, got '{bad}' (see qv choose-lambda --help)")
    fails(capsys, ["patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--lambda", "nan", "-o", out],
          "argument --lambda: must be a finite number, got 'nan' (see qv patch --help)", out)
    fails(capsys, ["patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--lambda=-inf", "-o", out],
          "argument --lambda: must be a finite number, got '-inf' (see qv patch --help)", out)
    fails(capsys, ["quantize", d / "ft.safetensors", "--bits", 9, "-o", out],
          "argument --bits: bits must be an integer in 2..8, got '9' (see qv quantize --help)", out)
    fails(capsys, ["quantize", d / "ft.safetensors", "--granularity", "group", "--group-size", 0, "-o", out],
          "argument --group-size: must be a positive integer, got '0' (see qv quantize --help)", out)
    fails(capsys, ["merge", d / "rho.safetensors", "--method", "ties", "--density", "nan", "-o", out],
          "argument --density: must be a finite number, got 'nan' (see qv merge --help)", out)
    fails(capsys, ["merge", d / "rho.safetensors", "--method", "ties", "--density", 0, "-o", out],
          "argument --density: must be in (0, 1], got '0' (see qv merge --help)", out)
    fails(capsys, ["random-direction", d / "rho.safetensors", "--seed", -1, "-o", out],
          "argument --seed: must be an integer >= 0, got '-1' (see qv random-direction --help)", out)


def test_choose_lambda_json_is_valid_when_a_lambda_scores_nan(d, capsys):
    # lambda 1 pushes the weights past float32's range: its score is NaN, which never wins and prints as null
    WeightVector({QKV: torch.full((4, 3), 3e38)}, {"mode": "ft"}).save(d / "big.safetensors")
    WeightVector({QKV: torch.full((4, 3), 3e38)}, {"mode": "qv"}).save(d / "push.safetensors")
    capsys.readouterr()
    assert cli.main(["choose-lambda", "--receiver", str(d / "big.safetensors"), "--vector", str(d / "push.safetensors"),
                     "--bits", "2", "--lambdas", "1.0", "0.0", "--json"]) == 0

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    out = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert out["scores"]["1.0"] is None and out["scores"]["0.0"] == 0.0 and out["lambda"] == 0.0
    assert choose_lambda({0.5: float("nan"), 2.0: 0.3, 1.5: 0.3}) == 1.5
    with pytest.raises(ValueError, match="every lambda scored a non-finite value"):
        choose_lambda({0.5: float("nan")})
    with pytest.raises(ValueError, match="lambda nan is not a finite number"):
        choose_lambda({float("nan"): 0.0, 0.5: 1.0})


# ---------------------------------------------------------------- item 4: extract compares key sets both ways
def test_extract_refuses_a_tensor_in_only_one_checkpoint(d, capsys):
    out = d / "out.safetensors"
    short = {k: v for k, v in state().items() if k != FC1}
    WeightVector(short).save(d / "short.safetensors", {"mode": "ft"})
    fails(capsys, ["extract", "--qat", d / "qat.safetensors", "--ft", d / "short.safetensors", "-o", out],
          f"tensor {FC1!r} is in {d / 'qat.safetensors'} but not in {d / 'short.safetensors'}: give two checkpoints of the same model", out)
    WeightVector(short).save(d / "short-qat.safetensors", {"mode": "qat"})
    fails(capsys, ["extract", "--qat", d / "short-qat.safetensors", "--ft", d / "ft.safetensors", "-o", out],
          f"tensor {FC1!r} is in {d / 'ft.safetensors'} but not in {d / 'short-qat.safetensors'}: give two checkpoints of the same model", out)


# ---------------------------------------------------------------- item 5: roles, dtypes, -o an input, --exclude
def test_roles_recorded_in_the_metadata_are_checked(d, capsys):
    out = d / "out.safetensors"
    ft, qat, rho = d / "ft.safetensors", d / "qat.safetensors", d / "rho.safetensors"
    fails(capsys, ["patch", "--receiver", ft, "--vector", ft, "-o", out],
          f"{ft} is not a quantization vector: its metadata records mode 'ft'; give a vector written by qv extract or qv merge", out)
    not_a_model = f"{rho} is a quantization vector (metadata mode 'qv'), not a model checkpoint; give a fine-tuned checkpoint"
    fails(capsys, ["patch", "--receiver", rho, "--vector", rho, "-o", out], not_a_model, out)
    fails(capsys, ["quantize", rho, "-o", out], not_a_model, out)
    fails(capsys, ["quantize", rho, "--packed", "-o", out], not_a_model, out)
    fails(capsys, ["extract", "--qat", ft, "--ft", qat, "-o", out],
          f"{ft} is a 'ft' checkpoint (its metadata's mode), expected a 'qat' one: are two inputs swapped?", out)
    assert cli.main(["quantize", str(ft), "--packed", "-o", str(d / "packed.safetensors")]) == 0
    fails(capsys, ["patch", "--receiver", d / "packed.safetensors", "--vector", rho, "-o", out],
          f"{d / 'packed.safetensors'} is a packed checkpoint (qv quantize --packed): unpack it to float32 first (qv unpack)", out)
    # no recorded mode: a user's own export is taken for what it is given as
    WeightVector(state()).save(d / "mine.safetensors")
    assert cli.main(["patch", "--receiver", str(d / "mine.safetensors"), "--vector", str(rho), "-o", str(out)]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_files_other_than_float32_are_refused(d, capsys, dtype):
    out = d / "out.safetensors"
    name = str(dtype).removeprefix("torch.")
    copy = {k: v.to(dtype) if k == QKV else v for k, v in state().items()}
    WeightVector(copy).save(d / "ft16.safetensors", {"mode": "ft"})
    bad = f"{d / 'ft16.safetensors'}: tensor {QKV!r} is {name}, {FLOAT32}"
    fails(capsys, ["extract", "--qat", d / "qat.safetensors", "--ft", d / "ft16.safetensors", "-o", out], bad, out)
    fails(capsys, ["quantize", d / "ft16.safetensors", "-o", out], bad, out)
    fails(capsys, ["patch", "--receiver", d / "ft16.safetensors", "--vector", d / "rho.safetensors", "-o", out], bad, out)
    WeightVector({QKV: torch.zeros(4, 3, dtype=dtype)}, {"mode": "qv"}).save(d / "rho16.safetensors")
    fails(capsys, ["patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho16.safetensors", "-o", out],
          f"{d / 'rho16.safetensors'}: tensor {QKV!r} is {name}, {FLOAT32}", out)


def test_output_that_is_an_input_is_refused_and_the_input_kept(d, capsys, monkeypatch):
    ft = d / "ft.safetensors"
    before = ft.read_bytes()
    fails(capsys, ["extract", "--qat", d / "qat.safetensors", "--ft", ft, "-o", ft],
          f"-o {ft} is the input {ft}: writing it would replace that file; give another output path")
    monkeypatch.chdir(d)  # another spelling of the same file, and a link to it
    os.symlink("rho.safetensors", "link.safetensors")
    fails(capsys, ["patch", "--receiver", "ft.safetensors", "--vector", "rho.safetensors", "-o", "./ft.safetensors"],
          "-o ft.safetensors is the input ft.safetensors: writing it would replace that file; give another output path")
    fails(capsys, ["merge", "rho.safetensors", "-o", "link.safetensors"],
          "-o link.safetensors is the input rho.safetensors: writing it would replace that file; give another output path")
    assert ft.read_bytes() == before and WeightVector.load(d / "rho.safetensors").metadata["mode"] == "qv"


def test_merge_exclude_must_name_an_input_and_receiver_records_the_left_out_task(tmp_path, capsys):
    for task, value in (("a", 1.0), ("b", 3.0)):
        WeightVector({QKV: torch.full((4, 3), value)}, {"mode": "qv", "task": task}).save(tmp_path / f"{task}.safetensors")
    out = tmp_path / "m.safetensors"
    inputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    fails(capsys, ["merge", *inputs, "--exclude", "nosuch", "-o", out],
          "cannot exclude 'nosuch': no vector to merge is labelled so (labels: a, b); a vector's label is its metadata task, "
          "else its file name", out)
    assert cli.main(["merge", *map(str, inputs), "--receiver", "r", "-o", str(out)]) == 0
    merged = WeightVector.load(out)
    assert json.loads(merged.metadata["left_out"]) == ["r"] and json.loads(merged.metadata["merged"])["tasks"] == ["a", "b"]
    assert merged[QKV].tolist() == [[2.0] * 3] * 4
    loo = merged_vector({"a": WeightVector.load(inputs[0]), "b": WeightVector.load(inputs[1])}, "mean", receiver="b")
    assert json.loads(loo.metadata["merged"])["tasks"] == ["a"] and json.loads(loo.metadata["left_out"]) == ["b"]
    fails(capsys, ["merge", inputs[0], tmp_path / "a.safetensors", "-o", tmp_path / "twice.safetensors"],
          "two vectors are labelled 'a' (by their metadata task or file name): merge each once", tmp_path / "twice.safetensors")


# ---------------------------------------------------------------- item 6: one line instead of a traceback
def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): what a refused command must not change."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_output_paths_that_cannot_be_files(d, capsys):
    args = ["patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "-o"]
    (d / "folder").mkdir()
    before = listing(d)
    fails(capsys, [*args, d / "folder"], f"cannot write {d / 'folder'}: it is a directory; give a file name")
    assert list((d / "folder").iterdir()) == []
    fails(capsys, [*args, d / "ft.safetensors" / "x"],
          f"cannot write {d / 'ft.safetensors' / 'x'}: {d / 'ft.safetensors'} is a file, not a directory")
    fails(capsys, [*args, d / "ft.safetensors" / "deeper" / "x"],
          f"cannot write {d / 'ft.safetensors' / 'deeper' / 'x'}: {d / 'ft.safetensors'} is a file, not a directory")
    assert listing(d) == before  # no file, temporary file or folder left behind, the inputs unchanged


def test_long_commands_check_their_outputs_before_any_work(tmp_path, capsys, monkeypatch):
    import time

    import qvlib.pipeline as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the command started its work before checking -o")

    for name in ("finetune", "pretrain", "cache_splits", "evaluate_baselines", "evaluate_cells", "diagnostics"):
        monkeypatch.setattr(pipeline, name, no_work)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "dir"
    is_dir = f"cannot write {folder}: it is a directory; give a file name"
    missing = tmp_path / "no-such-config.yaml"  # never read: the output is refused first
    before = listing(tmp_path)
    start = time.monotonic()
    fails(capsys, ["finetune", "--config", missing, "--arch", "tiny", "--task", "t", "--mode", "ft", "-o", folder], is_dir)
    assert time.monotonic() - start < 5
    fails(capsys, ["pretrain", "--config", missing, "--arch", "tiny", "-o", folder], is_dir)
    fails(capsys, ["cache-splits", "--config", missing, "--arch", "tiny", "--task", "t", "--test", folder,
                   "--calib", tmp_path / "c.pt"], is_dir)
    same = tmp_path / "t.pt"
    fails(capsys, ["cache-splits", "--config", missing, "--arch", "tiny", "--task", "t", "--test", same, "--calib", same],
          f"{same} and {same} are the same output file: give each output its own path")
    under = tmp_path / "file" / "x.parquet"
    fails(capsys, ["evaluate-baselines", "--config", missing, "--arch", "tiny", "--task", "t", "--ft", "a", "--qat", "b",
                   "--test-cache", "c", "-o", under], f"cannot write {under}: {tmp_path / 'file'} is a file, not a directory")
    fails(capsys, ["evaluate-transfer", "--config", missing, "--arch", "tiny", "--receiver", "r", "--ft", "a",
                   "--donor", "x=v1", "--donor", "y=v2", "--test-cache", "c", "-o", tmp_path / "ok.parquet", "-o", folder],
          is_dir)
    fails(capsys, ["diagnostics", "--config", missing, "--arch", "tiny", "--ft", "a", "--vectors", "v",
                   "--out-norms", tmp_path / "n.parquet", "--out-cosine", folder], is_dir)
    fails(capsys, ["diagnostics", "--config", missing, "--arch", "tiny", "--ft", tmp_path / "file", "--vectors", "v",
                   "--out-norms", tmp_path / "n.parquet", "--out-cosine", tmp_path / "file"],
          f"-o {tmp_path / 'file'} is the input {tmp_path / 'file'}: writing it would replace that file; give another output path")
    ins = {name: tmp_path / "file" for name in ("baselines", "cells", "norms", "cosine")}
    outs = {f"out-{name}": tmp_path / f"{name}.parquet" for name in
            ("baselines", "transfer", "donor", "receiver", "specific", "summary-specific", "norms")}
    fails(capsys, ["tables", *(a for k, v in ins.items() for a in (f"--{k}", v)),
                   *(a for k, v in outs.items() for a in (f"--{k}", v)), "--out-cosine", folder], is_dir)
    fails(capsys, ["figures", "--arch", "tiny", *(a for k in ("baselines", "transfer", "summary-specific", "norms", "cosine")
                                                  for a in (f"--{k}", tmp_path / "file")),
                   "--out-gain", tmp_path / "g.png", "--out-cosine", tmp_path / "c.png", "--out-summary", folder], is_dir)
    fails(capsys, ["readme", "--summary", tmp_path / "file", "--readme", folder], is_dir)
    assert listing(tmp_path) == before


def test_diagnostics_help_names_the_leave_one_out_option(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["diagnostics"]
    merged = next(a for a in sub._actions if a.dest == "merged")
    assert "qv merge --receiver" in merged.help and "--exclude" not in merged.help


# ---------------------------------------------------------------- review of issue 31: roles first, overflow, packed quant
def test_extract_names_a_swapped_vector_before_comparing_tensors(d, capsys):
    out = d / "out.safetensors"
    ft, qat, rho = d / "ft.safetensors", d / "qat.safetensors", d / "rho.safetensors"
    not_a_model = "is a quantization vector (metadata mode 'qv'), not a model checkpoint; give a fine-tuned checkpoint"
    fails(capsys, ["extract", "--qat", rho, "--ft", ft, "-o", out], f"{rho} {not_a_model}", out)
    fails(capsys, ["extract", "--qat", qat, "--ft", rho, "-o", out], f"{rho} {not_a_model}", out)
    assert cli.main(["quantize", str(qat), "--packed", "-o", str(d / "packed.safetensors")]) == 0
    fails(capsys, ["extract", "--qat", d / "packed.safetensors", "--ft", ft, "-o", out],
          f"{d / 'packed.safetensors'} is a packed checkpoint (qv quantize --packed): unpack it to float32 first (qv unpack)", out)
    # roles before dtypes too: a bf16 vector given as --qat is named as a vector
    WeightVector({QKV: torch.zeros(4, 3, dtype=torch.bfloat16)}, {"mode": "qv"}).save(d / "rho16.safetensors")
    fails(capsys, ["extract", "--qat", d / "rho16.safetensors", "--ft", ft, "-o", out], f"{d / 'rho16.safetensors'} {not_a_model}", out)


def test_extract_refuses_a_tensor_of_another_shape(d, capsys):
    out = d / "out.safetensors"
    wide = {**state(0.01), QKV: torch.zeros(3, 4)}
    WeightVector(wide).save(d / "wide.safetensors", {"mode": "qat"})
    fails(capsys, ["extract", "--qat", d / "wide.safetensors", "--ft", d / "ft.safetensors", "-o", out],
          f"tensor {QKV!r} has shape (3, 4) in {d / 'wide.safetensors'} but (4, 3) in {d / 'ft.safetensors'}", out)


def test_lambda_beyond_float32_is_refused_and_an_overflow_is_named(d, capsys):
    out = d / "out.safetensors"
    ft, rho = d / "ft.safetensors", d / "rho.safetensors"
    for bad in ("1e39", "-1e39"):
        fails(capsys, ["patch", "--receiver", ft, "--vector", rho, f"--lambda={bad}", "-o", out],
              f"argument --lambda: must be within float32's range (|lambda| <= 3.4028235e+38), got '{bad}' (see qv patch --help)", out)
    fails(capsys, ["choose-lambda", "--receiver", ft, "--vector", rho, "--lambdas", "1", "1e39"],
          "argument --lambdas: must be within float32's range (|lambda| <= 3.4028235e+38), got '1e39' (see qv choose-lambda --help)")
    # a lambda float32 holds, whose product does not: the lambda, the vector and the tensor are named
    WeightVector({QKV: torch.full((4, 3), 1e38)}, {"mode": "qv"}).save(d / "big.safetensors")
    fails(capsys, ["patch", "--receiver", ft, "--vector", rho, "--vector", d / "big.safetensors",
                   "--lambda", "1", "--lambda", "1e1", "-o", out],
          f"lambda 10.0 times {d / 'big.safetensors'} gives non-finite values in tensor {QKV!r} of {ft} (beyond float32's "
          "range): use a smaller lambda", out)
    assert cli.main(["patch", "--receiver", str(ft), "--vector", str(rho), "--lambda", "3e38", "-o", str(out)]) == 0


@pytest.mark.parametrize("quant", ["[]", "{}", '"w3"', "3", '{"granularity": "channel"}'])
def test_packed_quant_metadata_must_be_a_spec_with_bits(d, capsys, quant):
    packed = d / "packed.safetensors"
    assert cli.main(["quantize", str(d / "ft.safetensors"), "--bits", "2", "--packed", "-o", str(packed)]) == 0
    good = WeightVector.load(packed)
    bad = d / "bad.safetensors"
    save_file(dict(good), str(bad), metadata={**good.metadata, "quant": quant})
    out = d / "out.safetensors"
    fails(capsys, ["unpack", bad, "-o", out], f"{bad}: metadata 'quant' must be a quantizer spec, a JSON object with "
          f"'bits', got {quant!r}; write it again with qv quantize --packed", out)


# ---------------------------------------------------------------- legitimate inputs still pass; roles in every command
def test_legitimate_inputs_are_accepted(d, capsys):
    ft, qat, rho = d / "ft.safetensors", d / "qat.safetensors", d / "rho.safetensors"

    def ok(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        assert code == 0, capsys.readouterr()

    ok("patch", "--receiver", qat, "--vector", rho, "-o", d / "p-qat.safetensors")  # a QAT checkpoint as receiver
    WeightVector({k: v * 2 for k, v in WeightVector.load(rho).items()}, {"mode": "qv", "task": "u"}).save(d / "rho2.safetensors")
    ok("merge", rho, d / "rho2.safetensors", "-o", d / "merged.safetensors")
    ok("patch", "--receiver", ft, "--vector", d / "merged.safetensors", "-o", d / "p-merged.safetensors")
    ok("random-direction", rho, "--seed", 3, "-o", d / "random.safetensors")
    ok("patch", "--receiver", ft, "--vector", d / "random.safetensors", "-o", d / "p-random.safetensors")
    ok("merge", d / "merged.safetensors", d / "random.safetensors", "-o", d / "merged2.safetensors")
    ok("choose-lambda", "--receiver", ft, "--vector", d / "merged.safetensors", "--bits", 2, "--lambdas", 0.5, 1)
    ok("quantize", ft, "--packed", "-o", d / "packed.safetensors")
    ok("unpack", d / "packed.safetensors", "-o", d / "unpacked.safetensors")
    ok("patch", "--receiver", d / "unpacked.safetensors", "--vector", rho, "-o", d / "p-unpacked.safetensors")
    merged, base = WeightVector.load(d / "p-merged.safetensors"), WeightVector.load(ft)
    torch.testing.assert_close(merged[QKV], base[QKV] + 1.5 * WeightVector.load(rho)[QKV])


def test_roles_are_checked_in_merge_random_direction_and_choose_lambda(d, capsys):
    out = d / "out.safetensors"
    ft, rho = d / "ft.safetensors", d / "rho.safetensors"
    not_a_vector = f"{ft} is not a quantization vector: its metadata records mode 'ft'; give a vector written by qv extract or qv merge"
    fails(capsys, ["merge", rho, ft, "-o", out], not_a_vector, out)
    fails(capsys, ["random-direction", ft, "-o", out], not_a_vector, out)
    fails(capsys, ["choose-lambda", "--receiver", ft, "--vector", ft, "--bits", 2], not_a_vector)
    fails(capsys, ["choose-lambda", "--receiver", rho, "--vector", rho, "--bits", 2],
          f"{rho} is a quantization vector (metadata mode 'qv'), not a model checkpoint; give a fine-tuned checkpoint")
    assert cli.main(["quantize", str(ft), "--packed", "-o", str(d / "packed.safetensors")]) == 0
    fails(capsys, ["merge", rho, d / "packed.safetensors", "-o", out],
          f"{d / 'packed.safetensors'} is a packed checkpoint (qv quantize --packed): unpack it to float32 first (qv unpack)", out)


def test_unwritable_output_names_the_output_not_the_temporary_file(d, capsys, monkeypatch):
    out = d / "new" / "sub" / "out.safetensors"

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", src)  # what a read-only folder gives the rename

    monkeypatch.setattr(os, "replace", refuse)
    fails(capsys, ["patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "-o", out],
          f"cannot write {out}: Permission denied", out)
    assert not (d / "new").exists()  # the folders made for the output went with it
    with pytest.raises(PermissionError, match=f"cannot write {out}: Permission denied"):
        atomic_write(out, lambda tmp: Path(tmp).write_text("x"))


def test_bad_regex_is_refused_by_the_policy(d, capsys):
    out = d / "out.safetensors"
    message = "the quantization pattern '([' is not a valid regular expression: unterminated character set at position 1"
    fails(capsys, ["extract", "--qat", d / "qat.safetensors", "--ft", d / "ft.safetensors", "--pattern", "([", "-o", out],
          message, out, exact=False)
    fails(capsys, ["quantize", d / "ft.safetensors", "--pattern", "([", "-o", out], message, out, exact=False)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        QuantPolicy(pattern="([")
    with pytest.raises(ValueError, match="must be a non-empty regular expression"):
        QuantPolicy(pattern="")


def test_malformed_config_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narchs: [unclosed\n")
    out = tmp_path / "out.safetensors"
    line = fails(capsys, ["finetune", "--config", bad, "--arch", "tiny", "--task", "t", "--mode", "ft", "-o", out],
                 f"{bad} is not valid YAML: ", out, exact=False)
    assert "line 3" in line and "Traceback" not in line


def test_shape_mismatch_in_choose_lambda(d, capsys):
    WeightVector({QKV: torch.zeros(5, 3)}, {"mode": "qv"}).save(d / "wide.safetensors")
    fails(capsys, ["choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "wide.safetensors", "--bits", 2],
          f"tensor {QKV!r} has shape (5, 3) in the vector but (4, 3) in the receiver: the vector was made for another model")
    WeightVector({"blocks.9.mlp.fc2.weight": torch.zeros(2, 3)}, {"mode": "qv"}).save(d / "alien.safetensors")
    fails(capsys, ["choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "alien.safetensors", "--bits", 2],
          "the vector holds tensor 'blocks.9.mlp.fc2.weight', which the receiver does not have: the vector was made for another model")


def test_broken_packed_files_name_the_file_and_the_key(d, capsys):
    packed = d / "packed.safetensors"
    assert cli.main(["quantize", str(d / "ft.safetensors"), "--bits", "2", "--packed", "-o", str(packed)]) == 0
    good = WeightVector.load(packed)
    tensors, meta = dict(good), dict(good.metadata)
    out = d / "out.safetensors"
    incomplete = "is an incomplete packed checkpoint"
    broken = {
        "noquant": ({k: v for k, v in meta.items() if k != "quant"}, tensors,
                    f"{incomplete}: its metadata has no 'quant'; write it again with qv quantize --packed"),
        "nocodes": (meta, {k: v for k, v in tensors.items() if k != QKV + ".qcodes"},
                    f"{incomplete}: its metadata lists {QKV!r} but the file has no tensor {QKV + '.qcodes'!r}; "
                    "write it again with qv quantize --packed"),
        "badjson": ({**meta, "packed": "{not json"}, tensors,
                    "metadata 'packed' of this packed checkpoint is not valid JSON (Expecting property name enclosed in "
                    "double quotes: line 1 column 2 (char 1)); write it again with qv quantize --packed"),
    }
    for kind, (m, t, words) in broken.items():
        path = d / f"{kind}.safetensors"
        save_file(t, str(path), metadata=m)
        message = f"{path} {words}" if words.startswith(incomplete) else f"{path}: {words}"
        fails(capsys, ["unpack", path, "-o", out], message, out)
        fails(capsys, ["info", path], message) if kind != "noquant" else None
    assert meta["format"] == PACKED_FORMAT


def test_non_finite_tensors_are_refused_naming_the_file(d, capsys):
    save_file({QKV: torch.full((4, 3), float("nan"))}, str(d / "nan.safetensors"), metadata={"mode": "qv"})
    out = d / "out.safetensors"
    fails(capsys, ["patch", "--receiver", d / "ft.safetensors", "--vector", d / "nan.safetensors", "-o", out],
          f"{d / 'nan.safetensors'}: tensor {QKV!r} holds non-finite values (NaN or inf); the file cannot be used "
          "(write it again from a finite model)", out)


# ---------------------------------------------------------------- item 9: stable metadata, the user's umask
def test_metadata_is_written_in_sorted_order_and_the_bytes_repeat(tmp_path):
    meta = {k: f"value {k}" for k in "qwertyuiopasdfgh"}
    blobs = set()
    for i in range(5):
        path = WeightVector(state()).save(tmp_path / f"v{i}.safetensors", meta)
        blobs.add(path.read_bytes())
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        assert list(header["__metadata__"]) == sorted(meta)
    assert len(blobs) == 1
    back = WeightVector.load(tmp_path / "v0.safetensors")
    assert back.metadata == meta and all(torch.equal(back[k], v) for k, v in state().items())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_created_with_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = WeightVector(state()).save(tmp_path / "v.safetensors")
        text = atomic_write(tmp_path / "t.md", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    for p in (path, text):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- item 10: nothing is unpickled
def test_every_torch_load_is_weights_only():
    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in [*(root / "qvlib").rglob("*.py"), *(root / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((path.relative_to(root), node.lineno, safe))
    assert ("bench/racing_lambda.py" in {str(p) for p, _, _ in calls})
    assert [c for c in calls if not c[2]] == []
