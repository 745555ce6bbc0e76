"""The paper protocol (config/paper.yaml) executed end to end through Snakemake, cut to a smoke run
(.test/config/paper-smoke.yaml): the real vit_tiny_patch16_224 at 224 px, its weights read through
timm's pretrained loading from a file in timm's in21k layout, three tasks from Hugging Face
save_to_disk folders in the authors' formats (tests/paper_fixtures.py), timm's augmentation, scope
all, the raced lambda sweep, merged donors and the data-free rules, to the tables and heatmaps."""

import json
import re
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from PIL import Image

from helpers import REPO, snakemake, stored
from paper_fixtures import BACKBONE_FILE, IN21K_CLASSES, TASKS, write_all
from qvlib.vectors import WeightVector

SMOKE = REPO / ".test" / "config" / "paper-smoke.yaml"
PAPER = REPO / "config" / "paper.yaml"
TEXT_SMOKE = REPO / ".test" / "config" / "paper-text-smoke.yaml"
PAPER_TEXT = REPO / "config" / "paper-text.yaml"
QUANT = "w3-channel"
ARCH = "vit_tiny"
SEED = yaml.safe_load(SMOKE.read_text())["seeds"][0]  # the authors' one seed
NAME = yaml.safe_load(SMOKE.read_text())["name"]
# Where the smoke config may differ from config/paper.yaml: sizes only (and where its files are).
SIZE_KEYS = [
    r"name", r"data_root", r"seeds", r"resources(/.*)?",
    r"archs/[^/]+",  # an arch left out (checked apart: the kept ones are paper.yaml's, plus a local file)
    r"archs/\w+/backbone/file",
    r"tasks/[^/]+",  # a task left out
    r"tasks/\w+/max_(train|test)", r"tasks/\w+/train/(epochs|steps|warmup_steps)",
    r"finetune/(epochs|steps|warmup_steps)",
    r"datafree/noise_images",
]


