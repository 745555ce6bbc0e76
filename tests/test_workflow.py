"""The whole workflow through Snakemake on one finished miniature run: its outputs and what a changed
config reruns (tests/test_workflow_configs.py has the runs and dry runs that need no finished run)."""

import json
import re
import subprocess

import polars as pl
import pytest
import yaml
from PIL import Image

from helpers import QUANT, REPO, env, mini_config, plan_of, planned_jobs, snakemake, store_entries, stored
from qvlib.store import JOB_FILE, LOG_FILE, OUTPUTS
from qvlib.plots import DPI, gain_figure_size
from qvlib.vectors import WeightVector

pytestmark = pytest.mark.slow
TASKS = ("shapes", "dots", "blur")
REPORT = ["baselines.parquet", "transfer.parquet", "summary_donor.parquet", "summary_receiver.parquet", "specific.parquet",
          "summary_specific.parquet", "diagnostics.parquet", "cosine.parquet", "quantizers.parquet", "quantizers.md"]
FIGURES = ["summary.md", "heatmap_gain.png", "heatmap_cosine.png",  # per quantizer
           "paper_tables.md", "paper_table1.parquet", "paper_transfer.parquet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("wf")
    cfg = mini_config(work / "mini.yaml")  # .test/config/config.yaml as it is (data root beside it)
    snakemake(work, cfg)
    return work, cfg


def test_every_output_exists_with_the_right_shape(finished):
    work, _ = finished
    out = work / "results" / "mini" / "tiny"
    for name in REPORT:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / QUANT / name).stat().st_size > 0, name
    # every job of the config sits in the store with its outputs, its job file and its log, where the plan
    # the workflow builds from the config put it (store.json is that plan's manifest)
    entries = store_entries(work, "mini")
    assert entries == plan_of(work / "mini.yaml").manifest()
    for entry in entries:
        folder = work / entry["folder"]
        assert folder.is_relative_to(work / "results" / "store"), entry
        for name in [*OUTPUTS[entry["kind"]].values(), JOB_FILE, LOG_FILE]:
            assert (folder / name).exists(), (entry, name)
        assert json.loads((folder / JOB_FILE).read_text())["job"]["key"] == entry["key"] == folder.name
    for task in TASKS:
        for kind in ("ft", "qat"):
            labels = {} if kind == "ft" else {"quant": QUANT}  # FT is shared by every quantizer
            assert stored(work, "mini", kind, "ckpt", task=task, seed=0, **labels).exists()
            assert stored(work, "mini", kind, task=task, seed=0, **labels).joinpath(LOG_FILE).exists()
        assert stored(work, "mini", "cache", "test", task=task).exists()  # one cache per task, shared by every seed and arch
    assert stored(work, "mini", "backbone", "ckpt", arch="tiny", seed=0).exists()
    assert not list(out.rglob("*.safetensors"))  # results/<name>/ holds the config's reports only

    base = pl.read_parquet(out / "baselines.parquet")
    assert len(base) == 3 * 4 * 2 and set(base["model"]) == {"ft", "ptq", "qat", "qat_ptq"}
    assert set(base["seed"]) == {0} and set(base["quant"]) == {"w2-channel"}
    transfer = pl.read_parquet(out / "transfer.parquet")
    # per cell: 3 lambdas x 2 splits per variant, + 1 adaptive row for the donor (none) or self, + 1 row per
    # data-free criterion; 6 single-donor cells and 3 leave-one-out merged donors (merged:mean)
    assert transfer.filter(pl.col("control") == "none").height == (6 + 3) * (3 * 2 + 1 + 2)
    random = transfer.filter(pl.col("control") == "random")
    assert random.height == (6 + 3) * 2 * (3 * 2 + 2)  # two random directions per donor
    assert (random.group_by("donor").agg(pl.col("control_seed").n_unique())["control_seed"] == 2).all()
    assert transfer.filter(pl.col("control") == "self").height == 3 * (3 * 2 + 1 + 2)
    merged = transfer.filter(pl.col("donor") == "merged:mean")
    assert sorted(merged["receiver"].unique()) == ["blur", "dots", "shapes"]
    # a data-free row repeats the test row of the sweep lambda its criterion picked
    free = transfer.filter(pl.col("search") == "datafree")
    assert set(free["criterion"]) == {"weights", "outputs"} and set(free["split"]) == {"test"}
    sweep = transfer.filter((pl.col("search") == "sweep") & (pl.col("split") == "test"))
    keys = ["receiver", "donor", "control", "control_seed", "lambda"]
    assert len(free.join(sweep, on=keys, how="anti", nulls_equal=True)) == 0
    assert free.join(sweep, on=keys, nulls_equal=True).select((pl.col("correct") == pl.col("correct_right")).all()).item()
    for receiver in ("blur", "dots", "shapes"):  # the leave-one-out donor never holds the receiver's own vector
        loo = WeightVector.load(stored(work, "mini", "merged", "vector", receiver=receiver, method="mean", seed=0, quant=QUANT))
        assert json.loads(loo.metadata["merged"])["tasks"] == sorted({"blur", "dots", "shapes"} - {receiver})
    assert {"gain", "ptq_accuracy", "accuracy", "correct", "n", "lambda", "split", "quant", "seed", "control_seed"} <= set(transfer.columns)

    # lambda = 0 rows reproduce the PTQ baselines exactly
    zero = transfer.filter((pl.col("lambda") == 0.0) & (pl.col("search") == "sweep"))
    ptq = base.filter(pl.col("model") == "ptq").select("task", "split", pl.col("correct").alias("ptq_correct"))
    joined = zero.join(ptq, left_on=["receiver", "split"], right_on=["task", "split"])
    assert len(joined) == len(zero) > 0 and (joined["correct"] == joined["ptq_correct"]).all()
    assert (zero["gain"] == 0).all()
    # the self control at lambda = 1 is the QAT model quantized
    own = transfer.filter((pl.col("control") == "self") & (pl.col("lambda") == 1.0) & (pl.col("search") == "sweep"))
    qat = base.filter(pl.col("model") == "qat_ptq").select("task", "split", pl.col("correct").alias("qat_correct"))
    joined = own.join(qat, left_on=["receiver", "split"], right_on=["task", "split"])
    assert len(joined) == 6 and (joined["correct"] == joined["qat_correct"]).all()

    donors = pl.read_parquet(out / "summary_donor.parquet")
    rules = {"lambda=1", "oracle", "calib", "datafree:weights", "datafree:outputs"}
    assert set(donors["rule"]) == rules and set(donors["control"]) == {"none", "random"}
    assert (donors.filter(pl.col("kind") == "single")["pairs"] == 2).all()
    assert (donors.filter(pl.col("donor") == "merged:mean")["pairs"] == 3).all()
    specific = pl.read_parquet(out / "specific.parquet")
    assert specific.height == (6 + 3) * 5 and (specific["directions"] == 2).all()
    summary = pl.read_parquet(out / "summary_specific.parquet")
    overall = summary.filter(pl.col("scope") == "overall")
    assert overall.height == 2 * 5 * 2  # per kind (single, merged) and rule: seed 0 and pooled
    assert set(summary["verdict"]) <= {"yes", "no", "inconclusive"}
    assert (summary["ci_low"] <= summary["specific_gain"]).all() and (summary["specific_gain"] <= summary["ci_high"]).all()
    receivers = pl.read_parquet(out / "summary_receiver.parquet")
    assert set(receivers["control"]) == {"none", "random", "self"}

    diag = pl.read_parquet(out / "diagnostics.parquet")
    assert len(diag) == 3 * 5 and (diag["ft_update_rel"] > 0).all()
    cos = pl.read_parquet(out / "cosine.parquet")
    assert len(cos) == 9 + 3 and cos.filter(pl.col("task_b") == "merged:mean")["task_a"].sort().to_list() == ["blur", "dots", "shapes"]
    assert cos.filter(pl.col("task_a") == pl.col("task_b"))["cosine"].to_list() == pytest.approx([1.0] * 3)

    with Image.open(out / QUANT / "heatmap_gain.png") as im:
        assert im.format == "PNG"
        w, h = gain_figure_size(3, 4, 2)  # donors: 3 tasks and merged:mean; controls: random, self
        assert 0.5 * w * DPI < im.size[0] <= w * DPI + 40 and im.size[1] <= h * DPI + 120  # cropped to its content
    with Image.open(out / QUANT / "heatmap_cosine.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    summary = (out / QUANT / "summary.md").read_text()
    assert "Transfer beyond a random direction" in summary and "best_minus_random" in summary
    assert "Summary written on:" in summary and "<!-- readme:start -->" in summary
    assert "leave-one-out merged donor" in summary and "lambda chosen data-free (weights)" in summary
    assert "- `merged:mean`: at the oracle lambda it gains" in summary and "from the oracle and" in summary
    paper = (out / QUANT / "paper_tables.md").read_text()
    assert "## Table 1: baselines" in paper and "## Table 3: transfer, lambda picked per pair on the calib split" in paper
    table1 = pl.read_parquet(out / QUANT / "paper_table1.parquet")
    assert sorted(table1["task"]) == sorted(TASKS) and table1["qat"].is_not_null().all()
    assert set(pl.read_parquet(out / QUANT / "paper_transfer.parquet")["task"]) == set(TASKS)


def test_the_readme_commands_run_as_written_on_a_runs_outputs(finished, tmp_path):
    """The README's own-checkpoint commands and its polars example on a finished run's files (the
    miniature stands in for the demo: same quantizer tag and seed, arch tiny for vit_demo, tasks shapes and
    dots, blur for glyphs; its store's globs match one folder each, as after one `make run`)."""
    work, _ = finished
    readme = (REPO / "README.md").read_text()
    run = str(work / "results" / "mini" / "tiny")
    block = readme.split("## Use it on your own checkpoints")[1].split("```bash\n")[1].split("```")[0]
    script = (block.replace("results/default/vit_demo", run).replace("results/store", str(work / "results" / "store"))
              .replace("vit_demo", "tiny").replace("glyphs", "blur"))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lower is better" in proc.stdout
    quantized = WeightVector.load(tmp_path / "patched_q.safetensors")
    assert json.loads(quantized.metadata["quant"])["bits"] == 2  # taken from the vector's metadata, as the README says
    example = readme.split("```python\n")[1].split("```")[0].replace("results/default/vit_demo", run)
    exec(compile(example, "README.md", "exec"), {})


def test_adding_a_task_plans_only_its_jobs(finished, tmp_path):
    work, cfg = finished
    data = yaml.safe_load(cfg.read_text())
    data["tasks"]["frequency"] = {}
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(yaml.safe_dump(data))
    jobs = planned_jobs(snakemake(work, bigger, "--dry-run"))
    assert jobs == {"finetune": 1, "qat": 1, "extract_vector": 1, "cache_splits": 1, "baselines": 1,
                    "merge_leave_one_out": 4,  # every receiver's merge now holds one more vector
                    # its own row (3 donors + self), one cell per other receiver, every merged-donor cell
                    "transfer_cell": 4 + 3 + 4,
                    "tables": 1, "diagnostics": 1, "figures": 1, "paper_tables": 1, "all": 1, "total": 25}


def test_deleting_a_cell_reruns_only_that_cell(finished):
    work, cfg = finished
    snakemake(work, cfg)  # restore the original effective config after the dry run above
    assert planned_jobs(snakemake(work, cfg, "--dry-run")) == {}
    cell = stored(work, "mini", "cell", "table", receiver="dots", donor="blur", seed=0, quant=QUANT)
    before = pl.read_parquet(cell)
    cell.unlink()
    jobs = planned_jobs(snakemake(work, cfg, "--dry-run"))
    assert jobs == {"transfer_cell": 1, "tables": 1, "figures": 1, "paper_tables": 1, "all": 1, "total": 5}
    snakemake(work, cfg)
    assert pl.read_parquet(cell).equals(before)  # deterministic on the CPU


def test_adding_a_seed_plans_only_its_jobs(finished, tmp_path):
    work, cfg = finished
    data = yaml.safe_load(cfg.read_text())
    data["seeds"] = [0, 1]
    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump(data))
    jobs = planned_jobs(snakemake(work, more, "--dry-run"))
    assert jobs == {"pretrain": 1, "finetune": 3, "qat": 3, "extract_vector": 3, "baselines": 3, "merge_leave_one_out": 3,
                    "transfer_cell": 9 + 3, "diagnostics": 1, "tables": 1, "figures": 1, "paper_tables": 1,
                    "all": 1, "total": 33}  # no cache: data is shared
    # the same from the command line, as the README's three-seed study runs it
    jobs = planned_jobs(snakemake(work, cfg, "--dry-run", "--config", "seeds=[0,1]"))
    assert jobs["pretrain"] == 1 and jobs["transfer_cell"] == 12


