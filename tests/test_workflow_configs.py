"""The workflow on configs of their own: the paper grid's DAG, shared caches, schema errors, the embedded
default changed on the command line, and the authors' scope-all protocol end to end."""

import re

import polars as pl
import pytest
import yaml

from helpers import QUANT, REPO, mini_config, planned_jobs, snakemake, stored
from qvlib.vectors import WeightVector

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config", ["paper.yaml", "paper-text.yaml"])
def test_paper_config_dag(tmp_path, config):
    jobs = planned_jobs(snakemake(tmp_path, REPO / "config" / config, "--dry-run"))
    seeds, archs, tasks = 1, 4, 22  # the authors' single seed, 2038
    assert jobs["finetune"] == jobs["qat"] == seeds * archs * tasks
    assert jobs["transfer_cell"] == seeds * archs * tasks * (tasks + 1)  # + each receiver's leave-one-out merged donor
    assert jobs["merge_leave_one_out"] == seeds * archs * tasks
    assert jobs["baselines"] == jobs["extract_vector"] == seeds * archs * tasks
    assert jobs["cache_splits"] == tasks  # the four archs read 224 px bicubic crop 0.9 images: one cache per task
    assert jobs["tables"] == jobs["figures"] == jobs["paper_tables"] == archs and jobs["diagnostics"] == seeds * archs
    assert "pretrain" not in jobs


def test_paper_configs_differ_only_in_the_protocol_the_text_and_the_code_disagree_on():
    code = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    text = yaml.safe_load((REPO / "config" / "paper-text.yaml").read_text())
    assert code.pop("policy") == {"scope": "all"} and "policy" not in text
    assert code["finetune"].pop("augment") is True and "augment" not in text["finetune"]
    assert (code.pop("name"), text.pop("name")) == ("paper", "paper-text")
    assert code == text
    assert code["seeds"] == [2038] and code["finetune"]["precision"] == code["evaluate"]["precision"] == "fp32"
    assert all(t["source"]["kind"] == "hf" for t in code["tasks"].values())  # the authors' Hugging Face ids


def test_archs_share_caches_only_where_their_pixels_agree(tmp_path):
    """Two archs at the same input size share a task's cache; one at another size gets its own."""
    cfg = yaml.safe_load(mini_config(tmp_path / "c.yaml", pretrain=False).read_text())
    tiny = cfg["archs"]["tiny"]
    cfg["archs"]["wide"] = {**tiny, "overrides": {**tiny["overrides"], "embed_dim": 2 * tiny["overrides"]["embed_dim"]}}
    cfg["archs"]["big"] = {**tiny, "overrides": {**tiny["overrides"], "img_size": 2 * tiny["overrides"]["img_size"]}}
    path = tmp_path / "archs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, path, "--dry-run")
    jobs = planned_jobs(proc)
    tasks = len(cfg["tasks"])
    assert jobs["cache_splits"] == 2 * tasks and jobs["baselines"] == 3 * tasks
    folders = set(re.findall(r"results/store/cache/([^/\s]+)/", proc.stdout))
    assert len(folders) == 2, folders


@pytest.mark.parametrize("change,message", [
    ({"quant": {"bits": 9, "granularity": "channel"}}, "9"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"finetune": {"steps": 10, "momentum": 0.9}}, "momentum"),
])
def test_schema_errors_stop_before_any_job(tmp_path, change, message):
    cfg = mini_config(tmp_path / "bad.yaml", **change)
    proc = snakemake(tmp_path, cfg, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert message in text and "validat" in text.lower()
    assert not (tmp_path / "results" / "mini" / "tiny").exists() and not (tmp_path / "results" / "store").exists()


def test_config_on_the_command_line_changes_the_embedded_default(tmp_path):
    """`snakemake --config 'seeds=[0,1]' reuse_backbones=null` (no --configfile) runs the default config
    with two seeds, pretraining their backbones (null arrives as a string and means no folder). The dry
    run writes nothing; the effective config the jobs read is written when jobs start (here --touch)."""
    import shutil
    import subprocess

    from helpers import BIN, env

    shutil.copytree(REPO / "config", tmp_path / "config")

    def run(*extra):
        proc = subprocess.run([str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                               "--cores", "1", *extra, "--config", "seeds=[0,1]", "reuse_backbones=null"],
                              capture_output=True, text=True, env=env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    jobs = planned_jobs(run("--dry-run"))
    tasks = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["tasks"]
    assert jobs["pretrain"] == 2 and jobs["finetune"] == jobs["qat"] == 2 * len(tasks)
    assert not (tmp_path / "results").exists()
    run("--touch")
    effective = yaml.safe_load((tmp_path / "results" / "default" / "config.yaml").read_text())
    assert effective["seeds"] == [0, 1] and effective["reuse_backbones"] is None


def test_scope_all_end_to_end_vectors_hold_every_non_head_tensor(tmp_path):
    """The authors' protocol on the miniature: every parameter trains, vectors carry all but the head,
    cells patch them (quantizing only the block linears) on the receiver's own head."""
    from test_evaluate import reference_correct

    from qvlib.data.cache import read_split_cache
    from qvlib.quant import QuantSpec

    cfg = mini_config(tmp_path / "all.yaml", name="all", tasks=("shapes", "dots"), pretrain=False,
                      policy={"scope": "all"}, merged_donors=[], datafree={"criteria": ["outputs"], "noise_images": 8})
    snakemake(tmp_path, cfg)
    at = dict(seed=0, quant=QUANT)
    ft = WeightVector.load(stored(tmp_path, "all", "ft", "ckpt", task="shapes", seed=0))
    rho = WeightVector.load(stored(tmp_path, "all", "vector", "vector", task="dots", **at))
    assert set(rho) == {k for k in ft if not k.startswith("head.")} and rho.metadata["scope"] == "all"
    assert float(rho["norm.weight"].abs().sum()) > 0 and float(rho["pos_embed"].abs().sum()) > 0
    qat = WeightVector.load(stored(tmp_path, "all", "qat", "ckpt", task="shapes", **at))
    assert not __import__("torch").equal(qat["head.weight"], ft["head.weight"])  # the head trains too
    cell = pl.read_parquet(stored(tmp_path, "all", "cell", "table", receiver="shapes", donor="dots", **at))
    images, labels, _ = read_split_cache(stored(tmp_path, "all", "cache", "test", task="shapes"))
    donor = cell.filter((pl.col("control") == "none") & (pl.col("search") == "sweep") & (pl.col("split") == "test"))
    for lam in (1.0, 2.0):  # every carried tensor patched, only the block linears quantized, the FT head kept
        got = donor.filter(pl.col("lambda") == lam)["correct"].item()
        assert got == reference_correct(dict(ft), images, labels, QuantSpec(bits=2), rho, lam)
    base = pl.read_parquet(stored(tmp_path, "all", "baselines", "table", task="shapes", **at))
    qat_fp = base.filter((pl.col("model") == "qat") & (pl.col("split") == "test"))["correct"].item()
    assert qat_fp == reference_correct(dict(qat), images, labels, None)  # the QAT model with its own head