def differences(a, b, path=""):
    """Key paths (``a/b/c``) where two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}/{key}" if path else str(key)
            out += differences(a.get(key), b.get(key), sub) if key in a and key in b else [sub]
        return out
    return [] if a == b else [path]


@pytest.mark.parametrize("paper, smoke", [(PAPER, SMOKE), (PAPER_TEXT, TEXT_SMOKE)], ids=["paper", "paper-text"])
def test_smoke_config_is_the_paper_config_with_only_sizes_changed(paper, smoke):
    paper, smoke = yaml.safe_load(paper.read_text()), yaml.safe_load(smoke.read_text())
    other = [d for d in differences(paper, smoke) if not any(re.fullmatch(p, d) for p in SIZE_KEYS)]
    assert other == [], f"the smoke config differs from {paper['name']}.yaml beyond sizes: {other}"
    assert set(smoke["tasks"]) <= set(paper["tasks"]) and len(smoke["tasks"]) == 3
    assert set(smoke["archs"]) == {ARCH} and smoke["archs"][ARCH]["timm_name"] == "vit_tiny_patch16_224"
    assert "overrides" not in smoke["archs"][ARCH]  # the full-size arch at 224 px
    assert smoke["archs"][ARCH]["backbone"]["file"] == BACKBONE_FILE
    assert set(smoke["tasks"]) == set(TASKS)  # every task has a fixture, read from data_root/<its hub id>
    assert all(smoke["tasks"][t]["source"]["id"] == TASKS[t].id for t in TASKS)


def test_the_text_protocols_smoke_config_plans_every_rule(tmp_path):
    """The paper text's protocol (scope linear, no augmentation) at the smoke sizes: planned, not run
    (running it would double the end-to-end test's time)."""
    from helpers import planned_jobs

    jobs = planned_jobs(snakemake(tmp_path, TEXT_SMOKE, "--dry-run"))
    per_run = {"finetune": 3, "qat": 3, "extract_vector": 3, "cache_splits": 3, "baselines": 3, "merge_leave_one_out": 3,
               "transfer_cell": 3 * 4, "diagnostics": 1, "tables": 1, "figures": 1, "all": 1}
    assert {k: jobs.get(k) for k in per_run} == per_run and "pretrain" not in jobs


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    work = tmp_path_factory.mktemp("paper-smoke")
    write_all(work)
    t0 = time.perf_counter()
    snakemake(work, SMOKE)
    wall = time.perf_counter() - t0
    print(f"paper smoke run: {wall:.0f} s")
    return work, wall


def _out(work: Path) -> Path:
    return work / "results" / NAME / ARCH


def _stored(work: Path, kind: str, output: str, **labels) -> Path:
    """A file of the smoke run's one job of ``kind`` with ``labels``, on its arch at its seed (and quantizer, but FT reads none)."""
    if kind != "cache":  # a cache is keyed by its pixels and task alone
        labels = {"arch": ARCH, "seed": SEED, **({} if kind == "ft" else {"quant": QUANT}), **labels}
    return stored(work, NAME, kind, output, **labels)


@pytest.mark.slow
def test_checkpoints_are_the_full_size_arch_with_each_tasks_own_head(finished):
    work, _ = finished
    paper = yaml.safe_load(PAPER.read_text())["finetune"]
    smoke = yaml.safe_load(SMOKE.read_text())
    for task, spec in TASKS.items():
        for path in (_stored(work, "ft", "ckpt", task=task), _stored(work, "qat", "ckpt", task=task)):
            ckpt = WeightVector.load(path)
            assert ckpt["blocks.0.attn.qkv.weight"].shape == (576, 192) and ckpt["blocks.11.mlp.fc1.weight"].shape == (768, 192)
            assert not any(k.startswith("blocks.12.") for k in ckpt)
            assert ckpt["pos_embed"].shape == (1, 197, 192) and ckpt["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
            # the in21k head dropped, a head of the task's classes in its place
            assert ckpt["head.weight"].shape == (len(spec.classes), 192) != (IN21K_CLASSES, 192)
            meta = ckpt.metadata
            assert meta["arch"] == ARCH and meta["scope"] == "all" and json.loads(meta["num_classes"]) == len(spec.classes)
            # the settings the job trained with: paper.yaml's finetune section, sizes aside
            trained = json.loads(meta["train"])
            for key in set(paper) - {"epochs", "steps", "warmup_steps"}:
                assert trained[key] == paper[key], (str(path), key, trained[key], paper[key])
            assert trained["epochs"] == smoke["tasks"][task]["train"]["epochs"] and trained["seed"] == SEED


@pytest.mark.slow
def test_training_changed_every_tensor_and_vectors_hold_every_non_head_tensor(finished):
    work, _ = finished
    backbone = WeightVector.load(work / BACKBONE_FILE)
    for task in TASKS:
        ft = WeightVector.load(_stored(work, "ft", "ckpt", task=task))
        vector = WeightVector.load(_stored(work, "vector", "vector", task=task))
        body = sorted(k for k in ft if not k.startswith("head."))
        assert sorted(vector) == body and len(body) == 150  # 4 + 12 blocks x 12 + final norm, every one carried
        assert all(vector[k].shape == ft[k].shape for k in body)
        moved = [k for k in body if not (ft[k] - backbone[k]).abs().max() > 0]
        assert moved == [], f"{task}: FT left {moved[:3]} at the backbone's values (scope all trains every tensor)"
        assert all(vector[k].abs().max() > 0 for k in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight"))


@pytest.mark.slow
def test_ft_learns_each_task_above_chance(finished):
    work, _ = finished
    base = pl.read_parquet(_out(work) / "baselines.parquet")
    assert set(base["model"]) == {"ft", "ptq", "qat", "qat_ptq"} and set(base["split"]) == {"test", "calib"}
    ft = {r["task"]: r for r in base.filter((pl.col("model") == "ft") & (pl.col("split") == "test")).iter_rows(named=True)}
    margins = {}
    for task, spec in TASKS.items():
        chance = 1 / len(spec.classes)
        margins[task] = ft[task]["accuracy"] / 100 - chance  # accuracy is in points
        assert ft[task]["n"] == 12
        metrics = json.loads(_stored(work, "ft", "metrics", task=task).read_text())
        assert metrics["loss"][-1] < metrics["loss"][0], (task, metrics["loss"])
    assert all(m > 0.1 for m in margins.values()), margins
    assert sum(margins.values()) / len(margins) > 0.3, margins


@pytest.mark.slow
def test_every_cell_and_control_is_in_the_transfer_table_and_the_heatmap_written(finished):
    work, _ = finished
    out = _out(work)
    transfer = pl.read_parquet(out / "transfer.parquet")
    tasks = sorted(TASKS)
    expected = {(r, r, "self") for r in tasks}
    for r in tasks:
        for d in [t for t in tasks if t != r] + ["merged:mean"]:
            expected |= {(r, d, "none"), (r, d, "random")}
    found = set(transfer.select("receiver", "donor", "control").unique().iter_rows())
    assert found == expected
    assert set(transfer["search"]) == {"sweep", "datafree"} and set(transfer["split"]) == {"test", "calib"}
    free = transfer.filter(pl.col("search") == "datafree")
    assert set(free["criterion"]) == {"weights", "outputs"}
    assert free.group_by("receiver", "donor", "control").len()["len"].to_list() == [2] * len(expected)
    sweep = transfer.filter(pl.col("search") == "sweep")  # dense, as the authors pick: every lambda on every split
    lambdas = yaml.safe_load(SMOKE.read_text())["lambdas"]
    assert sweep.group_by("receiver", "donor", "control").len()["len"].to_list() == [2 * len(lambdas)] * len(expected)
    assert set(sweep["lambda"]) == set(lambdas) and (sweep.filter(pl.col("split") == "test")["n"] == 12).all()
    for name in ("summary_donor.parquet", "summary_receiver.parquet", "specific.parquet", "summary_specific.parquet",
                 "diagnostics.parquet", "cosine.parquet", "quantizers.parquet"):
        assert pl.read_parquet(out / name).height > 0, name
    for name in ("heatmap_gain.png", "heatmap_cosine.png"):
        with Image.open(out / QUANT / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert (out / QUANT / "summary.md").read_text().startswith(f"# {ARCH} {QUANT}")
    cache = _stored(work, "cache", "test", task="cifar10")
    assert cache.relative_to(work / "results" / "store" / "cache").parts[0].startswith("224px-")
    images = WeightVector.load(cache)["images"]
    assert images.shape == (12, 3, 224, 224)


@pytest.mark.slow
def test_the_smoke_run_fits_its_budget(finished):
    _, wall = finished
    # Budget: 6 minutes on 2 quiet cores. make test runs other modules beside it, so only a run several
    # times over budget fails here (the time is printed with -s).
    assert wall < 1500, f"the paper smoke run took {wall:.0f} s (budget: 6 minutes on 2 quiet cores)"
