"""Several configs on one shared store, through Snakemake: a copy of a config with one more task under
another name runs only the new task's jobs, its row and column and the merges; a config with one more
quantizer runs no FT; no config's report overwrites another's, and switching back plans nothing."""

import polars as pl
import pytest
import yaml

from helpers import QUANT, mini_config, planned_jobs, snakemake, stored

pytestmark = pytest.mark.slow
TASKS = ("shapes", "dots")


def planned(proc) -> dict[str, int]:
    jobs = planned_jobs(proc)
    assert jobs.pop("total", 0) == sum(jobs.values())
    return jobs


def report_bytes(work, name):
    out = work / "results" / name / "tiny"
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_configs_share_the_store_and_keep_their_own_reports(tmp_path):
    a = mini_config(tmp_path / "a.yaml", name="a", tasks=TASKS, pretrain=False)
    snakemake(tmp_path, a)
    first = report_bytes(tmp_path, "a")

    # the same grid with one more task, under another name
    raw = yaml.safe_load(a.read_text())
    raw["name"], raw["tasks"]["blur"] = "b", {}
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump(raw))
    jobs = planned(snakemake(tmp_path, b, "--dry-run"))
    n = len(TASKS) + 1
    assert jobs == {"finetune": 1, "qat": 1, "cache_splits": 1, "extract_vector": 1, "baselines": 1,
                    "merge_leave_one_out": n,  # every receiver's leave-one-out set changed or is new
                    "transfer_cell": (n + 1) + 2 * len(TASKS),  # the new row; the new column and merged cell of each old row
                    "diagnostics": 1, "tables": 1, "figures": 1, "paper_tables": 1, "all": 1}
    snakemake(tmp_path, b)
    # the two configs read the same FT model of a shared task: one file
    assert stored(tmp_path, "a", "ft", "ckpt", task="dots") == stored(tmp_path, "b", "ft", "ckpt", task="dots")
    # each config has its own report; the first is untouched by the second run
    assert report_bytes(tmp_path, "a") == first
    ta = pl.read_parquet(tmp_path / "results" / "a" / "tiny" / "transfer.parquet")
    tb = pl.read_parquet(tmp_path / "results" / "b" / "tiny" / "transfer.parquet")
    assert sorted(ta["receiver"].unique()) == sorted(TASKS) and sorted(tb["receiver"].unique()) == sorted([*TASKS, "blur"])
    summary = "tiny/" + QUANT + "/summary.md"
    assert (tmp_path / "results" / "a" / summary).read_text() != (tmp_path / "results" / "b" / summary).read_text()
    # a shared cell holds the same rows in both tables
    key = ["receiver", "donor", "control", "control_seed", "search", "lambda", "split", "criterion"]
    cell = (pl.col("receiver") == "shapes") & (pl.col("donor") == "dots")
    assert ta.filter(cell).sort(key, nulls_last=True).select(key + ["correct"]).equals(
        tb.filter(cell).sort(key, nulls_last=True).select(key + ["correct"]))

    # one more quantizer: QAT and what follows it for that quantizer only, never FT or the caches
    raw_c = yaml.safe_load(a.read_text())
    raw_c["name"], raw_c["quant"] = "c", [raw_c["quant"], {"bits": 3, "granularity": "channel"}]
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump(raw_c))
    jobs = planned(snakemake(tmp_path, c, "--dry-run"))
    t = len(TASKS)
    assert jobs == {"qat": t, "extract_vector": t, "baselines": t, "merge_leave_one_out": t, "transfer_cell": t * (t + 1),
                    "diagnostics": 1, "tables": 1, "figures": 2, "paper_tables": 2, "all": 1}

    # switching back to the first config plans nothing: its report and every job it reads are in place
    proc = snakemake(tmp_path, a, "--dry-run")
    assert planned_jobs(proc) == {} and "Nothing to be done" in proc.stdout + proc.stderr
