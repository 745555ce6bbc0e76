"""The shared result store: every expensive output at a path keyed by exactly what its job reads.

A job (pretraining a backbone, FT, QAT, extracting a vector, a leave-one-out merge, caching a task's
splits, a task's baselines, one transfer cell, a seed's diagnostics) reads a few top-level sections
of the run config, narrowed to its own arch, task, seed and quantizer, and the files of earlier
jobs. Its key hashes those sections in their canonical form (qvlib.sections.key_settings: defaults
filled in, checkpoint and log intervals left out), its labels and its inputs' keys; its folder is
``<store>/<kind>/<labels...>/<key>/`` and holds its outputs, ``job.json`` (what it read) and
``job.log``. Two configs that agree on what a job reads share the folder, whatever their names;
a setting the job does not read cannot change its key, and the job cannot read a setting its key
leaves out: it runs from its ``job.json``, and :class:`ReadGuard` refuses any other key.

Only ``results/<name>/`` (the config's tables, figures and summary) belongs to one config. Nothing
here imports torch: the workflow builds its DAG from this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

# Bumped when a change of qvlib's code changes what a job writes for the same settings: every key moves.
STORE_VERSION = 1
JOB = "job"  # the key of a job file's own description (kind, key, labels, reads, inputs)
DEFAULT_STORE = "results/store"

# What decides a task's data: its own options (``train`` left out: it keys the fine-tuning jobs alone),
# the defaults of every task, where real datasets live, the data seed, the calib split's position and
# whether torchvision may download.
DATA = ("tasks", "task_defaults", "data_root", "data_seed", "calib_position", "download")

# The top-level config keys each kind of job reads (narrowed to its arch, tasks, seed and quantizer).
READS: dict[str, tuple[str, ...]] = {
    "backbone": ("archs", "pretrain", "data_seed", "seeds", "reuse_backbones"),
    "ft": ("archs", *DATA, "finetune", "policy", "seeds"),
    "qat": ("archs", *DATA, "finetune", "policy", "seeds", "quant"),
    "vector": ("policy",),
    "merged": (),
    "cache": (*DATA, "preprocess"),
    "baselines": ("archs", "quant", "policy", "seeds", "evaluate"),
    "cell": ("archs", "quant", "policy", "seeds", "evaluate", "lambdas", "lambda_search", "oracle_search",
             "random_controls", "datafree", *DATA),
    "diagnostics": ("archs", "quant", "policy", "seeds"),
}

# Each kind's folder under the store (its labels, in this order) and the files it writes there.
LAYOUT: dict[str, str] = {
    "backbone": "backbone/{arch}/seed{seed}",
    "ft": "ft/{arch}/{task}/seed{seed}",
    "qat": "qat/{arch}/{task}/{quant}/seed{seed}",
    "vector": "vector/{arch}/{task}/{quant}/seed{seed}",
    "merged": "merged/{arch}/{receiver}/{method}/{quant}/seed{seed}",
    "cache": "cache/{pixels}/{task}",
    "baselines": "baselines/{arch}/{task}/{quant}/seed{seed}",
    "cell": "cell/{arch}/{receiver}/{donor}/{quant}/seed{seed}",
    "diagnostics": "diagnostics/{arch}/{quant}/seed{seed}",
}
OUTPUTS: dict[str, dict[str, str]] = {
    "backbone": {"ckpt": "backbone.safetensors"},
    "ft": {"ckpt": "ft.safetensors", "metrics": "ft.metrics.json"},
    "qat": {"ckpt": "qat.safetensors", "metrics": "qat.metrics.json"},
    "vector": {"vector": "vector.safetensors"},
    "merged": {"vector": "merged.safetensors"},
    "cache": {"test": "test.safetensors", "calib": "calib.safetensors"},
    "baselines": {"table": "baselines.parquet"},
    "cell": {"table": "cell.parquet"},
    "diagnostics": {"norms": "norms.parquet", "cosine": "cosine.parquet"},
}
JOB_FILE, LOG_FILE = "job.json", "job.log"  # beside every job's outputs
KEY_PATTERN = "[0-9a-f]{12}"
MERGED_PREFIX = "merged-"  # a cell's donor folder for the receiver's leave-one-out merge: merged-<method>


def digest_of(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (store keys, checkpoint metadata)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def without_train(section: Any) -> Any:
    """An arch's or task's settings without its ``train`` keys (those key the fine-tuning jobs alone)."""
    if not isinstance(section, Mapping):
        return section
    return {k: v for k, v in section.items() if k != "train"}


@dataclass(eq=False)
class Job:
    """One job of the store: its kind, labels (path parts), the config sections it reads and its inputs
    (name -> (job, output name)). ``key`` and ``folder`` follow from them."""

    kind: str
    labels: dict[str, Any]
    sections: dict[str, Any]
    inputs: dict[str, tuple["Job", str]] = field(default_factory=dict)
    root: str = DEFAULT_STORE

    def __post_init__(self) -> None:
        unread = set(self.sections) - set(READS[self.kind])
        if unread:
            raise ValueError(f"a {self.kind} job does not read {sorted(unread)}: add them to qvlib.store.READS")
        from .sections import key_settings  # sections hashes with this module's digest_of

        self.settings = key_settings(self.sections, READS[self.kind])
        self.key = digest_of(STORE_VERSION, self.kind, self.labels, self.settings,
                             {name: job.key for name, (job, _) in sorted(self.inputs.items())})
        self.folder = f"{self.root}/{LAYOUT[self.kind].format(**self.labels)}/{self.key}"

    def file(self, output: str) -> str:
        return f"{self.folder}/{OUTPUTS[self.kind][output]}"

    @property
    def files(self) -> list[str]:
        return [self.file(name) for name in OUTPUTS[self.kind]]

    def input_files(self) -> dict[str, str]:
        return {name: job.file(out) for name, (job, out) in self.inputs.items()}

    def document(self) -> dict[str, Any]:
        """The job file (``job.json``): what the job reads and is, a valid config for ``qv --config``."""
        head = {"kind": self.kind, "key": self.key, "version": STORE_VERSION, "labels": self.labels,
                "reads": list(READS[self.kind]), "inputs": self.input_files(), "settings": self.settings}
        return {JOB: head, **self.sections}


class ReadGuard(dict):
    """A job file's sections as a mapping that refuses the keys its kind does not read (a KeyError naming
    the key), so a job cannot depend on a setting its store key leaves out."""

    def __init__(self, sections: Mapping[str, Any], kind: str, head: Mapping[str, Any] | None = None):
        super().__init__(sections)
        self.kind = kind
        self.head = dict(head or {})  # the job file's own description: key, labels, inputs
        self.readable = set(READS[kind])

    def _check(self, key: Any) -> None:
        if key not in self.readable:
            raise KeyError(f"a {self.kind} job does not read the config key {key!r} (it is not in its store key): "
                           "add it to qvlib.store.READS")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self._check(key)
        return super().__contains__(key)


def guarded(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """A parsed config file: a job file's sections behind its ReadGuard, any other config as it is."""
    if JOB not in raw:
        return raw
    head = raw[JOB]
    if not isinstance(head, Mapping) or head.get("kind") not in READS:
        raise ValueError(f"not a job file: its {JOB!r} entry names no kind of job ({', '.join(READS)})")
    return ReadGuard({k: v for k, v in raw.items() if k != JOB}, head["kind"], head)


