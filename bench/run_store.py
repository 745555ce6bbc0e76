"""Where a run's workflow outputs are, for the benchmarks that read them (not a benchmark itself).

The workflow keeps every model, vector, cached split and cell in the shared store (qvlib.store:
``<store>/<kind>/<labels...>/<key>/``) and only the config's reports under ``results/<name>/``. A
benchmark names a run by its report folder ``results/<name>/<arch>`` (``--results``) and finds a
job's file here: in the run's manifest ``results/<name>/store.json`` (every job of its last
invocation), else in the plan of the run's effective config ``results/<name>/config.yaml`` (or the
config given), which the workflow keys the same way (e.g. a seed an earlier invocation ran).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qvlib.config import Config  # noqa: E402
from qvlib.store import MERGED_PREFIX, OUTPUTS, Plan  # noqa: E402

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def effective(raw: dict) -> dict:
    """A parsed config validated with its defaults filled in, as the workflow plans it (the run's own
    results/<name>/config.yaml already is)."""
    from snakemake.utils import validate

    raw = copy.deepcopy(raw)
    validate(raw, str(SCHEMA))
    return raw


def plan_of(raw: dict) -> Plan:
    """The store plan of an effective config, as workflow/rules/common.smk builds it."""
    return Config(raw, Path("config.yaml")).store_plan()


class RunStore:
    """The store files of the run whose reports are in ``results`` (``results/<name>/<arch>``), at its
    arch. ``cfg``: the config to plan with (default: the run's own ``config.yaml``); its seeds may
    differ from the last invocation's, each seed's jobs are keyed alone."""

    def __init__(self, results: Path, cfg: Config | None = None):
        self.results = Path(results)
        self.arch = self.results.name
        self.out = self.results.parent  # results/<name>
        self.base = self.out.parent.parent  # the folder the workflow ran in: store paths are relative to it
        self.cfg = cfg or Config.load(self.out / "config.yaml")
        manifest = self.out / "store.json"
        self.rows = json.loads(manifest.read_text()) if manifest.exists() else []
        self._plan: Plan | None = None

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = plan_of(effective(dict(self.cfg.raw)))
        return self._plan

    def _labels(self, kind: str, labels: dict[str, Any]) -> dict[str, str]:
        if kind == "cache":  # caches are labelled by pixels, shared by the archs with the same ones
            from qvlib.pipeline import arch_pixels

            return {"pixels": arch_pixels(self.cfg, self.arch), **{k: str(v) for k, v in labels.items()}}
        return {"arch": self.arch, **{k: str(v) for k, v in labels.items()}}

    def folder(self, kind: str, **labels: Any) -> Path:
        """The folder of the one job of ``kind`` with ``labels`` (arch and, for caches, pixels implied)."""
        want = self._labels(kind, labels)
        found = [r for r in self.rows if r["kind"] == kind and all(str(r.get(k)) == v for k, v in want.items())]
        if len(found) == 1:
            return self.base / found[0]["folder"]
        if found:
            raise ValueError(f"{len(found)} {kind} jobs of {self.out}/store.json have labels {want}, not one")
        return self.base / self.plan.where(kind, **want)

    def file(self, kind: str, output: str, **labels: Any) -> Path:
        """A job's output file (a name of qvlib.store.OUTPUTS[kind]), which must exist."""
        path = self.folder(kind, **labels) / OUTPUTS[kind][output]
        if not path.exists():
            raise FileNotFoundError(f"{path}: the {kind} job {labels} of {self.out} has not run (run the workflow first)")
        return path

    # the files the benchmarks read
    def ft(self, task: str, seed: int) -> Path:
        return self.file("ft", "ckpt", task=task, seed=seed)

    def vector(self, task: str, seed: int, quant: str) -> Path:
        return self.file("vector", "vector", task=task, seed=seed, quant=quant)

    def merged(self, receiver: str, method: str, seed: int, quant: str) -> Path:
        """The receiver's leave-one-out merge of every other task's vector."""
        return self.file("merged", "vector", receiver=receiver, method=method, seed=seed, quant=quant)

    def split(self, task: str, split: str) -> Path:
        """A task's cached ``test`` or ``calib`` split at the arch's pixels."""
        return self.file("cache", str(split), task=task)

    def baselines(self, task: str, seed: int, quant: str) -> Path:
        return self.file("baselines", "table", task=task, seed=seed, quant=quant)

    def cell(self, receiver: str, donor: str, seed: int, quant: str) -> Path:
        """One transfer cell; ``donor`` a task or ``merged-<method>``."""
        return self.file("cell", "table", receiver=receiver, donor=donor, seed=seed, quant=quant)

    def cells(self, seed: int, quant: str) -> list[Path]:
        """Every cell of a seed and quantizer (the single donors, the receiver itself, the merged donors)."""
        donors = [*self.cfg.task_names, *(f"{MERGED_PREFIX}{m}" for m in self.cfg.merged_donors)]
        return [self.cell(r, d, seed, quant) for r in self.cfg.task_names for d in donors]
