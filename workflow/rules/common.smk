# Shared helpers: config validation, the effective config file every `qv` call reads, paths,
# resources. Nothing here knows the method.
import json
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from qvlib.config import Config, check_finite, digest_of as digest
from qvlib.data.cache import cache_relpath
from qvlib.data.registry import reads_image_files
from qvlib.pipeline import arch_pixels
from qvlib.vocab import Mode, merged_donor

if "seeds" in config:  # `--config seeds=[0,1,2]` arrives as strings
    config["seeds"] = [int(s) if isinstance(s, str) and s.lstrip("-").isdigit() else s for s in config["seeds"]]
if config.get("reuse_backbones") == "null":  # `--config reuse_backbones=null` arrives as a string
    config["reuse_backbones"] = None
validate(config, "../schemas/config.schema.yaml")
# What JSON schema cannot say, checked before any job is planned (one line naming the key): every number
# finite, task and generator names known, the policy's regex, each arch a timm ViT whose quantized widths
# the group sizes divide, and each job's training settings.
CONFIG_SOURCE = " + ".join(map(str, workflow.overwrite_configfiles or ["config/config.yaml"]))
try:
    check_finite(config, CONFIG_SOURCE)
    Config(config, Path(CONFIG_SOURCE)).check()
except ValueError as err:
    sys.exit(f"invalid config: {err}")  # one line, no traceback

NAME = config["name"]
OUT = f"results/{NAME}"
LOGS = f"logs/{NAME}"
ARCHS = list(config["archs"])
TASKS = list(config["tasks"])
SEEDS = list(config["seeds"])
# Per replicate: everything trained or evaluated at one seed. Caches hold data only and are shared.
RUN = f"{OUT}/{{arch}}/seed{{seed}}"
RUN_LOGS = f"{LOGS}/{{arch}}/seed{{seed}}"
# Per quantizer of a replicate (named by its tag, e.g. w3-channel): QAT, vectors, baselines, cells.
# FT does not read the quantizer and stays in RUN, shared by every quantizer.
QRUN = f"{RUN}/{{quant}}"
QRUN_LOGS = f"{RUN_LOGS}/{{quant}}"
# The cluster job group of a receiver's row of transfer cells (ignored when running locally); the Slurm
# profile's group-components names this same template.
ROW_GROUP = "row-{arch}-seed{seed}-{quant}-{receiver}"


# The validated config (defaults filled in) as the one file every `qv` call reads (--config).
CONFIG = f"{OUT}/config.yaml"


def write_effective_config():
    """Write CONFIG, only when it changes. Called when jobs are about to run (onstart), so that a dry run
    writes nothing; jobs spawned on other nodes read the file the main process wrote."""
    path = Path(CONFIG)
    text = yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


onstart:
    write_effective_config()


RUN_CONFIG = Config(config, Path(CONFIG))
QUANTS = {spec.tag: spec for spec in RUN_CONFIG.quants}
# What `qv extract` selects: the config's quantized pattern and training scope, each shell-quoted (a
# config string never reaches a shell line unquoted; names and tags are restricted by the schema).
POLICY_ARGS = f"--pattern {shlex.quote(RUN_CONFIG.policy.pattern)} --scope {shlex.quote(RUN_CONFIG.policy.scope)}"
# Which of several best lambdas the tables' oracle and calib picks keep (a schema enum: safe in a shell line).
LAMBDA_TIES = str(RUN_CONFIG.lambda_ties)
# Every rule runs the `qv` command through this repository's qvlib, so the same shell lines work in the
# project's venv and in the per-rule conda environment (envs/qvlib.yaml, `--sdm conda`).
QV = f"PYTHONPATH={shlex.quote(str(Path(workflow.basedir).resolve()))}${{PYTHONPATH:+:$PYTHONPATH}} python -m qvlib.cli"

# Caches hold preprocessed pixels only (normalisation happens on the device), so archs whose input size,
# interpolation and crop agree share one cache per task: results/<name>/cache/<pixels>/<task>.<split>.
PIXELS = {arch: arch_pixels(RUN_CONFIG, arch) for arch in ARCHS}


def cache_file(arch, task, split):
    return f"{OUT}/{cache_relpath(PIXELS[arch], task, split)}"


def pixels_arch(pixels):
    """The first arch whose preprocessing a cache folder holds: it writes that cache for all of them."""
    return next(arch for arch in ARCHS if PIXELS[arch] == pixels)


# Leave-one-out merged donors (one per merge method): file label merged-<method>, table label merged:<method>.
MERGED = list(config.get("merged_donors", []))
MERGED_FILE_PREFIX = "merged-"
DONORS = TASKS + [f"{MERGED_FILE_PREFIX}{m}" for m in MERGED]

wildcard_constraints:
    arch="|".join(ARCHS),
    task="|".join(TASKS),
    receiver="|".join(TASKS),
    donor="|".join(DONORS),
    method="|".join(MERGED) or "no-merge-method",
    pixels="|".join(re.escape(p) for p in PIXELS.values()),
    quant="|".join(re.escape(q) for q in QUANTS),
    seed=r"-?\d+",


