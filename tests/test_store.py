"""The shared store (qvlib.store): each job's key follows exactly the settings it reads, job files refuse
the others, and configs that agree on a job share its folder."""

import copy
import json

import pytest
import yaml
from snakemake.utils import update_config, validate

from helpers import REPO, TEST_CONFIG
from qvlib.config import Config
from qvlib.store import READS, Job, Plan, ReadGuard, digest_of, guarded, image_sources

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PIXELS = {"img_size": 16, "interpolation": "bicubic", "crop_pct": 0.9}


def plan_of(raw: dict, root="results/store") -> Plan:
    """The store plan of a parsed config, as the Snakefile builds it (quantizer mappings by tag; the
    pixels of each arch here fixed: they come from timm in the workflow)."""
    cfg = Config(raw, TEST_CONFIG)
    quants = {s.tag: json.loads(s.to_json()) for s in cfg.quants}
    pixels = {arch: ("16px-bicubic-crop0.9", PIXELS) for arch in raw["archs"]}
    return Plan(raw, quants, pixels, root=root)


def mini() -> dict:
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    validate(raw, str(SCHEMA))  # defaults filled in, as the workflow sees the config
    return raw


def keys(plan: Plan) -> dict[tuple, str]:
    return {(job.kind, *sorted(job.labels.items())): job.key for job in plan.jobs()}


def replanned(before: dict, after: dict) -> dict[str, int]:
    """Kind -> how many of ``after``'s jobs have no job with the same key in ``before``."""
    old = set(keys(plan_of(before)).values())
    out: dict[str, int] = {}
    for job in plan_of(after).jobs():
        if job.key not in old:
            out[job.kind] = out.get(job.kind, 0) + 1
    return out


def changed(path: str, value) -> dict[str, int]:
    raw = mini()
    new = copy.deepcopy(raw)
    *parents, leaf = path.split(".")
    node = new
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value
    return replanned(raw, new)


# The miniature grid: 3 tasks, 1 seed, 1 quantizer, merged donor mean, data-free rules on noise only.
T = 3
DOWNSTREAM_OF_FT = {"vector", "merged", "baselines", "cell", "diagnostics"}
ALL_CELLS = T * (T + 1)
# one task's cells: its row (every donor and the merged one), its column in the other rows, and the other
# receivers' merged cells (their merges hold its vector)
ROW_AND_COLUMN = (T + 1) + 2 * (T - 1)


@pytest.mark.parametrize("path,value,expected", [
    # the architecture: everything but the caches (their pixels are unchanged)
    ("archs.tiny.overrides.depth", 3, {"backbone": 1, "ft": T, "qat": T, "vector": T, "merged": T, "baselines": T,
                                       "cell": ALL_CELLS, "diagnostics": 1}),
    # an arch's own train keys: its fine-tuning and what follows, not pretraining
    ("archs.tiny.train", {"lr": 1e-3}, {"ft": T, "qat": T, "vector": T, "merged": T, "baselines": T, "cell": ALL_CELLS,
                                        "diagnostics": 1}),
    ("pretrain.train.steps", 11, {"backbone": 1, "ft": T, "qat": T, "vector": T, "merged": T, "baselines": T,
                                  "cell": ALL_CELLS, "diagnostics": 1}),
    ("pretrain.n_per_task", 100, {"backbone": 1, "ft": T, "qat": T, "vector": T, "merged": T, "baselines": T,
                                  "cell": ALL_CELLS, "diagnostics": 1}),
    ("finetune.lr", 1e-3, {"ft": T, "qat": T, "vector": T, "merged": T, "baselines": T, "cell": ALL_CELLS, "diagnostics": 1}),
    ("policy.scope", "all", {"ft": T, "qat": T, "vector": T, "merged": T, "baselines": T, "cell": ALL_CELLS, "diagnostics": 1}),
    # the quantizer: never FT, pretraining or the caches
    ("quant.bits", 3, {"qat": T, "vector": T, "merged": T, "baselines": T, "cell": ALL_CELLS, "diagnostics": 1}),
    # one task's fine-tuning: its models, its vector, the merges holding it (the other receivers'), its
    # baselines and its cells
    ("tasks.shapes.train", {"steps": 5}, {"ft": 1, "qat": 1, "vector": 1, "merged": T - 1, "baselines": 1,
                                          "cell": ROW_AND_COLUMN, "diagnostics": 1}),
    # one task's data: its cache too
    ("tasks.shapes.n_train", 100, {"cache": 1, "ft": 1, "qat": 1, "vector": 1, "merged": T - 1, "baselines": 1,
                                   "cell": ROW_AND_COLUMN, "diagnostics": 1}),
    ("task_defaults.n_test", 50, {"cache": T, "ft": T, "qat": T, "vector": T, "merged": T, "baselines": T,
                                  "cell": ALL_CELLS, "diagnostics": 1}),
    ("data_seed", 1, {"backbone": 1, "cache": T, "ft": T, "qat": T, "vector": T, "merged": T, "baselines": T,
                      "cell": ALL_CELLS, "diagnostics": 1}),
    # evaluation settings: evaluation jobs only
    ("evaluate.batch_size", 32, {"baselines": T, "cell": ALL_CELLS}),
    ("lambdas", [0.0, 0.5, 1.0], {"cell": ALL_CELLS}),
    ("oracle_search", False, {"cell": ALL_CELLS}),
    ("random_controls", 1, {"cell": ALL_CELLS}),
    ("lambda_search", {"method": "racing"}, {"cell": ALL_CELLS}),
    ("datafree.noise_images", 4, {"cell": ALL_CELLS}),
    # what only the reports read, or nothing reads: how often runs checkpoint and log, whether torchvision
    # may download, and where real datasets live when every task is generated
    ("finetune.log_every", 1, {}),
    ("finetune.checkpoint_every", 1, {}),
    ("pretrain.train.log_every", 1, {}),
    ("download", True, {}),
    ("data_root", "/elsewhere", {}),
    ("lambda_ties", "smallest", {}),
    ("name", "other", {}),
    ("resources.evaluate.threads", 2, {}),
])
def test_a_setting_replans_exactly_the_jobs_that_read_it(path, value, expected):
    got = changed(path, value)
    assert got == expected


