"""The run configuration: which training settings a job gets (no schema default overrides a value set at
a wider level; finetune < arch < task), NaN and infinity refused, and the checks a dry run makes."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
import yaml
from snakemake.utils import validate

from helpers import REPO, TEST_CONFIG
from qvlib.config import Config, check_finite, merge_train, non_finite
from qvlib.sections import Preprocess, QuantPolicy, QuantSpec
from qvlib.train import TrainConfig

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
PAPER_CONFIGS = ["paper.yaml", "paper-text.yaml"]


def validated(raw: dict, path="config.yaml") -> Config:
    """``raw`` after the schema validation (defaults filled in) that the workflow applies, as jobs read it."""
    validate(raw, SCHEMA)
    return Config(raw, REPO / path)


TINY_OVERRIDES = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}


def mini(**changes) -> dict:
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["archs"]["tiny"]["backbone"] = {"source": "random", "seed": 0}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_job_trains_with_finetune_merged_with_its_task_keys(name):
    """The defaults bug: the schema filled batch_size 64 and lr 1e-4 into each task's train section, which then
    replaced the config's finetune (batch 128, lr 1e-5) for every task of the paper grid."""
    raw = yaml.safe_load((REPO / "config" / name).read_text())
    written = {task: dict((opts or {}).get("train") or {}) for task, opts in raw["tasks"].items()}
    per_arch = {arch: dict(opts.get("train") or {}) for arch, opts in raw["archs"].items()}
    finetune = dict(raw["finetune"])
    cfg = validated(raw, f"config/{name}")
    for arch in cfg.arch_names:
        for task in cfg.task_names:
            got = cfg.finetune_train(task, arch)
            want = {**finetune, **per_arch[arch], **written[task], "seed": cfg.seed}
            assert got == TrainConfig.from_mapping(want), (arch, task)
            assert (got.lr, got.weight_decay, got.warmup_steps) == (1e-5, 0.1, 500)
            # the authors' batch: 128 per step, ViT-L as 64 x 2
            assert got.batch_size * got.grad_accum == 128 and (got.batch_size == 64) == (arch == "vit_large")
            assert got.epochs == written[task]["epochs"]


def test_schema_fills_train_defaults_only_in_the_widest_sections_and_they_are_trainconfigs():
    schema = yaml.safe_load(open(SCHEMA))
    train = schema["definitions"]["train"]["properties"]
    assert not [k for k, v in train.items() if "default" in v], "a default in an overriding train section"
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for section in (schema["properties"]["finetune"], schema["properties"]["pretrain"]["properties"]["train"]):
        defaults = {k: v["default"] for k, v in section["properties"].items()}
        assert defaults and all(fields[k] == v for k, v in defaults.items()), defaults
    raw = mini(tasks={"shapes": {"train": {"steps": 3}}, "dots": None})
    raw["archs"]["tiny"]["train"] = {"lr": 0.5}
    validated(raw)
    assert raw["tasks"]["shapes"]["train"] == {"steps": 3} and raw["archs"]["tiny"]["train"] == {"lr": 0.5}
    assert raw["finetune"]["grad_accum"] == 1 and raw["finetune"]["num_workers"] == 0  # the widest level is filled


def arch_config() -> Config:
    raw = mini(tasks={"shapes": {"train": {"lr": 0.02}}, "dots": {"train": {"batch_size": 16, "epochs": 2}}, "blur": {}})
    raw["finetune"].update(batch_size=128, grad_accum=1)
    raw["archs"]["large"] = {**raw["archs"]["tiny"], "train": {"batch_size": 64, "grad_accum": 2}}
    return validated(raw)


def test_per_arch_train_sits_between_finetune_and_the_task():
    cfg = arch_config()
    tiny, large = (cfg.finetune_train("blur", a) for a in ("tiny", "large"))
    assert (tiny.batch_size, tiny.grad_accum, tiny.lr) == (128, 1, 5e-3)
    assert (large.batch_size, large.grad_accum, large.lr) == (64, 2, 5e-3)
    shapes = cfg.finetune_train("shapes", "large")
    assert (shapes.batch_size, shapes.grad_accum, shapes.lr, shapes.steps) == (64, 2, 0.02, 12)
    dots = cfg.finetune_train("dots", "large")  # the task's batch wins; its epochs replace finetune's steps
    assert (dots.batch_size, dots.grad_accum, dots.steps, dots.epochs) == (16, 2, None, 2)
    with pytest.raises(ValueError, match="'large' has train settings of its own"):
        cfg.finetune_train("blur")