def test_changing_the_quantizer_reruns_qat_never_ft(finished, tmp_path):
    work, cfg = finished
    data = yaml.safe_load(cfg.read_text())
    data["quant"] = {"bits": 3, "granularity": "channel"}
    other = tmp_path / "w3.yaml"
    other.write_text(yaml.safe_dump(data))
    proc = snakemake(work, other, "--dry-run")
    jobs = planned_jobs(proc)
    assert jobs == {"qat": 3, "extract_vector": 3, "baselines": 3, "merge_leave_one_out": 3, "transfer_cell": 12,
                    "diagnostics": 1, "tables": 1, "figures": 1, "paper_tables": 1, "all": 1, "total": 29}
    outputs = [path for line in re.findall(r"^\s*output: (.+)$", proc.stdout, re.M) for path in line.split(", ")]
    assert any(path.endswith("/" + OUTPUTS["qat"]["ckpt"]) for path in outputs)
    assert not any(path.endswith("/" + OUTPUTS["ft"]["ckpt"]) or "/ft/" in path for path in outputs)


def test_adding_a_quantizer_runs_only_its_jobs_and_compares_them(finished, tmp_path):
    """A second quantizer (2-bit, mse scale) beside the first: its QAT, vectors, baselines and cells,
    never FT; then both sit in the tables, each with its own figures, and quantizers.md compares them."""
    work, cfg = finished
    data = yaml.safe_load(cfg.read_text())
    data["quant"] = [data["quant"], {"bits": 2, "granularity": "channel", "scale": "mse"}]
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(data))
    snakemake(work, cfg)  # the original effective config first, as other tests leave it changed
    jobs = planned_jobs(snakemake(work, two, "--dry-run"))
    assert jobs == {"qat": 3, "extract_vector": 3, "baselines": 3, "merge_leave_one_out": 3, "transfer_cell": 12,
                    "diagnostics": 1, "tables": 1, "figures": 2, "paper_tables": 2, "all": 1,
                    "total": 31}  # both tags' figures and paper tables read the tables
    snakemake(work, two)
    out = work / "results" / "mini" / "tiny"
    for tag in (QUANT, "w2-channel-mse"):
        assert (out / tag / "summary.md").read_text().startswith(f"# tiny {tag}")
    table = pl.read_parquet(out / "quantizers.parquet")
    assert sorted(table["quant"].unique()) == [QUANT, "w2-channel-mse"] and set(table["bits"]) == {2}
    base = pl.read_parquet(out / "baselines.parquet").filter((pl.col("model") == "ptq") & (pl.col("split") == "test"))
    best = base.group_by("task").agg(pl.col("accuracy").max())["accuracy"].mean()
    assert table["best_ptq_same_bits"].to_list() == pytest.approx([best] * len(table))
    assert (table["best_ptq_same_bits"] >= table["ptq"] - 1e-9).all()
    assert "**2 bits**" in (out / "quantizers.md").read_text()