def _pick(raw: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: raw[k] for k in keys if k in raw}


def data_sections(raw: Mapping[str, Any], tasks: Sequence[str], keep_train: bool = False) -> dict[str, Any]:
    """What decides the data of ``tasks``: their own options (with ``train`` only if ``keep_train``)
    and every DATA key the config sets."""
    own = {t: (raw["tasks"][t] or {}) if keep_train else without_train(raw["tasks"][t] or {}) for t in tasks}
    return {"tasks": own, **_pick(raw, [k for k in DATA if k != "tasks"])}


def image_sources(criteria: Sequence[str]) -> set[str]:
    """The image sources of the data-free rules (``criterion@source~tolerance``, a joined ``a+b``
    counting as both) other than noise."""
    from .sections import source_parts, split_rule  # sections hashes with this module's digest_of

    return {part for text in criteria for part in source_parts(split_rule(text)[1]) if part != "noise"}


class Plan:
    """Every store job of a config (validated, defaults filled in), with the quantizers' own mappings by
    tag (``quants``) and each arch's pixels key and preprocessing fields (``pixels``: arch -> (key,
    fields)), which the caller computes (they need timm)."""

    def __init__(self, raw: Mapping[str, Any], quants: Mapping[str, Mapping[str, Any]],
                 pixels: Mapping[str, tuple[str, Mapping[str, Any]]], root: str = DEFAULT_STORE):
        self.raw, self.quants, self.pixels, self.root = raw, dict(quants), dict(pixels), root
        self.archs = list(raw["archs"])
        self.tasks = list(raw["tasks"])
        self.seeds = [int(s) for s in raw.get("seeds", [0])]
        self.methods = [str(m) for m in raw.get("merged_donors", [])]
        self.donors = self.tasks + [f"{MERGED_PREFIX}{m}" for m in self.methods]
        self.image_sources = image_sources((raw.get("datafree") or {}).get("criteria", []))
        self.by_key: dict[str, Job] = {}
        self._jobs: dict[tuple, Job] = {}

    def _add(self, ident: tuple, build) -> Job:
        if ident not in self._jobs:
            job = build()
            self._jobs[ident] = self.by_key.setdefault(job.key, job)
        return self._jobs[ident]

    def _job(self, kind: str, labels: dict, sections: dict, inputs: dict | None = None) -> Job:
        return Job(kind, labels, sections, inputs or {}, self.root)

    def _arch(self, arch: str, keep_train: bool = False) -> dict:
        section = self.raw["archs"][arch]
        return {"archs": {arch: section if keep_train else without_train(section)}}

    def _quant(self, quant: str) -> dict:
        return {"quant": dict(self.quants[quant])}

    def _common(self, arch: str, seed: int, quant: str | None = None) -> dict:
        out = {**self._arch(arch), **_pick(self.raw, ["policy"]), "seeds": [seed]}
        return {**out, **self._quant(quant)} if quant is not None else out

    def needs_pretrain(self, arch: str) -> bool:
        return (self.raw["archs"][arch].get("backbone") or {}).get("source") == "pretrain"

    # -- jobs, each built once
    def backbone(self, arch: str, seed: int) -> Job | None:
        if not self.needs_pretrain(arch):
            return None
        return self._add(("backbone", arch, seed), lambda: self._job(
            "backbone", {"arch": arch, "seed": seed},
            {**self._arch(arch), **_pick(self.raw, ["pretrain", "data_seed", "reuse_backbones"]), "seeds": [seed]}))

    def finetune(self, arch: str, task: str, seed: int, quant: str | None = None) -> Job:
        """FT (``quant`` None) or QAT with quantizer ``quant``."""
        kind = "ft" if quant is None else "qat"
        labels = {"arch": arch, "task": task, "seed": seed, **({"quant": quant} if quant else {})}

        def build():
            backbone = self.backbone(arch, seed)
            sections = {**self._arch(arch, keep_train=True), **data_sections(self.raw, [task], keep_train=True),
                        **_pick(self.raw, ["finetune", "policy"]), "seeds": [seed],
                        **(self._quant(quant) if quant else {})}
            return self._job(kind, labels, sections, {"backbone": (backbone, "ckpt")} if backbone else {})
        return self._add((kind, arch, task, seed, quant), build)

    def vector(self, arch: str, task: str, seed: int, quant: str) -> Job:
        return self._add(("vector", arch, task, seed, quant), lambda: self._job(
            "vector", {"arch": arch, "task": task, "quant": quant, "seed": seed}, _pick(self.raw, ["policy"]),
            {"qat": (self.finetune(arch, task, seed, quant), "ckpt"), "ft": (self.finetune(arch, task, seed), "ckpt")}))

    def merged(self, arch: str, receiver: str, method: str, seed: int, quant: str) -> Job:
        """The receiver's leave-one-out merge: every other task's vector (never its own)."""
        return self._add(("merged", arch, receiver, method, seed, quant), lambda: self._job(
            "merged", {"arch": arch, "receiver": receiver, "method": method, "quant": quant, "seed": seed}, {},
            # in task-name order: the merge's bytes (a float sum) must not depend on the config's task order
            {f"vector:{t}": (self.vector(arch, t, seed, quant), "vector") for t in sorted(self.tasks) if t != receiver}))

    def cache(self, arch: str, task: str) -> Job:
        """A task's test and calib splits at the arch's pixels: shared by every arch with the same pixels."""
        key, fields = self.pixels[arch]
        return self._add(("cache", key, task), lambda: self._job(
            "cache", {"pixels": key, "task": task},
            {**data_sections(self.raw, [task]), "preprocess": dict(fields)}))

    def baselines(self, arch: str, task: str, seed: int, quant: str) -> Job:
        return self._add(("baselines", arch, task, seed, quant), lambda: self._job(
            "baselines", {"arch": arch, "task": task, "quant": quant, "seed": seed},
            {**self._common(arch, seed, quant), **_pick(self.raw, ["evaluate"])},
            {"ft": (self.finetune(arch, task, seed), "ckpt"), "qat": (self.finetune(arch, task, seed, quant), "ckpt"),
             "test": (self.cache(arch, task), "test"), "calib": (self.cache(arch, task), "calib")}))

    def cell_tasks(self, receiver: str, donor: str) -> list[str]:
        """The tasks a cell reads: the receiver, a single donor, and the tasks whose training images its
        data-free rules score lambdas on (every other task for ``@others``; the merged donor's tasks for
        ``@donor``)."""
        sources = self.image_sources
        merged = donor.startswith(MERGED_PREFIX)
        if "others" in sources or (merged and "donor" in sources):
            return list(self.tasks)
        return [receiver] if merged or donor == receiver else [receiver, donor]

    def cell(self, arch: str, receiver: str, donor: str, seed: int, quant: str) -> Job:
        def build():
            if donor.startswith(MERGED_PREFIX):
                vector = self.merged(arch, receiver, donor.removeprefix(MERGED_PREFIX), seed, quant)
            else:
                vector = self.vector(arch, donor, seed, quant)
            keys = ["evaluate", "lambdas", "lambda_search", "oracle_search", "random_controls", "datafree"]
            sections = {**self._common(arch, seed, quant), **_pick(self.raw, keys),
                        **data_sections(self.raw, self.cell_tasks(receiver, donor))}
            return self._job("cell", {"arch": arch, "receiver": receiver, "donor": donor, "quant": quant, "seed": seed},
                             sections, {"ft": (self.finetune(arch, receiver, seed), "ckpt"), "vector": (vector, "vector"),
                                        "test": (self.cache(arch, receiver), "test"),
                                        "calib": (self.cache(arch, receiver), "calib")})
        return self._add(("cell", arch, receiver, donor, seed, quant), build)

    def diagnostics(self, arch: str, seed: int, quant: str) -> Job:
        def build():
            inputs: dict[str, tuple[Job, str]] = {}
            backbone = self.backbone(arch, seed)
            if backbone:
                inputs["backbone"] = (backbone, "ckpt")
            for t in self.tasks:
                inputs[f"ft:{t}"] = (self.finetune(arch, t, seed), "ckpt")
                inputs[f"vector:{t}"] = (self.vector(arch, t, seed, quant), "vector")
            for r in self.tasks:
                for m in self.methods:
                    inputs[f"merged:{r}.{m}"] = (self.merged(arch, r, m, seed, quant), "vector")
            return self._job("diagnostics", {"arch": arch, "quant": quant, "seed": seed}, self._common(arch, seed, quant), inputs)
        return self._add(("diagnostics", arch, seed, quant), build)

    # -- the whole grid
    def jobs(self) -> Iterator[Job]:
        """Every job of the config, each once, in a stable order."""
        for arch in self.archs:
            for seed in self.seeds:
                for quant in self.quants:
                    for task in self.tasks:
                        self.baselines(arch, task, seed, quant)
                        for donor in self.donors:
                            self.cell(arch, task, donor, seed, quant)
                    self.diagnostics(arch, seed, quant)
        seen: set[str] = set()
        for job in self._jobs.values():
            if job.key not in seen:
                seen.add(job.key)
                yield job

    def where(self, kind: str, output: str | None = None, **labels: Any) -> str:
        """The folder of the one job of ``kind`` with ``labels`` (or its file ``output``), e.g.
        ``plan.where("ft", "ckpt", arch="tiny", task="shapes", seed=0)``."""
        found = [job for job in self.jobs() if job.kind == kind and
                 all(str(job.labels.get(k)) == str(v) for k, v in labels.items())]
        if len(found) != 1:
            raise ValueError(f"{len(found)} {kind} jobs have labels {labels}, not one")
        return found[0].file(output) if output else found[0].folder

    def manifest(self) -> list[dict[str, Any]]:
        """One row per job: kind, labels, key and folder (results/<name>/store.json)."""
        return [{"kind": job.kind, **{k: job.labels.get(k) for k in job.labels}, "key": job.key, "folder": job.folder}
                for job in self.jobs()]
