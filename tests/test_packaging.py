"""pyproject.toml and environment.yml describe the same dependencies; the README's commands exist."""

import re
import subprocess
import sys
import tomllib

import yaml

from helpers import REPO

CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip_side = {_name(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda_side = {CONDA_NAMES.get(_name(d), _name(d)) for d in env["dependencies"] if isinstance(d, str)}
    conda_side -= {"python", "pip"}
    assert conda_side == pip_side
    assert project["scripts"]["qv"] == "qvlib.cli:main"


def test_readme_opens_with_the_two_commands_and_makefile_has_them():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make run" in first_block and "make test" in first_block
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run: setup$", makefile, re.M) and re.search(r"^test: setup$", makefile, re.M)
    assert "snakemake --cores" in makefile


def test_rule_environment_holds_the_runtime_dependencies_and_every_rule_uses_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_name(d) for d in project["dependencies"]} - {"snakemake"}
    env = yaml.safe_load((REPO / "workflow" / "envs" / "qvlib.yaml").read_text())
    assert {CONDA_NAMES.get(_name(d), _name(d)) for d in env["dependencies"]} - {"python"} == runtime
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, re.M)
        assert text.count('conda:\n        "../envs/qvlib.yaml"') == len(rules), smk.name
        assert "params:\n        h=" not in text  # params say what they hash


def test_config_readme_is_generated_from_the_schema():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "workflow" / "scripts" / "config_doc.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = (REPO / "config" / "README.md").read_text()
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    for key in schema["properties"]:
        assert f"| `{key}` |" in doc


def test_project_files_point_nowhere_outside_the_repository():
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "config").glob("*"), *(REPO / "workflow").rglob("*.smk"), REPO / "Snakefile"]:
        assert "../shared" not in path.read_text(), path


def test_cli_doc_python_example_runs(tmp_path, monkeypatch, tiny_arch):
    """docs/cli.md's Python block, as written, on tiny checkpoints of the file names it uses."""
    import torch

    from qvlib.models import build_vit
    from qvlib.vectors import WeightVector

    state = build_vit(tiny_arch, 3, seed=0).state_dict()
    WeightVector(state).save(tmp_path / "ft.safetensors")
    WeightVector(state).save(tmp_path / "receiver_ft.safetensors")
    WeightVector({k: v + 0.01 if k.endswith("fc1.weight") else v for k, v in state.items()}).save(tmp_path / "qat.safetensors")
    block = (REPO / "docs" / "cli.md").read_text().split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/cli.md", "exec"), {})
    out = WeightVector.load(tmp_path / "patched_w3.safetensors")
    assert torch.equal(out["head.weight"], state["head.weight"])
    assert out["blocks.0.mlp.fc1.weight"].unique().numel() <= 8 * out["blocks.0.mlp.fc1.weight"].shape[0]  # 3-bit codes per row


def test_schema_choices_are_the_registries():
    """A merge method or data-free criterion registered in qvlib is selectable in a config, and only those."""
    from qvlib.datafree import IMAGE_SOURCES, LAMBDA_CRITERIA
    from qvlib.merging import MERGE_METHODS

    props = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"]
    assert props["merged_donors"]["items"]["enum"] == list(MERGE_METHODS)
    pattern = props["datafree"]["properties"]["criteria"]["items"]["pattern"]  # criterion[@images][~tolerance]
    assert all(re.fullmatch(pattern, c) for c in LAMBDA_CRITERIA)
    assert set(re.findall(r"[a-z]+", pattern.split("@")[0])) == set(LAMBDA_CRITERIA)
    assert not re.fullmatch(pattern, "psychic") and not re.fullmatch(pattern, "weights@donor")
    sources = re.findall(r"\(([a-z|]+)\)", pattern.split("@", 1)[1])  # the first source, then each joined by +
    assert [group.split("|") for group in sources] == [list(IMAGE_SOURCES)] * 2
    assert re.fullmatch(pattern, "outputs@others+donor~0.05") and not re.fullmatch(pattern, "outputs@others+self")


def test_the_public_api_loads_lazily_and_light_commands_skip_timm():
    """`import qvlib` imports no torch; every name of __all__ resolves; qvlib.merge stays the function once
    the merging module is loaded; the report steps (qv tables, qv figures) never import timm or torchvision."""
    code = (
        "import sys, qvlib\n"
        "assert 'torch' not in sys.modules\n"
        "import qvlib.checkpoints, qvlib.report, qvlib.cli\n"
        "assert not {'timm', 'torchvision'} & set(sys.modules), 'a report step imported timm or torchvision'\n"
        "assert callable(qvlib.merge) and qvlib.merge.__module__ == 'qvlib.merging'\n"
        "missing = [n for n in qvlib.__all__ if getattr(qvlib, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert set(qvlib.__all__) <= set(dir(qvlib))\n"
        "try:\n    qvlib.no_such_name\nexcept AttributeError as err:\n    assert 'no_such_name' in str(err)\n"
        "else:\n    raise AssertionError('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