def test_every_top_level_key_of_the_schema_is_read_by_some_job_or_named_as_unread():
    """A new schema key must be placed: read by a job (qvlib.store.READS) or listed here as read by the
    reports or the workflow alone (the replan test above covers each)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    read = {k for keys_ in READS.values() for k in keys_} - {"preprocess"}
    unread = {"name", "lambda_ties", "merged_donors", "resources", "store"}  # merged_donors: which jobs exist
    assert set(schema["properties"]) == read | unread, set(schema["properties"]) ^ (read | unread)


def test_a_new_seed_adds_jobs_and_keeps_every_key_of_the_old_seed():
    raw = mini()
    more = {**copy.deepcopy(raw), "seeds": [0, 1]}
    before, after = keys(plan_of(raw)), keys(plan_of(more))
    assert set(before.items()) <= set(after.items())
    assert replanned(raw, more) == {"backbone": 1, "ft": T, "qat": T, "vector": T, "merged": T, "baselines": T,
                                    "cell": ALL_CELLS, "diagnostics": 1}


def test_a_new_task_runs_its_jobs_its_row_and_column_and_the_merges():
    raw = mini()
    more = copy.deepcopy(raw)
    more["tasks"]["glyphs"] = {}
    n = T + 1
    # new: the task's models, cache, vector, baselines; its row (n + 1 donors) and its column (T receivers);
    # every receiver's merge (its leave-one-out set changed or is new) and merged cell; the diagnostics
    assert replanned(raw, more) == {"ft": 1, "qat": 1, "cache": 1, "vector": 1, "baselines": 1,
                                    "merged": n, "cell": (n + 1) + T + T, "diagnostics": 1}


def test_a_rule_on_other_tasks_images_makes_every_cell_read_every_task():
    raw = mini()
    raw["datafree"]["criteria"] = ["outputs@others~0.05"]
    more = copy.deepcopy(raw)
    more["tasks"]["glyphs"] = {}
    n = T + 1
    assert replanned(raw, more)["cell"] == n * (n + 1)  # the old cells' proxy images change too
    donor_only = copy.deepcopy(raw)
    donor_only["datafree"]["criteria"] = ["outputs@donor~0.05"]
    grown = copy.deepcopy(donor_only)
    grown["tasks"]["glyphs"] = {}
    # @donor: a single donor's cell reads its donor's images only; the merged donor's read every other task
    assert replanned(donor_only, grown)["cell"] == (n + 1) + T + T


def test_the_store_root_moves_folders_not_keys():
    raw = mini()
    a, b = plan_of(raw), plan_of(raw, root="/shared/qv")
    assert [j.key for j in a.jobs()] == [j.key for j in b.jobs()]
    assert all(j.folder.startswith("/shared/qv/") for j in b.jobs())


def test_configs_sharing_settings_share_jobs_whatever_their_names():
    """The README's quantizer comparison (config.yaml + quantizers.yaml) reuses every job of the default
    run for its first quantizer (the default's own), FT and the caches with nothing copied."""
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    combined = copy.deepcopy(default)
    update_config(combined, yaml.safe_load((REPO / "config" / "quantizers.yaml").read_text()))
    for raw in (default, combined):
        validate(raw, str(SCHEMA))
    assert combined["name"] != default["name"]
    old = set(keys(plan_of(default)).values())
    shared = {job.kind for job in plan_of(combined).jobs() if job.key in old}
    assert shared == {"backbone", "ft", "qat", "vector", "merged", "cache", "baselines", "cell", "diagnostics"}
    new = [job for job in plan_of(combined).jobs() if job.key not in old]
    assert {j.kind for j in new} == {"qat", "vector", "merged", "baselines", "cell", "diagnostics"}
    assert {j.labels["quant"] for j in new} == {"w2-channel-mse", "w2-channel-hqq", "w3-channel"}


def test_job_keys_and_folders():
    raw = mini()
    plan = plan_of(raw)
    ft = plan.finetune("tiny", "shapes", 0)
    assert ft.folder == f"results/store/ft/tiny/shapes/seed0/{ft.key}" and len(ft.key) == 12
    assert ft.file("ckpt").endswith(f"/{ft.key}/ft.safetensors")
    assert ft.inputs["backbone"][0] is plan.backbone("tiny", 0)
    qat = plan.finetune("tiny", "shapes", 0, "w2-channel")
    assert qat.folder.startswith("results/store/qat/tiny/shapes/w2-channel/seed0/")
    # FT never holds the quantizer; QAT's sections are FT's plus it
    assert "quant" not in ft.sections and {k: v for k, v in qat.sections.items() if k != "quant"} == ft.sections
    merged = plan.merged("tiny", "shapes", "mean", 0, "w2-channel")
    assert sorted(merged.inputs) == ["vector:blur", "vector:dots"]  # never the receiver's own vector
    cell = plan.cell("tiny", "shapes", "merged-mean", 0, "w2-channel")
    assert cell.inputs["vector"][0] is merged and cell.folder.startswith("results/store/cell/tiny/shapes/merged-mean/")
    # a job's key is the hash of its version, kind, labels, its sections' canonical settings and inputs' keys
    from qvlib.sections import key_settings
    from qvlib.store import STORE_VERSION
    assert ft.settings == key_settings(ft.sections, READS["ft"]) and ft.document()["job"]["settings"] == ft.settings
    assert ft.key == digest_of(STORE_VERSION, "ft", ft.labels, ft.settings, {"backbone": plan.backbone("tiny", 0).key})
    # caches are shared by archs with the same pixels: one job, whichever arch asks
    twin = copy.deepcopy(raw)
    twin["archs"]["wide"] = {**raw["archs"]["tiny"], "overrides": {**raw["archs"]["tiny"]["overrides"], "embed_dim": 48}}
    p2 = plan_of(twin)
    assert p2.cache("tiny", "shapes") is p2.cache("wide", "shapes")
    assert sum(j.kind == "cache" for j in p2.jobs()) == T and sum(j.kind == "ft" for j in p2.jobs()) == 2 * T


def test_the_manifest_and_where_name_every_job_once():
    plan = plan_of(mini())
    rows = plan.manifest()
    assert len(rows) == len({r["key"] for r in rows}) == len(list(plan.jobs()))
    assert plan.where("vector", "vector", task="dots") == plan.vector("tiny", "dots", 0, "w2-channel").file("vector")
    with pytest.raises(ValueError, match="3 ft jobs have labels"):
        plan.where("ft")


def test_a_job_cannot_hold_or_read_a_section_its_kind_does_not_read(tmp_path):
    with pytest.raises(ValueError, match=r"a ft job does not read \['lambdas'\]"):
        Job("ft", {"arch": "a", "task": "t", "seed": 0}, {"lambdas": [1.0]})
    guard = ReadGuard({"finetune": {"steps": 1}}, "ft")
    assert guard["finetune"] == {"steps": 1} and guard.get("policy", "none") == "none" and "policy" not in guard
    with pytest.raises(KeyError, match="a ft job does not read the config key 'lambdas'"):
        guard.get("lambdas")
    with pytest.raises(KeyError, match="'datafree'"):
        "datafree" in guard  # noqa: B015
    plan = plan_of(mini())
    doc = plan.finetune("tiny", "shapes", 0).document()
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    cfg = Config.load(path)
    assert cfg.job_kind == "ft" and cfg.seed == 0 and cfg.task_names == ["shapes"]
    assert cfg.finetune_train("shapes", "tiny").steps == 12
    with pytest.raises(KeyError, match="does not read the config key 'lambdas'"):
        cfg.lambdas
    with pytest.raises(ValueError, match="no kind of job"):
        guarded({"job": {"kind": "bake"}})
    assert guarded({"name": "x"}) == {"name": "x"}  # a whole config is not guarded


def test_image_sources_of_the_data_free_rules():
    assert image_sources(["weights", "outputs", "outputs@noise~0.1"]) == set()
    assert image_sources(["outputs@others~0.05", "features@donor"]) == {"others", "donor"}
    assert image_sources(["outputs@others+donor~0.05", "outputs@synth+noise"]) == {"others", "donor", "synth"}


def test_a_job_file_keeps_small_floats_numbers(tmp_path):
    """json.dumps writes 1e-05 without a dot, which YAML 1.1 reads as a string: job files are read as
    JSON (config/paper.yaml fine-tunes at lr 1e-5)."""
    raw = mini()
    raw["finetune"]["lr"] = 1.0e-5
    doc = plan_of(raw).finetune("tiny", "shapes", 0).document()
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    assert "1e-05" in path.read_text()
    assert Config.load(path).finetune_train("shapes", "tiny").lr == 1.0e-5
    path.write_text("{not json")
    from qvlib import cli
    assert cli.main(["finetune", "--config", str(path), "--arch", "tiny", "--task", "shapes", "--mode", "ft",
                     "-o", str(tmp_path / "ft.safetensors")]) == 2


@pytest.mark.parametrize("path,value", [
    ("policy", {"scope": "linear"}),  # the defaults written out
    ("calib_position", "head"),
    ("reuse_backbones", None),
    ("evaluate.precision", "bf16"),
    ("lambda_search", {"method": "dense"}),
    ("lambdas", [0, 1, 2]),  # integers for the floats
    ("tasks.shapes", {"n_train": 200}),  # the task_defaults' value, written on the task
])
def test_a_setting_written_another_way_keeps_every_key(path, value):
    assert changed(path, value) == {}


def test_data_root_keys_the_jobs_of_tasks_read_from_files():
    raw = mini()
    raw["tasks"]["mnist"] = {}  # torchvision's MNIST: files under data_root
    moved = copy.deepcopy(raw)
    moved["data_root"] = "/elsewhere"
    got = replanned(raw, moved)
    assert got["cache"] == 1 and got["ft"] == 1 and got["qat"] == 1  # MNIST's own jobs; the generated tasks' keep their keys
    assert "backbone" not in got and got["baselines"] == 1


def test_the_merge_reads_its_vectors_in_task_name_order():
    raw = mini()
    flipped = copy.deepcopy(raw)
    flipped["tasks"] = dict(reversed(list(raw["tasks"].items())))
    a, b = plan_of(raw), plan_of(flipped)
    ma, mb = a.merged("tiny", "shapes", "mean", 0, "w2-channel"), b.merged("tiny", "shapes", "mean", 0, "w2-channel")
    assert ma.key == mb.key and list(ma.inputs) == list(mb.inputs) == ["vector:blur", "vector:dots"]


def test_a_job_file_names_its_key_and_the_reports_stay_out_of_the_store(tmp_path):
    plan = plan_of(mini())
    job = plan.cell("tiny", "shapes", "dots", 0, "w2-channel")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job.document()))
    cfg = Config.load(path)
    assert cfg.job_kind == "cell" and cfg.job_key == job.key  # recorded as store_key in what the job writes
    assert Config(mini(), TEST_CONFIG).job_key is None


def test_a_config_named_like_the_store_is_refused(tmp_path):
    from helpers import mini_config, snakemake

    cfg = mini_config(tmp_path / "store.yaml", name="store")
    proc = snakemake(tmp_path, cfg, "--dry-run", check=False)
    assert proc.returncode != 0 and "inside the store" in proc.stdout + proc.stderr