def test_merge_train_lets_steps_and_epochs_replace_each_other():
    assert merge_train({"steps": 10, "lr": 1.0}, {"epochs": 2}) == {"epochs": 2, "lr": 1.0}
    assert merge_train({"epochs": 1, "lr": 1.0}, {}, {"steps": 5, "lr": 2.0}) == {"steps": 5, "lr": 2.0}
    assert merge_train({"epochs": 1}, {"batch_size": 8}) == {"epochs": 1, "batch_size": 8}


@pytest.mark.parametrize("text,key", [
    ("finetune: {steps: 3, lr: .nan}", "finetune.lr"),
    ("finetune: {steps: 3, lr: .inf}", "finetune.lr"),
    ("lambdas: [0.5, .nan]", "lambdas[1]"),
    ("lambda_search: {method: racing, margin: -.inf}", "lambda_search.margin"),
])
def test_non_finite_numbers_are_refused_by_name(tmp_path, text, key):
    raw = mini()
    raw.update(yaml.safe_load(text))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {key} is not a finite number")):
        Config.load(path)
    assert non_finite({"a": [1.0, {"b": 2}], "c": math.nan}) == "c"
    check_finite({"a": [1.0, {"b": 2, "s": "nan"}]}, "x")  # the string 'nan' is not a number


def refused(match, **changes):
    cfg = validated(mini(**changes))
    with pytest.raises(ValueError, match=match):
        cfg.check()


def test_check_accepts_the_shipped_configs():
    for name in ("config.yaml", "paper.yaml", "paper-text.yaml"):
        validated(yaml.safe_load((REPO / "config" / name).read_text()), f"config/{name}").check()
    validated(yaml.safe_load(TEST_CONFIG.read_text())).check()


def test_check_names_unknown_tasks_and_generators():
    refused(r"tasks\.nosuch: unknown task; known tasks: .*shapes", tasks={"shapes": {}, "nosuch": {}})
    validated(mini(tasks={"shapes": {}, "mine": {"source": {"kind": "hf", "id": "me/mine"}}})).check()  # any hf name
    raw = mini()
    raw["archs"]["tiny"]["backbone"] = {"source": "pretrain"}
    raw["pretrain"]["tasks"] = ["shapes", "nope"]
    cfg = validated(raw)
    with pytest.raises(ValueError, match=r"pretrain\.tasks: unknown generator 'nope'"):
        cfg.check()
    del raw["pretrain"]
    with pytest.raises(ValueError, match=r"archs\.tiny\.backbone: source pretrain needs a pretrain section"):
        Config(raw, REPO / "c.yaml").check()


def test_check_names_bad_regex_group_size_and_non_vit_archs():
    refused(r"policy.*'\(\['.* is not a valid regular expression", policy={"pattern": "(["})
    refused(r"policy\.pattern 'nothing' matches no 2-D weight of arch 'tiny'", policy={"pattern": "nothing"})
    # the miniature's linears are 24 (qkv, proj, fc1) and 96 (fc2) wide
    refused(r"group_size 7 does not divide the input width 24 of arch 'tiny'.*24, 96",
            quant={"bits": 2, "granularity": "group", "group_size": 7})
    validated(mini(quant={"bits": 2, "granularity": "group", "group_size": 8})).check()
    refused(r"quant: .*granularity 'group' needs a positive integer group_size", quant={"bits": 2, "granularity": "group"})
    raw = mini()
    raw["archs"]["tiny"] = {"timm_name": "resnet18", "backbone": {"source": "random"}}
    with pytest.raises(ValueError, match=r"archs\.tiny\.timm_name 'resnet18': .*not a timm VisionTransformer"):
        validated(raw).check()
    raw["archs"]["tiny"]["overrides"] = {"img_size": 16}  # timm's TypeError, named the same way
    with pytest.raises(ValueError, match=r"archs\.tiny\.timm_name 'resnet18'"):
        validated(raw).check()
    raw["archs"]["tiny"] = {"timm_name": "no_such_model"}
    with pytest.raises(ValueError, match=r"archs\.tiny: .*not a timm model name"):
        validated(raw).check()


