"""Shared test helpers: a miniature config, running `qv` / snakemake from the venv and finding a
config's files in the shared store."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from qvlib.store import OUTPUTS

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def env():
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e["HF_HUB_OFFLINE"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    return e


TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"


QUANT = "w2-channel"  # the miniature's quantizer tag (.test/config/config.yaml)


def mini_config(path: Path, name="mini", tasks=None, pretrain=True, **extra) -> Path:
    """``.test/config/config.yaml`` (a whole grid in about a minute on one core) written to ``path``
    with its data root beside it and the given keys replaced."""
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg.update(name=name, data_root=str(path.parent / "data"))
    if tasks is not None:
        cfg["tasks"] = {t: {} for t in tasks}
    if not pretrain:
        cfg["archs"]["tiny"]["backbone"] = {"source": "random", "seed": 0}
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def qv(*args, check=True, cwd=None):
    proc = subprocess.run([str(BIN / "qv"), *map(str, args)], capture_output=True, text=True, env=env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"qv {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def snakemake(workdir: Path, configfile: Path, *args, check=True):
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts


def store_entries(workdir: Path, name: str = "mini", kind: str | None = None, **labels) -> list[dict]:
    """The rows of ``<workdir>/results/<name>/store.json`` (written when the config's jobs start) of
    ``kind`` (any kind if None) whose labels equal ``labels`` (compared as strings: seed=0 or "0")."""
    rows = json.loads((Path(workdir) / "results" / name / "store.json").read_text())
    return [row for row in rows if (kind is None or row["kind"] == kind)
            and all(k in row and str(row[k]) == str(v) for k, v in labels.items())]


def stored(workdir: Path, name: str, kind: str, output: str | None = None, **labels) -> Path:
    """The store folder of the one job of ``kind`` with ``labels`` in config ``name``'s store.json (or
    its file ``output``, a name of qvlib.store.OUTPUTS[kind], e.g. ``"ckpt"``), as a path under
    ``workdir``. Fails unless exactly one job matches."""
    rows = store_entries(workdir, name, kind, **labels)
    if len(rows) != 1:
        raise AssertionError(f"{len(rows)} {kind} jobs of {name!r} have labels {labels}, not one")
    folder = Path(workdir) / rows[0]["folder"]
    return folder / OUTPUTS[kind][output] if output else folder


def plan_of(configfile: Path):
    """The store plan (qvlib.store.Plan) the workflow builds from ``configfile``, as workflow/rules/common.smk
    builds it (the schema's defaults filled in): where a job's files will be before any run has written
    store.json. Tests that use it also check it against a run's store.json (tests/test_workflow.py)."""
    from snakemake.utils import validate

    from qvlib.config import Config

    config = yaml.safe_load(Path(configfile).read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return Config(config, Path(configfile)).store_plan()


def planned(workdir: Path, configfile: Path, kind: str, output: str | None = None, **labels) -> Path:
    """Where ``configfile``'s one job of ``kind`` with ``labels`` puts its folder (or file ``output``) under
    ``workdir``, before it runs (see plan_of)."""
    return Path(workdir) / plan_of(configfile).where(kind, output, **labels)
