# Shared helpers: config validation, the effective config file every `qv` call reads, paths,
# resources. Nothing here knows the method.
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from qvlib.config import DAG_CACHE, Config, check_finite
from qvlib.fileio import write_text
from qvlib.store import JOB_FILE, KEY_PATTERN, LAYOUT, LOG_FILE, MERGED_PREFIX, OUTPUTS
from qvlib.vocab import merged_donor

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
    Config(config, Path(CONFIG_SOURCE)).check(cache=DAG_CACHE)  # timm's answers kept under .snakemake/qvlib
except ValueError as err:
    sys.exit(f"invalid config: {err}")  # one line, no traceback

NAME = config["name"]
OUT = f"results/{NAME}"  # this config's own tables, figures and summary
LOGS = f"logs/{NAME}"
ARCHS = list(config["archs"])
TASKS = list(config["tasks"])
# The cluster job group of a receiver's row of transfer cells (ignored when running locally); the Slurm
# profile's group-components names this same template.
ROW_GROUP = "row-{arch}-seed{seed}-{quant}-{receiver}"


# The validated config (defaults filled in), kept beside the config's report as the record of the run.
CONFIG = f"{OUT}/config.yaml"


def write_if_changed(path, text):
    if not Path(path).exists() or Path(path).read_text() != text:
        write_text(path, text)


def write_run_record():
    """Write CONFIG and the config's store manifest (results/<name>/store.json: every job's kind, labels,
    key and folder), only when they change. Called when jobs are about to run (onstart), so that a dry
    run writes nothing."""
    write_if_changed(CONFIG, yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True))
    write_if_changed(f"{OUT}/store.json", json.dumps(PLAN.manifest(), indent=1) + "\n")


onstart:
    write_run_record()


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
# interpolation and crop agree share one cache per task.
PLAN = RUN_CONFIG.store_plan(cache=DAG_CACHE)  # timm's answers (each arch's pixels) kept under .snakemake/qvlib
# Every expensive output (backbones, FT, QAT, vectors, merges, caches, baselines, cells, diagnostics)
# lives in the shared store, at a folder keyed by what its job reads (qvlib.store): configs that agree
# on a job share it, whatever their names.
STORE = PLAN.root
if os.path.abspath(OUT) == os.path.abspath(STORE) or os.path.abspath(OUT).startswith(os.path.abspath(STORE) + os.sep):
    sys.exit(f"invalid config: name {NAME!r} puts its reports ({OUT}) inside the store ({STORE}): choose another name")
JOBS = list(PLAN.jobs())
MERGED = PLAN.methods
DONORS = PLAN.donors


def job_of(wildcards):
    return PLAN.by_key[wildcards.key]


def store_output(kind, output):
    """A rule's output pattern: the kind's folder (qvlib.store.LAYOUT) with the job's key, and the file
    (``job``: the job file it runs from; ``log``: its log)."""
    name = {"job": JOB_FILE, "log": LOG_FILE}.get(output) or OUTPUTS[kind][output]
    return f"{STORE}/{LAYOUT[kind]}/{{key}}/{name}"


def store_log(kind):
    return store_output(kind, "log")


def store_outputs(kind):
    return {name: store_output(kind, name) for name in OUTPUTS[kind]}


def job_inputs(wildcards):
    """The files a job reads: its inputs in the plan (qvlib.store), by name."""
    return job_of(wildcards).input_files()


def job_file(wildcards):
    """The job's file (what it reads of the config, its labels and inputs) as one shell-quoted JSON word."""
    return shlex.quote(json.dumps(job_of(wildcards).document(), sort_keys=True))


def backbone_flag(wildcards, input):
    """``--backbone FILE`` for a job whose arch starts from a pretrained demo backbone, else nothing."""
    return f"--backbone {input.backbone}" if "backbone" in input.keys() else ""


def inputs_named(wildcards, prefix):
    return [path for name, path in job_inputs(wildcards).items() if name.startswith(prefix)]


wildcard_constraints:
    arch="|".join(re.escape(a) for a in ARCHS),
    task="|".join(re.escape(t) for t in TASKS),
    receiver="|".join(re.escape(t) for t in TASKS),
    donor="|".join(re.escape(d) for d in DONORS),
    method="|".join(re.escape(m) for m in MERGED) or "no-merge-method",
    pixels="|".join(re.escape(p) for p, _ in PLAN.pixels.values()),
    quant="|".join(re.escape(q) for q in QUANTS),
    seed=r"-?\d+",
    key=KEY_PATTERN,


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


def final_outputs():
    """Every store job's files and the config's reports: a deleted store file is then a missing target, so
    rerunning recomputes exactly it and what is derived from it."""
    files = [path for job in JOBS for path in job.files]
    for arch in ARCHS:
        files += [f"{OUT}/{arch}/{name}" for name in REPORT_FILES]
        files += [f"{OUT}/{arch}/{quant}/{name}" for quant in QUANTS for name in [*FIGURE_FILES, *PAPER_FILES.values()]]
    return files


def jobs_of(kind, arch, output):
    """The files ``output`` of every job of ``kind`` on ``arch``, in the plan's order (every seed, quantizer, task)."""
    return [job.file(output) for job in JOBS if job.kind == kind and job.labels.get("arch") == arch]