def res(step, key, default):
    return config.get("resources", {}).get(step, {}).get(key, default)


def threads_of(step):
    return res(step, "threads", 1)


def resources_of(step):
    """mem_mb, runtime (minutes) and gpu for a step, from the config's `resources` section."""
    return dict(
        mem_mb=res(step, "mem_mb", 4000),
        runtime=res(step, "runtime", 60),
        gpu=res(step, "gpu", 0),
    )


def needs_pretrain(arch):
    return config["archs"][arch].get("backbone", {}).get("source") == "pretrain"


def quant_json(wildcards):
    """The quantizer of a job's {quant} wildcard, as recorded in files (absmax scale left out)."""
    return QUANTS[wildcards.quant].to_json()


def backbone_input(wildcards):
    return [f"{OUT}/{wildcards.arch}/seed{wildcards.seed}/backbone.safetensors"] if needs_pretrain(wildcards.arch) else []


def backbone_flag(wildcards, input):
    return f"--backbone {input.backbone}" if input.backbone else ""


def without_train(section):
    """A task's or arch's settings without its train keys (those key the fine-tuning jobs alone)."""
    return section if not section or "train" not in section else {k: v for k, v in section.items() if k != "train"}


def arch_digest(arch):
    return digest(without_train(config["archs"][arch]), config.get("pretrain") if needs_pretrain(arch) else None)


# Tasks read from image files are resized by PIL before they become tensors (the authors' order) since
# this marker joined their settings hash: caches and FT runs made with the earlier tensor resize rebuild.
# Embedded tasks (generated, or arrays shipped in a package) never decode a file and keep their hash.
PIL_RESIZE = "pil-resize"


def task_digest(task):
    options = config["tasks"][task] or {}
    marker = [PIL_RESIZE] if reads_image_files(task, options) else []
    return digest(without_train(config["tasks"][task]), config.get("task_defaults"), config.get("data_root"),
                  config.get("data_seed"), *optional(config, "calib_position"), *marker)


def train_overrides(arch, task):
    """The arch's and the task's own train keys over `finetune` (nothing where neither has any, so runs
    without them keep their settings hash)."""
    sections = [config["archs"][arch].get("train") or {}, (config["tasks"][task] or {}).get("train") or {}]
    return sections if any(sections) else []


def train_digest(wildcards, *extra):
    """What decides an FT (QAT: ``extra`` = its quantizer) run: the arch, the task, finetune < the arch's
    train < the task's train, and the policy (runs without arch or task train keys keep their old hash)."""
    return digest(arch_digest(wildcards.arch), task_digest(wildcards.task), config["finetune"], config.get("policy"),
                  *extra, *train_overrides(wildcards.arch, wildcards.task))


def final_outputs():
    """Every per-task and per-cell result as well as the reports: a deleted intermediate file is then
    a missing target, so rerunning recomputes exactly it and what is derived from it."""
    files = []
    for arch in ARCHS:
        files += [f"{OUT}/{arch}/{name}" for name in REPORT_FILES]
        files += [f"{OUT}/{arch}/{quant}/{name}" for quant in QUANTS for name in [*FIGURE_FILES, *PAPER_FILES.values()]]
        for seed in SEEDS:
            run = f"{OUT}/{arch}/seed{seed}"
            files += [f"{run}/checkpoints/{task}.{Mode.FT}.safetensors" for task in TASKS]
            for quant in QUANTS:
                qrun = f"{run}/{quant}"
                files += [f"{qrun}/checkpoints/{task}.{Mode.QAT}.safetensors" for task in TASKS]
                files += [f"{qrun}/vectors/{task}.safetensors" for task in TASKS]
                files += [f"{qrun}/baselines/{task}.parquet" for task in TASKS]
                files += [f"{qrun}/vectors/loo/{r}.{m}.safetensors" for r in TASKS for m in MERGED]
                files += [f"{qrun}/transfer/{r}/{d}.parquet" for r in TASKS for d in DONORS]
    return files


def donor_vector(wildcards):
    """A cell's donor vector: a task's own, or the receiver's leave-one-out merge (merged-<method>)."""
    if wildcards.donor.startswith(MERGED_FILE_PREFIX):
        method = wildcards.donor.removeprefix(MERGED_FILE_PREFIX)
        return f"{OUT}/{wildcards.arch}/seed{wildcards.seed}/{wildcards.quant}/vectors/loo/{wildcards.receiver}.{method}.safetensors"
    return f"{OUT}/{wildcards.arch}/seed{wildcards.seed}/{wildcards.quant}/vectors/{wildcards.donor}.safetensors"


def donor_label(wildcards):
    """The donor's name in the tables: the task, or merged:<method>."""
    if wildcards.donor.startswith(MERGED_FILE_PREFIX):
        return merged_donor(wildcards.donor.removeprefix(MERGED_FILE_PREFIX))
    return wildcards.donor


def optional(cfg, key):
    """``[cfg[key]]`` where the config sets it, else nothing: a section added after results existed
    joins a job's settings hash without changing the hash of runs that leave it out."""
    return [cfg[key]] if key in cfg else []