def test_check_names_training_settings_no_job_could_run():
    raw = mini()
    raw["finetune"] = {"steps": 5, "epochs": 2}
    with pytest.raises(ValueError, match=r"tasks\.shapes\.train \(on arch tiny\): give exactly one of steps or epochs"):
        validated(raw).check()


# ------------------------------------------------------------------ what timm knows, asked once
def test_arch_facts_are_timms_and_a_cached_answer_is_read_without_torch(tmp_path):
    from qvlib.config import arch_facts, arch_facts_key
    from qvlib.pipeline import arch_preprocess
    from qvlib.sections import ArchSection

    cfg = validated(mini())
    facts = cfg.arch_facts("tiny", cache=tmp_path)
    assert facts.preprocess == arch_preprocess(cfg.arch("tiny"))  # the pixels key the store's caches use
    assert facts.preprocess.pixels() == "16px-bicubic-crop0.9"
    assert {n: w for n, w in facts.widths.items() if cfg.policy.matches(n)} == {
        f"blocks.{b}.{m}.weight": 96 if m == "mlp.fc2" else 24 for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    section = cfg.arch_section("tiny")
    cached = tmp_path / "archs" / f"{arch_facts_key(section)}.json"
    assert json.loads(cached.read_text())["arch"] == section.build()
    # the key follows what a build reads: the timm name and overrides, not the backbone, the train keys or the name
    other = ArchSection.from_config("other", {**mini()["archs"]["tiny"], "backbone": {"source": "random"}, "train": {"lr": 1.0}})
    assert arch_facts_key(other) == arch_facts_key(section)
    wider = ArchSection.from_config("tiny", {**mini()["archs"]["tiny"], "overrides": {**TINY_OVERRIDES, "embed_dim": 32}})
    assert arch_facts_key(wider) != arch_facts_key(section)
    # a fresh process reads the cached answer, and checks the config with it, importing neither torch nor timm
    out = subprocess.run([sys.executable, "-c", f"""
import sys
from pathlib import Path
from qvlib.config import Config, arch_facts
from qvlib.sections import ArchSection
facts = arch_facts(ArchSection.from_config('tiny', {mini()['archs']['tiny']!r}), cache={str(tmp_path)!r})
print(facts.preprocess.pixels(), sorted(facts.widths.values())[-1])
Config({cfg.raw!r}, Path('c.yaml')).check(cache={str(tmp_path)!r})
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')]
"""], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["16px-bicubic-crop0.9", "96"]
    # an unreadable answer is built again; a config error is never cached
    cached.write_text("{")
    assert arch_facts(section, cache=tmp_path) == facts
    assert json.loads(cached.read_text())["widths"] == facts.widths
    deeper = ArchSection.from_config("x", {**mini()["archs"]["tiny"], "overrides": {**TINY_OVERRIDES, "depth": 3}})
    assert arch_facts(deeper).preprocess == facts.preprocess and len(arch_facts(deeper).widths) > len(facts.widths)
    bad = ArchSection.from_config("tiny", {"timm_name": "resnet18"})
    with pytest.raises(ValueError, match=r"archs\.tiny\.timm_name 'resnet18': .*not a timm VisionTransformer"):
        arch_facts(bad, cache=tmp_path)
    assert not (tmp_path / "archs" / f"{arch_facts_key(bad)}.json").exists()


def test_check_with_a_cache_finds_the_same_problems(tmp_path):
    validated(mini()).check(cache=tmp_path)
    validated(mini()).check(cache=tmp_path)  # read back
    cfg = validated(mini(quant={"bits": 2, "granularity": "group", "group_size": 7}))
    with pytest.raises(ValueError, match=r"group_size 7 does not divide the input width 24 of arch 'tiny'"):
        cfg.check(cache=tmp_path)


def test_accessors_read_their_sections():
    raw = mini(oracle_search=False, datafree={"criteria": ["weights"], "noise_images": 8, "proxy_images": 12},
               lambda_search={"method": "racing", "keep": 0.5}, lambda_ties="smallest", evaluate={"batch_size": 64, "precision": "fp32"},
               random_controls=2, merged_donors=["mean"], data_seed=4, calib_position="tail")
    cfg = validated(raw)
    assert cfg.oracle_search is False and validated(mini()).oracle_search is True
    assert (cfg.datafree_criteria, cfg.datafree_images, cfg.datafree_proxy_images) == (["weights"], 8, 12)
    assert validated(mini(datafree={})).datafree_proxy_images == 256
    assert cfg.lambda_search == {"method": "racing", "keep": 0.5} and str(cfg.lambda_ties) == "smallest"
    assert (cfg.eval_batch_size(), cfg.eval_precision()) == (64, "fp32")
    assert (cfg.random_controls, cfg.merged_donors, cfg.data_seed) == (2, ["mean"], 4)
    assert cfg.lambdas == [0.0, 1.0, 2.0] and all(isinstance(x, float) for x in cfg.lambdas)
    opts = cfg.load_options("shapes", Preprocess(16))
    assert (opts.n_train, opts.n_test, opts.seed, opts.calib_position, opts.download) == (200, 60, 4, "tail", False)
    assert cfg.quants == [QuantSpec(bits=2)] and cfg.quant_tags == ["w2-channel"] and cfg.with_quant("w2-channel").quant == QuantSpec(bits=2)
    with pytest.raises(ValueError, match=r"^evaluate\.batch_size must be an integer >= 1, got 0$"):
        Config({"evaluate": {"batch_size": 0}}, REPO / "c.yaml").eval_batch_size()


def job_files(tmp_path) -> dict[str, Config]:
    """One job file of each kind of the miniature's store plan (qvlib.store), loaded as jobs load them."""
    from qvlib.store import Plan

    raw = yaml.safe_load(TEST_CONFIG.read_text())  # its arch pretrains a backbone
    raw["lambda_ties"] = "smallest"
    validate(raw, SCHEMA)
    cfg = Config(raw, REPO / "c.yaml")
    pixels = {a: (pre.pixels(), pre.pixel_settings()) for a, pre in ((a, cfg.arch_facts(a).preprocess) for a in cfg.arch_names)}
    plan = Plan(raw, {s.tag: json.loads(s.to_json()) for s in cfg.quants}, pixels)
    out = {}
    for job in plan.jobs():
        if job.kind not in out:
            path = tmp_path / f"{job.kind}.json"
            path.write_text(json.dumps(job.document()))
            out[job.kind] = Config.load(path)
    return out


def test_a_job_file_serves_exactly_the_accessors_its_job_reads(tmp_path):
    jobs = job_files(tmp_path)
    cell, ft, qat, backbone, cache = jobs["cell"], jobs["ft"], jobs["qat"], jobs["backbone"], jobs["cache"]
    for job in (cell, jobs["baselines"], jobs["diagnostics"]):
        assert (job.quant, job.policy, job.arch("tiny").name) == (QuantSpec(bits=2), QuantPolicy(), "tiny")
    assert (cell.lambdas, cell.lambda_search, cell.oracle_search, cell.random_controls) == ([0.0, 1.0, 2.0], {"method": "dense"}, True, 2)
    assert (cell.datafree_criteria, cell.datafree_images, cell.datafree_proxy_images) == (["weights", "outputs"], 8, 256)
    assert (cell.eval_batch_size(), cell.eval_precision(), cell.data_seed) == (64, "bf16", 0)
    assert cell.load_options(cell.task_names[0], Preprocess(16)).n_train == 200
    assert ft.finetune_train("shapes", "tiny") == qat.finetune_train("shapes", "tiny") == validated(mini()).finetune_train("shapes", "tiny")
    assert qat.quant == QuantSpec(bits=2) and ft.policy == QuantPolicy()
    assert backbone.pretrain_train().steps == 10 and backbone.pretrain_mixture() == (["shapes", "dots"], 200)
    assert backbone.data_seed == 0 and backbone.reuse_backbones is None
    assert cache.preprocess(None).pixels() == "16px-bicubic-crop0.9" and cache.load_options("shapes", cache.preprocess(None)).n_test == 60
    assert jobs["vector"].policy == QuantPolicy()
    # what a job does not read is refused, never defaulted
    for job, accessor in [(cell, lambda c: c.lambda_ties), (cell, lambda c: c.merged_donors), (cell, lambda c: c.finetune_train("shapes", "tiny")),
                          (jobs["vector"], lambda c: c.lambdas), (jobs["vector"], lambda c: c.quant),
                          (backbone, lambda c: c.data_root), (backbone, lambda c: c.load_options("shapes", Preprocess(16))),
                          (ft, lambda c: c.random_controls), (ft, lambda c: c.eval_batch_size()),
                          (jobs["baselines"], lambda c: c.datafree_images), (cache, lambda c: c.policy)]:
        with pytest.raises(KeyError, match="does not read the config key"):
            accessor(job)
