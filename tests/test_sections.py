"""The config's sections (qvlib.sections): each a frozen dataclass with exact values and defaults, a
ValueError naming the key for each bad setting, a fingerprint that is stable, blind to a default spelled
out, and moved by every field; and the whole module (what the workflow's DAG imports) free of torch."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, TEST_CONFIG
from qvlib.sections import (
    ArchSection,
    ControlsSection,
    DatafreeSection,
    DataSection,
    EvaluateSection,
    LambdaSearch,
    LambdaSection,
    LoadOptions,
    Preprocess,
    PretrainSection,
    QuantPolicy,
    QuantSection,
    QuantSpec,
    TaskSection,
    TrainConfig,
    TrainOverrides,
    TrainSettings,
    VIT_BLOCK_LINEARS,
)
from qvlib.vocab import LambdaTies, SweepMethod


def refuses(match: str, build) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def distinct(*sections) -> None:
    """Every section's fingerprint differs from every other's (a short hex string each)."""
    prints = [s.fingerprint() for s in sections]
    assert all(re.fullmatch("[0-9a-f]{12}", p) for p in prints)
    assert len(set(prints)) == len(prints), prints


# ------------------------------------------------------------------ quant
def test_quant_section_one_or_several_quantizers():
    assert QuantSection.from_config(None).specs == (QuantSpec(),) == QuantSection().specs
    one = QuantSection.from_config({"bits": 2, "granularity": "channel"})
    assert one.specs == (QuantSpec(bits=2),) and one.tags == ["w2-channel"] and one.spec(None) == QuantSpec(bits=2)
    many = QuantSection.from_config([{"bits": 2}, {"bits": 2, "scale": "mse"}, {"bits": 4, "granularity": "group", "group_size": 32}])
    assert many.tags == ["w2-channel", "w2-channel-mse", "w4-group32"]
    assert many.spec("w4-group32") == QuantSpec(bits=4, granularity="group", group_size=32)
    refuses(r"quantizer 'w8-channel' is not one of this config's quantizers", lambda: many.spec("w8-channel"))


@pytest.mark.parametrize("value,match", [
    ([], r"^quant is an empty list$"),
    ([{"bits": 2}, {"bits": 2, "granularity": "channel"}], r"^quant: quantizers must differ, got tags \['w2-channel', 'w2-channel'\]"),
    ({"bits": 9}, r"^quant: bits must be an integer in 2\.\.8, got 9$"),
    ({"bits": True}, r"^quant: bits must be an integer in 2\.\.8, got True$"),
    ([{"bits": 2}, {"granularity": "row"}], r"^quant\[1\]: granularity must be one of channel, group, tensor, got 'row'$"),
    ({"granularity": "group"}, r"^quant: granularity 'group' needs a positive integer group_size, got None$"),
    ({"group_size": 8}, r"^quant: group_size is only valid with granularity 'group', not 'channel'$"),
    ({"scale": "nope"}, r"^quant: scale must be one of absmax, mse, hqq.*, got 'nope'$"),
    ({"bits": 3, "symmetric": True}, r"^quant: unknown QuantSpec keys: \['symmetric'\]$"),
    ("w3", r"^quant must be a mapping, got 'w3'$"),
])
def test_quant_section_refuses_by_key(value, match):
    refuses(match, lambda: QuantSection.from_config(value))


def test_quant_fingerprints():
    assert QuantSpec().fingerprint() == QuantSpec.from_mapping({"bits": 3, "granularity": "channel", "scale": "absmax"}).fingerprint()
    assert QuantSpec().canonical() == {"bits": 3, "granularity": "channel", "group_size": None, "scale": "absmax"}
    distinct(QuantSpec(), QuantSpec(bits=2), QuantSpec(granularity="tensor"), QuantSpec(scale="mse"),
             QuantSpec(granularity="group", group_size=8), QuantSpec(granularity="group", group_size=16))
    assert QuantSection.from_config({"bits": 3}).fingerprint() == QuantSection().fingerprint()
    distinct(QuantSection(), QuantSection.from_config([{"bits": 3}, {"bits": 2}]), QuantSection.from_config([{"bits": 2}, {"bits": 3}]))


# ------------------------------------------------------------------ policy
def test_policy_values_defaults_and_errors():
    assert QuantPolicy.from_config(None) == QuantPolicy() == QuantPolicy(VIT_BLOCK_LINEARS, "linear")
    assert QuantPolicy.from_config({"pattern": "fc", "scope": "all"}) == QuantPolicy("fc", "all")
    refuses(r"^policy: scope must be one of linear, all, got 'head'$", lambda: QuantPolicy.from_config({"scope": "head"}))
    refuses(r"^policy: the quantization pattern '\(\[' is not a valid regular expression",
            lambda: QuantPolicy.from_config({"pattern": "(["}))
    refuses(r"^policy: the quantization pattern must be a non-empty regular expression, got ''$",
            lambda: QuantPolicy.from_config({"pattern": ""}))
    refuses(r"^policy: unknown key\(s\) \['bits'\]; allowed: pattern, scope$", lambda: QuantPolicy.from_config({"bits": 3}))
    assert QuantPolicy.from_config({"pattern": VIT_BLOCK_LINEARS}).fingerprint() == QuantPolicy().fingerprint()
    distinct(QuantPolicy(), QuantPolicy(scope="all"), QuantPolicy(pattern="fc1"))
    # torch-free matching of names (a 2-D check only when a tensor is given)
    assert QuantPolicy().matches("blocks.3.mlp.fc2.weight") and not QuantPolicy().matches("head.weight")


# ------------------------------------------------------------------ training
def test_train_overrides_and_settings():
    assert TrainOverrides.from_config(None, "tasks.a.train").values == {}
    written = TrainOverrides.from_config({"lr": 0.5, "epochs": 2}, "tasks.a.train")
    assert written.values == {"lr": 0.5, "epochs": 2} and written.canonical() == {"epochs": 2.0, "lr": 0.5}
    finetune = TrainSettings.from_config({"steps": 10, "lr": 1e-3}, "finetune")
    assert finetune.canonical() == {**{f.name: f.default for f in dataclasses.fields(TrainConfig)
                                       if f.name not in ("seed", "steps", "epochs")}, "steps": 10, "lr": 1e-3}
    got = finetune.train_config(7, {"batch_size": 16}, written.values)  # the narrower sections win; epochs replaces steps
    assert got == TrainConfig(epochs=2, lr=0.5, batch_size=16, seed=7)
    # a default spelled out is the same setting; every key moves the fingerprint
    assert TrainSettings.from_config({"steps": 10, "batch_size": 64, "lr": 1e-3}, "finetune").fingerprint() == finetune.fingerprint()
    assert TrainSettings.from_config({"steps": 10, "lr": 0.001}, "finetune").fingerprint() == finetune.fingerprint()
    changed = {"steps": 11, "epochs": 1, "batch_size": 8, "grad_accum": 2, "lr": 1e-2, "weight_decay": 0.1,
               "warmup_steps": 3, "grad_clip": None, "checkpoint_every": 5, "log_every": 5, "num_workers": 2,
               "precision": "fp32", "augment": True, "last_batch": "keep", "lr_schedule": "lagged"}
    assert set(changed) == {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
    variants = [TrainSettings.from_config({"steps": 10, "lr": 1e-3, **({} if k == "epochs" else {k: v}),
                                           **({"epochs": v, "steps": None} if k == "epochs" else {})}, "finetune")
                for k, v in changed.items()]
    distinct(finetune, *variants)


@pytest.mark.parametrize("value,match", [
    ({"momentum": 0.9}, r"^finetune: unknown training keys: \['momentum'\]"),
    ({"seed": 3}, r"^finetune: unknown training keys: \['seed'\]"),
    ({"lr": 0}, r"^finetune: lr must be positive, got 0$"),
    ({"batch_size": 0}, r"^finetune: batch_size must be >= 1, got 0$"),
    ({"precision": "fp16"}, r"^finetune: precision must be one of bf16, fp32, got 'fp16'$"),
    ({"last_batch": "pad"}, r"^finetune: last_batch must be one of drop, keep, got 'pad'$"),
    ({"lr_schedule": "late"}, r"^finetune: lr_schedule must be one of aligned, lagged, got 'late'$"),
    ({"steps": 0}, r"^finetune\.steps must be an integer >= 1, got 0$"),
    ({"epochs": -1}, r"^finetune\.epochs must be a finite number > 0, got -1$"),
    ([1], r"^finetune must be a mapping, got \[1\]$"),
])
def test_train_settings_refuse_by_key(value, match):
    refuses(match, lambda: TrainSettings.from_config(value, "finetune"))


def test_train_settings_may_give_both_lengths_for_a_narrower_section_to_choose():
    both = TrainSettings.from_config({"steps": 5, "epochs": 2}, "finetune")  # valid alone; a job needs one
    assert both.train_config(0, {"epochs": 3}) == TrainConfig(epochs=3)
    refuses("give exactly one of steps or epochs", lambda: both.train_config(0))


# ------------------------------------------------------------------ archs
TINY = {"timm_name": "vit_tiny_patch16_224", "overrides": {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 2,
                                                           "num_heads": 2}}


def test_arch_section_values_defaults_and_spec():
    arch = ArchSection.from_config("tiny", TINY)
    assert (arch.name, arch.timm_name, dict(arch.overrides)) == ("tiny", "vit_tiny_patch16_224", TINY["overrides"])
    assert arch.backbone == {"source": "random"} and arch.train.values == {} and not arch.needs_pretrain
    assert arch.build() == {"timm_name": "vit_tiny_patch16_224", "overrides": TINY["overrides"]}
    pre = ArchSection.from_config("tiny", {**TINY, "backbone": {"source": "pretrain"}, "train": {"batch_size": 8}})
    assert pre.needs_pretrain and pre.train.values == {"batch_size": 8}
    assert pre.spec("bb.safetensors").backbone == {"source": "file", "path": "bb.safetensors"}
    assert pre.spec().backbone == {"source": "pretrain"} and pre.spec().overrides == TINY["overrides"]
    assert ArchSection.from_config("other", TINY).fingerprint() == arch.fingerprint()  # the name is a label
    assert ArchSection.from_config("tiny", {**TINY, "backbone": {"source": "random"}}).fingerprint() == arch.fingerprint()
    distinct(arch, ArchSection.from_config("tiny", {**TINY, "timm_name": "vit_small_patch16_224"}),
             ArchSection.from_config("tiny", {**TINY, "overrides": {**TINY["overrides"], "depth": 3}}),
             pre, ArchSection.from_config("tiny", {**TINY, "train": {"lr": 0.1}}))


@pytest.mark.parametrize("value,match", [
    ({}, r"^archs\.a: missing timm_name"),
    ({**TINY, "timm": "x"}, r"^archs\.a: unknown key\(s\) \['timm'\]; allowed: timm_name, overrides, backbone, train$"),
    ({"timm_name": ""}, r"^archs\.a\.timm_name must be a timm model name, got ''$"),
    ({**TINY, "overrides": {"width": 3}}, r"^archs\.a\.overrides: unknown override\(s\) \['width'\]; allowed: img_size"),
    ({**TINY, "overrides": {"depth": 0}}, r"^archs\.a\.overrides\.depth must be an integer >= 1, got 0$"),
    ({**TINY, "overrides": {"mlp_ratio": 0}}, r"^archs\.a\.overrides\.mlp_ratio must be a finite number > 0, got 0$"),
    ({**TINY, "backbone": {"source": "hub"}}, r"^archs\.a\.backbone\.source must be one of timm, file, pretrain, random, got 'hub'$"),
    ({**TINY, "backbone": {"source": "timm", "url": "x"}}, r"^archs\.a\.backbone: unknown key\(s\) \['url'\]"),
    ({**TINY, "train": {"lr": -1}}, r"^archs\.a\.train: lr must be positive, got -1$"),
])
def test_arch_section_refuses_by_key(value, match):
    refuses(match, lambda: ArchSection.from_config("a", value))


# ------------------------------------------------------------------ tasks and data
def test_task_section_over_task_defaults():
    task = TaskSection.from_config("shapes", None)
    assert task.options() == {"n_train": 3000, "n_test": 1000, "max_train": None, "max_test": None, "source": {}}
    assert task.options().keys() <= {f.name for f in dataclasses.fields(LoadOptions)}
    assert (LoadOptions(Preprocess(16)).n_train, LoadOptions(Preprocess(16)).n_test) == (3000, 1000)  # the same defaults
    got = TaskSection.from_config("shapes", {"n_test": 50, "train": {"steps": 4}}, {"n_train": 200, "n_test": 60})
    assert (got.n_train, got.n_test, got.train.values) == (200, 50, {"steps": 4})
    hf = TaskSection.from_config("mine", {"source": {"kind": "hf", "id": "me/mine"}, "max_test": None})
    hf.check_known()
    refuses(r"^tasks\.nosuch: unknown task; known tasks: .*shapes", TaskSection.from_config("nosuch", {}).check_known)
    assert TaskSection.from_config("dots", {"n_train": 3000}).fingerprint() == TaskSection.from_config("shapes", {}).fingerprint()
    distinct(task, TaskSection.from_config("shapes", {"n_train": 10}), TaskSection.from_config("shapes", {"n_test": 10}),
             TaskSection.from_config("shapes", {"max_train": 10}), TaskSection.from_config("shapes", {"max_test": 10}),
             TaskSection.from_config("shapes", {"source": {"transpose": True}}),
             TaskSection.from_config("shapes", {"train": {"lr": 0.1}}))


@pytest.mark.parametrize("value,defaults,match", [
    ({"download": True}, None, r"^tasks\.t: unknown option\(s\) \['download'\]; allowed: n_train, n_test, max_train, max_test, source and train$"),
    ({"n_train": 0}, None, r"^tasks\.t\.n_train must be an integer >= 1, got 0$"),
    ({"max_test": "all"}, None, r"^tasks\.t\.max_test must be an integer >= 1 or null, got 'all'$"),
    ({"source": {"kind": "zip"}}, None, r"^tasks\.t\.source\.kind must be one of hf, idx_gz, got 'zip'$"),
    ({"source": {"url": "x"}}, None, r"^tasks\.t\.source: unknown key\(s\) \['url'\]"),
    ({"source": {"transpose": "yes"}}, None, r"^tasks\.t\.source\.transpose must be true or false, got 'yes'$"),
    ({"train": {"batch": 2}}, None, r"^tasks\.t\.train: unknown training keys: \['batch'\]"),
    ({}, {"n_test": 1.5}, r"^task_defaults\.n_test must be an integer >= 1, got 1\.5$"),
])
def test_task_section_refuses_by_key(value, defaults, match):
    refuses(match, lambda: TaskSection.from_config("t", value, defaults))


def test_data_section_reads_only_the_keys_asked_for():
    assert DataSection.from_config({}) == DataSection("data", 0, "head", False, {})
    raw = {"data_root": "~/d", "data_seed": 3, "calib_position": "tail", "download": True, "task_defaults": {"n_train": 20}}
    data = DataSection.from_config(raw)
    assert (data.data_seed, data.calib_position, data.download, data.task_defaults) == (3, "tail", True, {"n_train": 20})
    assert data.root.is_absolute() and data.root.name == "d"
    assert DataSection.from_config(raw, ["data_seed"]) == DataSection(data_seed=3)  # the others keep their defaults

    class Guard(dict):  # a job file's ReadGuard: any other key is a KeyError
        def __contains__(self, key):
            if key != "data_seed":
                raise KeyError(key)
            return super().__contains__(key)

    assert DataSection.from_config(Guard(data_seed=5), ["data_seed"]).data_seed == 5
    with pytest.raises(KeyError):
        DataSection.from_config(Guard(data_seed=5))
    refuses(r"the data section has no key\(s\) \['seeds'\]", lambda: DataSection.from_config(raw, ["seeds"]))
    assert DataSection.from_config({"data_root": "data", "calib_position": "head"}).fingerprint() == DataSection().fingerprint()
    distinct(DataSection(), *(DataSection.from_config({k: v}) for k, v in raw.items()))


@pytest.mark.parametrize("raw,match", [
    ({"data_seed": "0"}, r"^data_seed must be an integer, got '0'$"),
    ({"calib_position": "middle"}, r"^calib_position must be one of head, tail, got 'middle'$"),
    ({"download": "yes"}, r"^download must be true or false, got 'yes'$"),
    ({"data_root": ""}, r"^data_root must be a folder name, got ''$"),
    ({"task_defaults": {"train": {}}}, r"^task_defaults: unknown option\(s\) \['train'\]"),
    ({"task_defaults": {"max_train": 0}}, r"^task_defaults\.max_train must be an integer >= 1 or null, got 0$"),
])
def test_data_section_refuses_by_key(raw, match):
    refuses(match, lambda: DataSection.from_config(raw))


# ------------------------------------------------------------------ pretrain, evaluate
def test_pretrain_section():
    raw = {"tasks": ["shapes", "dots"], "train": {"steps": 10}}
    got = PretrainSection.from_config(raw)
    assert (got.tasks, got.n_per_task, got.train.values) == (("shapes", "dots"), 4000, {"steps": 10})
    assert got.train.train_config(2) == TrainConfig(steps=10, seed=2)
    assert PretrainSection.from_config({**raw, "n_per_task": 4000}).fingerprint() == got.fingerprint()
    distinct(got, PretrainSection.from_config({**raw, "tasks": ["dots", "shapes"]}),
             PretrainSection.from_config({**raw, "n_per_task": 10}), PretrainSection.from_config({**raw, "train": {"steps": 11}}))
    refuses(r"^pretrain\.tasks: unknown generator 'nope'; known: shapes, orientation", lambda: PretrainSection.from_config({**raw, "tasks": ["nope"]}))
    refuses(r"^pretrain\.tasks: name at least one generator$", lambda: PretrainSection.from_config({**raw, "tasks": []}))
    refuses(r"^pretrain: missing train$", lambda: PretrainSection.from_config({"tasks": ["shapes"]}))
    refuses(r"^pretrain\.n_per_task must be an integer >= 1, got 0$", lambda: PretrainSection.from_config({**raw, "n_per_task": 0}))
    refuses(r"^pretrain\.train: unknown training keys", lambda: PretrainSection.from_config({**raw, "train": {"x": 1}}))
    refuses(r"^pretrain: unknown key\(s\) \['mix'\]", lambda: PretrainSection.from_config({**raw, "mix": 1}))


def test_evaluate_section():
    assert EvaluateSection.from_config(None) == EvaluateSection(512, "bf16")
    assert EvaluateSection.from_config({"batch_size": 64, "precision": "fp32"}) == EvaluateSection(64, "fp32")
    assert EvaluateSection.from_config({"batch_size": 512}).fingerprint() == EvaluateSection().fingerprint()
    distinct(EvaluateSection(), EvaluateSection(64), EvaluateSection(precision="fp32"))
    refuses(r"^evaluate\.batch_size must be an integer >= 1, got 0$", lambda: EvaluateSection.from_config({"batch_size": 0}))
    refuses(r"^evaluate\.precision must be one of bf16, fp32, got 'fp16'$", lambda: EvaluateSection.from_config({"precision": "fp16"}))
    refuses(r"^evaluate: unknown key\(s\) \['workers'\]", lambda: EvaluateSection.from_config({"workers": 2}))


# ------------------------------------------------------------------ lambdas
def test_lambda_section():
    got = LambdaSection.from_config({})
    assert got == LambdaSection((1.0,), LambdaSearch(), True, LambdaTies.NEAREST_ONE)
    raw = {"lambdas": [0, 0.5, 2], "lambda_search": {"method": "racing", "keep": 0.25, "start": 64},
           "oracle_search": False, "lambda_ties": "smallest"}
    got = LambdaSection.from_config(raw)
    assert got.lambdas == (0.0, 0.5, 2.0) and not got.oracle_search and got.lambda_ties is LambdaTies.SMALLEST
    assert got.lambda_search == LambdaSearch(SweepMethod.RACING, keep=0.25, start=64)
    assert got.lambda_search.options() == {"method": "racing", "keep": 0.25, "start": 64}  # as written
    assert LambdaSection.from_config(raw, ["lambdas"]) == LambdaSection(lambdas=(0.0, 0.5, 2.0))
    assert LambdaSection.from_config({"lambdas": [1], "oracle_search": True, "lambda_search": {"method": "dense"},
                                      "lambda_ties": "nearest_one"}).fingerprint() == LambdaSection().fingerprint()
    distinct(LambdaSection(), *(LambdaSection.from_config({k: v}) for k, v in raw.items()))
    distinct(*(LambdaSearch.from_config({"method": "racing", **extra}) for extra in
               ({}, {"keep": 0.5}, {"margin": 1}, {"tolerance": 0.5}, {"start": 32})), LambdaSearch())


@pytest.mark.parametrize("raw,match", [
    ({"lambdas": []}, r"^lambdas: give at least one lambda$"),
    ({"lambdas": [1, -0.5]}, r"^lambdas\[1\] must be a finite number >= 0, got -0\.5$"),
    ({"lambdas": [float("nan")]}, r"^lambdas\[0\] must be a finite number >= 0, got nan$"),
    ({"lambdas": 1.0}, r"^lambdas must be a list of numbers, got 1\.0$"),
    ({"lambda_search": {"method": "golden"}}, r"^lambda_search\.method must be one of dense, racing, got 'golden'$"),
    ({"lambda_search": {"method": "racing", "speed": 2}}, r"^unknown lambda_search keys: speed$"),
    ({"lambda_search": {"keep": 1}}, r"^lambda_search\.keep must be a finite number > 0 and < 1, got 1$"),
    ({"lambda_search": {"margin": -1}}, r"^lambda_search\.margin must be a finite number >= 0, got -1$"),
    ({"lambda_search": {"tolerance": -1}}, r"^lambda_search\.tolerance must be a finite number >= 0, got -1$"),
    ({"lambda_search": {"start": 0}}, r"^lambda_search\.start must be an integer >= 1, got 0$"),
    ({"oracle_search": "no"}, r"^oracle_search must be true or false, got 'no'$"),
    ({"lambda_ties": "largest"}, r"^lambda_ties must be one of nearest_one, smallest, got 'largest'$"),
])
def test_lambda_section_refuses_by_key(raw, match):
    refuses(match, lambda: LambdaSection.from_config(raw))


# ------------------------------------------------------------------ datafree, controls
def test_datafree_section():
    assert DatafreeSection.from_config(None) == DatafreeSection((), 64, 256)
    rules = ["weights", "outputs", "features@donor", "agreement@others~0.1"]
    got = DatafreeSection.from_config({"criteria": rules, "noise_images": 8, "proxy_images": 6})
    assert got == DatafreeSection(tuple(rules), 8, 6)
    assert DatafreeSection.from_config({"noise_images": 64}).fingerprint() == DatafreeSection().fingerprint()
    distinct(DatafreeSection(), DatafreeSection(("weights",)), DatafreeSection(noise_images=8), DatafreeSection(proxy_images=6))


@pytest.mark.parametrize("value,match", [
    ({"criteria": ["loss"]}, r"^datafree\.criteria\[0\]: data-free rule 'loss': unknown criterion 'loss'; known: weights, outputs"),
    ({"criteria": ["weights@donor"]}, r"^datafree\.criteria\[0\]: .*criterion 'weights' reads no images, so it takes no @source$"),
    ({"criteria": ["outputs", "outputs@self"]}, r"^datafree\.criteria\[1\]: .*unknown image source 'self'; known: noise, donor, others, synth \(or several joined by \+\)$"),
    ({"criteria": ["outputs~x"]}, r"^datafree\.criteria\[0\]: .*the tolerance after ~ must be a number, got 'x'$"),
    ({"criteria": ["outputs~inf"]}, r"^datafree\.criteria\[0\]: .*the tolerance must be a finite number >= 0$"),
    ({"criteria": "weights"}, r"^datafree\.criteria must be a list of rules, got 'weights'$"),
    ({"noise_images": 0}, r"^datafree\.noise_images must be an integer >= 1, got 0$"),
    ({"proxy_images": 2.5}, r"^datafree\.proxy_images must be an integer >= 1, got 2\.5$"),
    ({"images": 3}, r"^datafree: unknown key\(s\) \['images'\]"),
])
def test_datafree_section_refuses_by_key(value, match):
    refuses(match, lambda: DatafreeSection.from_config(value))


def test_datafree_rules_are_checked_as_qvlib_datafree_parses_them():
    from qvlib.datafree import Rule

    for text in ("weights", "outputs@noise", "features@donor~0.25", "agreement@others", "outputs@others+donor~0.05"):
        DatafreeSection((text,))
        Rule.parse(text)
    assert Rule.parse("outputs@others+donor~0.05") == Rule("outputs", "others+donor", 0.05)
    assert Rule.parse("outputs@others+donor~0.05").name == "outputs@others+donor~0.05"
    refuses(r"image source 'self'; known: noise, donor, others, synth \(or several joined by \+\)", lambda: Rule.parse("outputs@others+self"))
    refuses(r"an image source is named twice in 'donor\+donor'", lambda: Rule.parse("outputs@donor+donor"))
    for text in ("weights@donor", "outputs@self", "outputs~x", "outputs~-1", "outputs@others+", "weights@others+donor"):
        refuses("data-free rule", lambda: DatafreeSection((text,)))
        refuses("data-free rule", lambda: Rule.parse(text))


def test_controls_section():
    assert ControlsSection.from_config({}) == ControlsSection(1, ())
    got = ControlsSection.from_config({"random_controls": 3, "merged_donors": ["mean", "ties"]})
    assert got == ControlsSection(3, ("mean", "ties"))
    assert ControlsSection.from_config({"random_controls": 3, "merged_donors": ["mean"]}, ["merged_donors"]) == ControlsSection(1, ("mean",))
    assert ControlsSection.from_config({"random_controls": 1, "merged_donors": []}).fingerprint() == ControlsSection().fingerprint()
    distinct(ControlsSection(), ControlsSection(2), ControlsSection(merged_donors=("sum",)), ControlsSection(merged_donors=("mean",)))
    refuses(r"^random_controls must be an integer >= 1, got 0$", lambda: ControlsSection.from_config({"random_controls": 0}))
    refuses(r"^merged_donors: unknown merge method 'max'; known: sum, mean, ties", lambda: ControlsSection.from_config({"merged_donors": ["max"]}))
    refuses(r"^merged_donors: a method is named twice", lambda: ControlsSection.from_config({"merged_donors": ["sum", "sum"]}))
    refuses(r"^merged_donors must be a list of merge methods, got 'sum'$", lambda: ControlsSection.from_config({"merged_donors": "sum"}))


# ------------------------------------------------------------------ one home each, and no torch
def test_the_names_known_without_torch_are_the_registries():
    from qvlib import datafree, merging, quant, sections
    from qvlib.data import registry, synthetic

    assert tuple(synthetic.GENERATORS) == sections.GENERATORS
    assert set(registry.REGISTRY) == set(sections.BUILTIN_TASKS) and registry.known_tasks() == sections.known_task_names()
    assert set(quant.SCALES) == set(sections.BUILTIN_SCALES)
    assert set(merging.MERGE_METHODS) == set(sections.BUILTIN_MERGE_METHODS)
    assert set(datafree.LAMBDA_CRITERIA) == set(sections.BUILTIN_CRITERIA)
    assert tuple(datafree.INPUT_MEASURES) == sections.INPUT_MEASURES and tuple(datafree.IMAGE_SOURCES) == sections.IMAGE_SOURCES


def test_moved_classes_are_the_same_objects_where_they_were():
    from qvlib import models, quant, train
    from qvlib.data import base, registry

    assert quant.QuantSpec is QuantSpec and quant.QuantPolicy is QuantPolicy and quant.DEFAULT_POLICY == QuantPolicy()
    assert train.TrainConfig is TrainConfig and base.Preprocess is Preprocess and registry.LoadOptions is LoadOptions
    assert models.ARCH_OVERRIDES == tuple(TINY["overrides"]) + ("mlp_ratio",)


def test_a_plugin_scale_is_known_while_registered():
    from qvlib.quant import SCALES, register_scale

    register_scale("plugin_scale_test")(lambda blocks, spec: blocks.abs().amax(dim=1, keepdim=True))
    try:
        assert QuantSection.from_config({"scale": "plugin_scale_test"}).tags == ["w3-channel-plugin_scale_test"]
    finally:
        SCALES.pop("plugin_scale_test")
    refuses("scale must be one of", lambda: QuantSpec(scale="plugin_scale_test"))


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_what_the_dag_imports_imports_neither_torch_nor_timm():
    """workflow/rules/common.smk's imports, and every section and accessor it reads, without torch or timm."""
    run_python(f"""
import sys, yaml
from pathlib import Path
from snakemake.utils import validate
from qvlib.config import DAG_CACHE, Config, check_finite
from qvlib.store import DEFAULT_STORE, JOB_FILE, KEY_PATTERN, LAYOUT, LOG_FILE, MERGED_PREFIX, OUTPUTS, Plan
from qvlib.vocab import merged_donor
import qvlib.sections
raw = yaml.safe_load(Path({str(REPO / 'config' / 'paper.yaml')!r}).read_text())
validate(raw, {str(REPO / 'workflow' / 'schemas' / 'config.schema.yaml')!r})
cfg = Config(raw, Path('paper.yaml'))
check_finite(raw, 'paper.yaml')
quants = {{s.tag: s for s in cfg.quants}}
assert cfg.policy.pattern and str(cfg.lambda_ties) == 'smallest' and not cfg.oracle_search
for arch in cfg.arch_names:
    cfg.arch_section(arch)
    for task in cfg.task_names:
        cfg.finetune_train(task, arch)
cfg.load_options(cfg.task_names[0], qvlib.sections.Preprocess(224))
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))
assert not loaded, loaded
""")


def test_the_shipped_configs_parse_into_sections():
    for path in (TEST_CONFIG, *(REPO / "config").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for name, arch in (raw.get("archs") or {}).items():
            ArchSection.from_config(name, arch)
        for name, task in (raw.get("tasks") or {}).items():
            TaskSection.from_config(name, task, raw.get("task_defaults"))
        if "finetune" in raw:
            TrainSettings.from_config(raw["finetune"], "finetune")
        if "pretrain" in raw:
            PretrainSection.from_config(raw["pretrain"])
        QuantSection.from_config(raw.get("quant"))
        QuantPolicy.from_config(raw.get("policy"))
        EvaluateSection.from_config(raw.get("evaluate"))
        DatafreeSection.from_config(raw.get("datafree"))
        for section in (DataSection, LambdaSection, ControlsSection):
            section.from_config(raw)
        assert json.dumps(LambdaSection.from_config(raw).canonical())  # plain JSON data
