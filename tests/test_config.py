"""The run configuration: which training settings a job gets (no schema default overrides a value set at
a wider level; finetune < arch < task), NaN and infinity refused, and the checks a dry run makes."""

import dataclasses
import math
import re

import pytest
import yaml
from snakemake.utils import validate

from helpers import REPO, TEST_CONFIG
from qvlib.config import Config, check_finite, merge_train, non_finite
from qvlib.train import TrainConfig

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
PAPER_CONFIGS = ["paper.yaml", "paper-text.yaml"]


def validated(raw: dict, path="config.yaml") -> Config:
    """``raw`` after the schema validation (defaults filled in) that the workflow applies, as jobs read it."""
    validate(raw, SCHEMA)
    return Config(raw, REPO / path)


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
