"""The `qv` subcommands end to end, through a subprocess (one test also calls the entry point in-process), on tiny checkpoints."""

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvlib import cli
from qvlib.models import build_vit, set_fixed_head
from qvlib.quant import QuantSpec, fake_quant
from qvlib.vectors import WeightVector

QV = str(Path(sys.executable).parent / "qv")


def qv(*args, check=True):
    proc = subprocess.run([QV, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture
def ckpts(tmp_path, tiny_arch):
    model = build_vit(tiny_arch, 3, seed=0)
    set_fixed_head(model, "t", 0)
    ft = model.state_dict()
    qat = {k: v + 0.01 * torch.randn_like(v) if k.endswith(("qkv.weight", "fc1.weight")) else v for k, v in ft.items()}
    meta = {"arch": "tiny", "task": "t", "seed": 0, "quant": QuantSpec().to_json()}
    WeightVector(ft).save(tmp_path / "ft.safetensors", {**meta, "mode": "ft"})
    WeightVector(qat).save(tmp_path / "qat.safetensors", {**meta, "mode": "qat"})
    return tmp_path, ft, qat


def test_help_lists_subcommands():
    out = qv("--help").stdout
    for name in ("info", "extract", "patch", "quantize"):
        assert name in out


def test_extract_patch_quantize_info(ckpts):
    d, ft, qat = ckpts
    qv("extract", "--qat", d / "qat.safetensors", "--ft", d / "ft.safetensors", "-o", d / "rho.safetensors")
    rho = WeightVector.load(d / "rho.safetensors")
    assert len(rho) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    assert torch.equal(rho["blocks.0.attn.qkv.weight"], qat["blocks.0.attn.qkv.weight"] - ft["blocks.0.attn.qkv.weight"])
    assert torch.equal(rho["blocks.1.attn.proj.weight"], torch.zeros_like(ft["blocks.1.attn.proj.weight"]))
    assert rho.metadata["mode"] == "qv" and rho.metadata["task"] == "t"

    qv("patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--lambda", 1.0, "-o", d / "p.safetensors")
    patched = WeightVector.load(d / "p.safetensors")
    torch.testing.assert_close(patched["blocks.0.attn.qkv.weight"], qat["blocks.0.attn.qkv.weight"])
    assert torch.equal(patched["head.weight"], ft["head.weight"])

    qv("patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--vector", d / "rho.safetensors",
       "--lambda", 0.5, "--lambda", -0.5, "-o", d / "p0.safetensors")
    torch.testing.assert_close(WeightVector.load(d / "p0.safetensors")["blocks.0.mlp.fc1.weight"], ft["blocks.0.mlp.fc1.weight"])

    qv("quantize", d / "ft.safetensors", "--bits", 2, "--force", "-o", d / "q.safetensors")  # its metadata says 3 bits
    q = WeightVector.load(d / "q.safetensors")
    assert torch.equal(q["blocks.1.mlp.fc2.weight"], fake_quant(ft["blocks.1.mlp.fc2.weight"], QuantSpec(bits=2)))
    assert torch.equal(q["blocks.1.mlp.fc2.bias"], ft["blocks.1.mlp.fc2.bias"])
    assert torch.equal(q["patch_embed.proj.weight"], ft["patch_embed.proj.weight"])

    info = json.loads(qv("info", d / "rho.safetensors", "--json").stdout)
    assert info["tensors"] == 8 and info["quantized_tensors"] == 8
    assert info["norm_quantized"] == pytest.approx(rho.norm(), rel=1e-9)
    assert "meta.arch" in qv("info", d / "ft.safetensors").stdout


def test_bad_input_fails_clearly_and_writes_nothing(ckpts):
    d, ft, _ = ckpts
    other = {k: v for k, v in ft.items()}
    other["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    WeightVector(other).save(d / "other.safetensors", {"task": "t"})
    proc = qv("extract", "--qat", d / "other.safetensors", "--ft", d / "ft.safetensors", "-o", d / "bad.safetensors", check=False)
    assert proc.returncode == 2
    assert "blocks.0.attn.qkv.weight" in proc.stderr and "(5, 5)" in proc.stderr
    assert not (d / "bad.safetensors").exists()
    proc = qv("quantize", d / "ft.safetensors", "--bits", 9, "-o", d / "bad.safetensors", check=False)
    assert proc.returncode == 2 and "bits must be an integer in 2..8" in proc.stderr
    proc = qv("patch", "--receiver", d / "missing.safetensors", "--vector", d / "ft.safetensors", "-o", d / "bad.safetensors", check=False)
    assert proc.returncode == 2 and "missing.safetensors" in proc.stderr
    assert not (d / "bad.safetensors").exists()


def test_random_direction_control_keeps_per_tensor_norms(ckpts):
    d, _, _ = ckpts
    qv("extract", "--qat", d / "qat.safetensors", "--ft", d / "ft.safetensors", "-o", d / "rho.safetensors")
    qv("random-direction", d / "rho.safetensors", "--seed", 3, "-o", d / "rand.safetensors")
    rho, rand = WeightVector.load(d / "rho.safetensors"), WeightVector.load(d / "rand.safetensors")
    for name, t in rho.items():
        assert float(rand[name].double().norm()) == pytest.approx(float(t.double().norm()), rel=1e-6, abs=1e-12)
    assert rand.metadata["control"] == "random" and rand.metadata["random_seed"] == "3"
    assert abs(rand.cosine(rho)) < 0.5


def bad_files(d: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """An unreadable file of each kind users hand us, and the words the error must use."""
    data = good.read_bytes()
    files = {"truncated": (d / "truncated.safetensors", "truncated"), "text": (d / "notes.safetensors", "not in the safetensors format"),
             "pickle": (d / "model.pt", "pickled PyTorch checkpoint"), "empty": (d / "empty.safetensors", "empty")}
    files["truncated"][0].write_bytes(data[: len(data) // 2])
    files["text"][0].write_text("these are my notes, not a checkpoint\n")
    torch.save({"blocks.0.attn.qkv.weight": torch.ones(3, 3)}, files["pickle"][0])
    files["empty"][0].write_bytes(b"")
    return files


@pytest.mark.parametrize("kind", ["truncated", "text", "pickle", "empty"])
def test_unreadable_inputs_fail_in_one_line_and_write_nothing(ckpts, kind):
    d, _, _ = ckpts
    bad, words = bad_files(d, d / "ft.safetensors")[kind]
    out = d / "out.safetensors"
    commands = [
        ("info", bad),
        ("extract", "--qat", bad, "--ft", d / "ft.safetensors", "-o", out),
        ("extract", "--qat", d / "qat.safetensors", "--ft", bad, "-o", out),
        ("patch", "--receiver", bad, "--vector", d / "ft.safetensors", "-o", out),
        ("patch", "--receiver", d / "ft.safetensors", "--vector", bad, "-o", out),
        ("quantize", bad, "-o", out),
    ]
    # The first command runs as a real process (exit status, nothing but one line on stderr); the rest
    # call the same entry point in this process, which spares ~4 s of imports each: an exception that
    # main() does not turn into its one-line error still fails the test, by propagating.
    for i, args in enumerate(commands):
        if i == 0:
            proc = qv(*args, check=False)
            code, stderr = proc.returncode, proc.stderr
        else:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                code = cli.main([str(a) for a in args])
            stderr = err.getvalue()
        lines = stderr.strip().splitlines()
        assert code == 2, (args, stderr)
        assert len(lines) == 1 and str(bad) in lines[0] and words in lines[0], (args, stderr)
        assert "Traceback" not in stderr
        assert not out.exists() and not list(d.glob(".out.safetensors.*"))


def test_merge_then_patch(tmp_path):
    for name, values in (("a", [1.0, -2.0, 3.0]), ("b", [3.0, 2.0, -1.0])):
        WeightVector({"blocks.0.mlp.fc1.weight": torch.tensor([values])}).save(tmp_path / f"{name}.safetensors")
    WeightVector({"blocks.0.mlp.fc1.weight": torch.zeros(1, 3), "head.weight": torch.ones(2, 3)}).save(tmp_path / "r.safetensors")
    qv("merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--method", "mean", "-o", tmp_path / "m.safetensors")
    merged = WeightVector.load(tmp_path / "m.safetensors")
    assert merged["blocks.0.mlp.fc1.weight"].tolist() == [[2.0, 0.0, 1.0]] and json.loads(merged.metadata["merged"])["method"] == "mean"
    qv("patch", "--receiver", tmp_path / "r.safetensors", "--vector", tmp_path / "m.safetensors", "--lambda", 2.0, "-o", tmp_path / "p.safetensors")
    assert WeightVector.load(tmp_path / "p.safetensors")["blocks.0.mlp.fc1.weight"].tolist() == [[4.0, 0.0, 2.0]]
    qv("merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--exclude", "b", "-o", tmp_path / "loo.safetensors")
    loo = WeightVector.load(tmp_path / "loo.safetensors")
    assert loo["blocks.0.mlp.fc1.weight"].tolist() == [[1.0, -2.0, 3.0]] and json.loads(loo.metadata["merged"])["tasks"] == ["a"]
    proc = qv("merge", tmp_path / "a.safetensors", "--method", "mean", "--density", 0.5, "-o", tmp_path / "x.safetensors", check=False)
    assert proc.returncode == 2 and "takes no parameters" in proc.stderr and not (tmp_path / "x.safetensors").exists()


def test_choose_lambda_from_weights_and_from_noise(ckpts, tmp_path):
    d, ft, qat = ckpts
    qv("extract", "--qat", d / "qat.safetensors", "--ft", d / "ft.safetensors", "-o", d / "rho.safetensors")
    out = json.loads(qv("choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors",
                        "--bits", 2, "--force", "--lambdas", 0.0, 1.0, "--json").stdout)
    assert out["criterion"] == "weights" and set(out["scores"]) == {"0.0", "1.0"} and out["lambda"] in (0.0, 1.0)
    assert out["lambda"] == min((0.0, 1.0), key=lambda lam: (out["scores"][str(lam)], abs(lam - 1)))
    from helpers import mini_config

    cfg = mini_config(tmp_path / "c.yaml", pretrain=False)
    text = qv("choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--bits", 2, "--force",
              "--criterion", "outputs", "--config", cfg, "--arch", "tiny", "--images", 8).stdout
    assert text.count("lambda") == 7 and text.count("<- chosen") == 1
    proc = qv("choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "--criterion", "outputs",
              check=False)
    assert proc.returncode == 2 and "needs --config and --arch" in proc.stderr


# ---------------------------------------------------------------- issue 29: options from the input's metadata
@pytest.fixture
def two_bit(tmp_path, tiny_arch):
    """FT (metadata quant empty, as the workflow writes it) and QAT at 2 bits, group granularity, scope linear."""
    model = build_vit(tiny_arch, 3, seed=0)
    ft = model.state_dict()
    qat = {k: v + 0.01 * torch.randn_like(v) if k.endswith(("qkv.weight", "fc1.weight")) else v for k, v in ft.items()}
    spec = QuantSpec(bits=2, granularity="group", group_size=4)
    meta = {"arch": "tiny", "task": "t", "seed": 0, "scope": "linear"}
    WeightVector(ft).save(tmp_path / "ft.safetensors", {**meta, "mode": "ft", "quant": ""})
    WeightVector(qat).save(tmp_path / "qat.safetensors", {**meta, "mode": "qat", "quant": spec.to_json()})
    assert cli.main(["extract", "--qat", str(tmp_path / "qat.safetensors"), "--ft", str(tmp_path / "ft.safetensors"),
                     "-o", str(tmp_path / "rho.safetensors")]) == 0
    return tmp_path, ft, spec


def run_qv(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_quantize_takes_bits_and_blocks_from_the_metadata(two_bit, capsys):
    d, ft, spec = two_bit
    assert json.loads(WeightVector.load(d / "rho.safetensors").metadata["quant"]) == json.loads(spec.to_json())
    # patch passes the vector's quantizer on; quantize without --bits then uses it: 2 bits, groups of 4
    assert run_qv(capsys, "patch", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors", "-o", d / "p.safetensors")[0] == 0
    patched = WeightVector.load(d / "p.safetensors")
    assert QuantSpec.from_json(patched.metadata["quant"]) == spec
    assert run_qv(capsys, "quantize", d / "p.safetensors", "-o", d / "q.safetensors")[0] == 0
    q = WeightVector.load(d / "q.safetensors")
    name = "blocks.0.mlp.fc1.weight"
    assert torch.equal(q[name], fake_quant(patched[name], spec))
    assert len(torch.unique(q[name][0, :4])) <= 4  # 2 bits: at most 4 levels per group
    # the QAT checkpoint records it too
    assert run_qv(capsys, "quantize", d / "qat.safetensors", "--packed", "-o", d / "packed.safetensors")[0] == 0
    assert QuantSpec.from_json(WeightVector.load(d / "packed.safetensors").metadata["quant"]) == spec


def test_an_option_that_contradicts_the_metadata_is_an_error_unless_forced(two_bit, capsys):
    d, ft, spec = two_bit
    out = d / "q.safetensors"
    code, err = run_qv(capsys, "quantize", d / "qat.safetensors", "--bits", 3, "-o", out)
    assert code == 2 and not out.exists()
    assert err.strip() == (f"qv quantize: error: --bits 3 contradicts {d / 'qat.safetensors'}: its metadata records 2; "
                           "leave --bits out to use it, or pass --force to override it")
    code, err = run_qv(capsys, "quantize", d / "qat.safetensors", "--granularity", "channel", "-o", out)
    assert code == 2 and "--granularity channel contradicts" in err and "'group'" in err
    code, err = run_qv(capsys, "extract", "--qat", d / "qat.safetensors", "--ft", d / "ft.safetensors", "--scope", "all",
                       "-o", d / "rho2.safetensors")
    assert code == 2 and "--scope all contradicts" in err and "--force" in err
    # agreeing values pass; --force overrides: 3 bits per channel on a 2-bit file
    assert run_qv(capsys, "quantize", d / "qat.safetensors", "--bits", 2, "-o", out)[0] == 0
    assert run_qv(capsys, "quantize", d / "qat.safetensors", "--bits", 3, "--granularity", "channel", "--force",
                  "-o", d / "q3.safetensors")[0] == 0
    qat = WeightVector.load(d / "qat.safetensors")
    name = "blocks.1.attn.qkv.weight"
    assert torch.equal(WeightVector.load(d / "q3.safetensors")[name], fake_quant(qat[name], QuantSpec(bits=3)))


def test_where_the_metadata_says_nothing_the_defaults_apply(two_bit, capsys):
    d, ft, _ = two_bit  # the FT checkpoint records no quantizer (quant "")
    assert run_qv(capsys, "quantize", d / "ft.safetensors", "-o", d / "q.safetensors")[0] == 0
    name = "blocks.0.attn.proj.weight"
    assert torch.equal(WeightVector.load(d / "q.safetensors")[name], fake_quant(ft[name], QuantSpec()))
    assert run_qv(capsys, "quantize", d / "ft.safetensors", "--bits", 5, "-o", d / "q5.safetensors")[0] == 0


def test_inputs_that_disagree_must_be_settled_explicitly(two_bit, capsys):
    d, _, _ = two_bit
    rho = WeightVector.load(d / "rho.safetensors")
    rho.with_metadata({"quant": QuantSpec(bits=4).to_json()}).save(d / "rho4.safetensors")
    code, err = run_qv(capsys, "choose-lambda", "--receiver", d / "ft.safetensors", "--vector", d / "rho.safetensors",
                       d / "rho4.safetensors", "--lambdas", 1.0)
    assert code == 2 and "the inputs disagree on --bits" in err


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing, unshown = [], []
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
            if not (action.help or "").strip():
                missing.append(flag)
            optional = action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction)
            shown = cli.HelpFormatter("qv")._get_help_string(action)
            if optional and action.default is not None and action.default != [] and "default" not in shown:
                unshown.append(flag)
        help_text = command.format_help()
        if "-o OUTPUT" in help_text:
            assert "write" in help_text.split("-o OUTPUT, --output OUTPUT", 1)[1], f"{name}: -o does not say what is written"
    assert not missing, f"options without help: {missing}"
    assert not unshown, f"options whose default is not shown: {unshown}"
    assert "(default: 0)" in " ".join(sub.choices["random-direction"].format_help().split())


def test_a_command_builds_only_its_own_options_and_report_commands_parse_without_torch():
    full, only = cli.build_parser(), cli.build_parser(["merge"])
    (full_sub,) = [a for a in full._actions if isinstance(a, argparse._SubParsersAction)]
    (only_sub,) = [a for a in only._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(only_sub.choices) == list(full_sub.choices)  # every command is still named, with its help
    assert only_sub.choices["merge"].format_help() == full_sub.choices["merge"].format_help()
    assert [a.dest for a in only_sub.choices["tables"]._actions] == ["help"]
    argv = ["merge", "a.safetensors", "b.safetensors", "--method", "ties", "--density", "0.5", "-o", "m.safetensors"]
    assert only.parse_args(argv) == full.parse_args(argv)
    assert all(not c._actions[1:] for c in cli.build_parser([])._actions[-1].choices.values())
    for command in ("tables", "figures", "paper-tables", "readme", "--help"):
        code = (f"import sys\nfrom qvlib import cli\nassert cli.main([{command!r}, '--help']) == 0\n"
                "assert 'torch' not in sys.modules, 'parsing a report command imported torch'")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        usage = "usage: qv [-h] COMMAND" if command == "--help" else f"usage: qv {command}"
        assert proc.returncode == 0 and usage in proc.stdout, proc.stderr


def test_a_patched_checkpoint_records_its_vectors_quantizer_only_when_they_agree_and_it_has_none():
    from qvlib.checkpoints import with_vectors_quant

    w3, w4 = QuantSpec(bits=3).to_json(), QuantSpec(bits=4).to_json()
    out = WeightVector({"w": torch.ones(1)}, {"task": "r"})
    vecs = [WeightVector({"w": torch.ones(1)}, meta) for meta in ({"quant": w3}, {"quant": w3}, {}, {"quant": ""})]
    assert with_vectors_quant(out, vecs).metadata == {"task": "r", "quant": w3}
    assert with_vectors_quant(out, [*vecs, WeightVector({"w": torch.ones(1)}, {"quant": w4})]) is out  # they disagree
    assert with_vectors_quant(out, vecs[2:]) is out  # none records one
    mine = out.with_metadata({"quant": w4})
    assert with_vectors_quant(mine, vecs) is mine  # the checkpoint's own quantizer stays


def test_update_readme_replaces_the_blocks_it_has_markers_for(tmp_path):
    from qvlib.report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- readme:start -->old<!-- readme:end -->\n"
                      "<!-- readme-quantizers:start -->old<!-- readme-quantizers:end -->\n")
    (tmp_path / "summary.md").write_text("x <!-- readme:start -->NEW<!-- readme:end --> y")
    (tmp_path / "quantizers.md").write_text("<!-- readme-quantizers:start -->| a |<!-- readme-quantizers:end -->\n")
    done = update_readme(readme, summary=tmp_path / "summary.md", quantizers=tmp_path / "quantizers.md")
    assert done == [(tmp_path / "quantizers.md", "readme-quantizers"), (tmp_path / "summary.md", "readme")]
    text = readme.read_text()
    assert "NEW" in text and "| a |" in text and "old" not in text and text.startswith("top\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match=f"{bare} has none of the summary's blocks"):
        update_readme(bare, summary=tmp_path / "summary.md")
    assert bare.read_text() == "no markers\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "bare.md", "quantizers.md", "summary.md"]


def test_choose_lambda_names_store_vectors_by_their_task(ckpts, tmp_path):
    """Vectors of the workflow's store are all called vector.safetensors: the ranking names their tasks
    (their paths where two share a task)."""
    d, _, _ = ckpts
    qv("extract", "--qat", d / "qat.safetensors", "--ft", d / "ft.safetensors", "-o", d / "rho.safetensors")
    rho = WeightVector.load(d / "rho.safetensors")
    paths = []
    for folder, task in (("a", "shapes"), ("b", "dots"), ("c", "dots")):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "vector.safetensors")
        rho.with_metadata({"task": task}).save(paths[-1])
    text = qv("choose-lambda", "--receiver", d / "ft.safetensors", "--vector", *paths[:2], "--bits", 2, "--force",
              "--lambdas", 0.0, 1.0).stdout
    assert "shapes" in text and "dots" in text and "vector.safetensors" not in text
    text = qv("choose-lambda", "--receiver", d / "ft.safetensors", "--vector", *paths[1:], "--bits", 2, "--force",
              "--lambdas", 0.0, 1.0).stdout
    assert str(paths[1]) in text and str(paths[2]) in text
