"""A config from someone else: hostile strings never reach a shell, names cannot leave results/, a dry run
writes nothing, and what a job would fail on is refused at the dry run in one line naming the key."""

import re
import shlex

import pytest
import yaml

from helpers import QUANT, mini_config, planned, planned_jobs, snakemake
from qvlib.quant import VIT_BLOCK_LINEARS

pytestmark = pytest.mark.slow


def hostile(marker) -> str:
    """Shell that creates ``marker`` wherever a string is pasted into a command line unquoted or in quotes."""
    return f"'$(touch {marker})'`touch {marker}`\"; touch {marker}; \"$(touch {marker})"


def written_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".snakemake" not in p.parts)


@pytest.mark.parametrize("change,key", [
    ({"name": ".."}, "name"),
    ({"name": "."}, "name"),
    ({"name": "x;touch MARK"}, "name"),
    ({"tasks": {"shapes": {}, "a$(touch MARK)": {}}}, "a$(touch MARK)"),
    ({"archs": {"t;touch MARK": {"timm_name": "vit_tiny_patch16_224"}}}, "t;touch MARK"),
    ({"quant": {"bits": 2, "scale": "absmax;touch MARK"}}, "absmax;touch MARK"),
])
def test_hostile_names_are_refused_by_the_schema_before_anything_is_written(tmp_path, change, key):
    cfg = mini_config(tmp_path / "c.yaml", pretrain=False, **change)
    before = written_files(tmp_path)
    proc = snakemake(tmp_path, cfg, "--dry-run", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and key in text and "validat" in text.lower(), text[-2000:]
    assert written_files(tmp_path) == before and not (tmp_path / "MARK").exists()
    assert not (tmp_path.parent / "config.yaml").exists()


@pytest.mark.parametrize("change,line", [
    ({"tasks": {"shapes": {}, "nosuch": {}}}, "tasks.nosuch: unknown task"),
    ({"lambdas": [float("nan"), 1.0]}, "lambdas[0] is not a finite number"),
    ({"finetune": {"steps": 5, "lr": float("inf")}}, "finetune.lr is not a finite number"),
    ({"policy": {"pattern": "(["}}, "is not a valid regular expression"),
    ({"quant": {"bits": 2, "granularity": "group", "group_size": 7}}, "group_size 7 does not divide the input width 24"),
    ({"archs": {"tiny": {"timm_name": "resnet18"}}}, "archs.tiny.timm_name 'resnet18'"),
])
def test_what_a_job_would_fail_on_stops_the_dry_run_in_one_line(tmp_path, change, line):
    cfg = mini_config(tmp_path / "c.yaml", pretrain=False, **change)
    proc = snakemake(tmp_path, cfg, "--dry-run", check=False)
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("invalid config:")]
    assert proc.returncode != 0 and len(errors) == 1 and line in errors[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert str(cfg) in errors[0] and "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


def test_a_dry_run_writes_nothing(tmp_path):
    cfg = mini_config(tmp_path / "c.yaml", pretrain=False)
    before = written_files(tmp_path)
    jobs = planned_jobs(snakemake(tmp_path, cfg, "--dry-run"))
    assert jobs["finetune"] == 3 and written_files(tmp_path) == before


def test_a_hostile_pattern_and_data_root_run_without_reaching_a_shell(tmp_path):
    """The rule that pastes the policy's pattern into its command (extract_vector) runs for real on a
    pattern full of shell; then a per-arch train change replans exactly the arch's FT and QAT jobs."""
    marker = tmp_path / "MARKER"
    pattern = VIT_BLOCK_LINEARS + "|" + hostile(marker)
    cfg = mini_config(tmp_path / "c.yaml", name="hostile", tasks=("shapes", "dots"), pretrain=False,
                      policy={"pattern": pattern}, data_root=str(tmp_path / "data") + hostile(marker))
    target = planned(tmp_path, cfg, "vector", "vector", task="shapes", seed=0, quant=QUANT)
    proc = snakemake(tmp_path, cfg, target.relative_to(tmp_path), "--printshellcmds")
    assert target.exists() and not marker.exists()
    command = next(line for line in (proc.stdout + proc.stderr).splitlines() if " extract --qat " in line)
    words = shlex.split(command)
    assert words[words.index("--pattern") + 1] == pattern  # the shell handed qv the pattern verbatim
    from qvlib.vectors import WeightVector

    ft_file = planned(tmp_path, cfg, "ft", "ckpt", task="shapes", seed=0)
    ft = WeightVector.load(ft_file)
    assert ft.metadata["policy"] == pattern  # the job read it from the effective config
    assert set(WeightVector.load(target)) == {k for k in ft if re.search(VIT_BLOCK_LINEARS, k)}
    effective = yaml.safe_load((tmp_path / "results" / "hostile" / "config.yaml").read_text())
    assert effective["policy"]["pattern"] == pattern  # written when the jobs ran

    cache = planned(tmp_path, cfg, "cache", task="shapes")
    raw = yaml.safe_load(cfg.read_text())
    raw["archs"]["tiny"]["train"] = {"lr": 1.0e-3}
    cfg.write_text(yaml.safe_dump(raw))
    # the FT and QAT jobs read the arch's train settings: their keys (and the vector's, made from them) move;
    # the data's do not, and the old files stay where they were
    moved = planned(tmp_path, cfg, "vector", "vector", task="shapes", seed=0, quant=QUANT)
    assert moved != target and target.exists()
    assert planned(tmp_path, cfg, "ft", "ckpt", task="shapes", seed=0) != ft_file
    assert planned(tmp_path, cfg, "cache", task="shapes") == cache
    proc = snakemake(tmp_path, cfg, moved.relative_to(tmp_path), "--dry-run")
    assert planned_jobs(proc) == {"finetune": 1, "qat": 1, "extract_vector": 1, "total": 3}, proc.stdout[-3000:]
    assert "Missing output" in proc.stdout + proc.stderr and not marker.exists()
