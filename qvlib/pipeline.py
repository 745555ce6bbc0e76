"""The steps of the workflow as functions of (config, names, paths): what each ``qv`` job does.

Everything here only wires config, data, models, training and evaluation together; the method
itself lives in the modules it calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import polars as pl
import torch

from .config import Config
from .diagnostics import cosine_table, merged_cosine_table, norms_table
from .data.base import Preprocess
from .data.cache import read_split_cache, write_split_cache
from .data.registry import LoadOptions, load_task, pretrain_mixture, stable_seed
from .datafree import Rule, choose_lambda, folder_images, noise_images, proxy_inputs, score_lambdas
from .evaluate import Engine, accuracy, load_split, search_lambda
from .racing import race_splits
from .sections import source_parts
from .fileio import write_parquet
from .models import backbone_state, build_vit, check_fits, task_model
from .quant import QuantSpec, fake_quant
from .train import pick_device, train
from .vectors import WeightVector, random_direction
from .vocab import QUANTIZED_VARIANTS, Control, Mode, Search, Split, SweepMethod, Variant

def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def arch_preprocess(arch) -> Preprocess:
    """Preprocessing of an arch (timm data config at the arch's own input size), from a headless build
    on the meta device (no weights are allocated, so a ViT-L costs nothing to ask)."""
    with torch.device("meta"):
        return Preprocess.from_model(build_vit(arch, num_classes=0))


def pretrain(cfg: Config, arch_name: str, output: Path, device: str | None = None, progress: bool = True) -> None:
    """Train the demo backbone (all parameters, a trainable head over the mixture's classes) and
    save it without the head."""
    arch = cfg.arch(arch_name)
    tcfg = cfg.pretrain_train()
    kinds, n_per_task = cfg.pretrain_mixture()
    pre = arch_preprocess(arch)
    data, classes = pretrain_mixture(kinds, n_per_task, cfg.data_seed, pre)
    model = build_vit(arch, num_classes=len(classes), seed=cfg.seed)
    model.requires_grad_(True)
    meta = {**_metadata(cfg, arch_name, "pretrain", Mode.PRETRAIN), "pretrain_tasks": kinds, "pretrain_classes": len(classes)}
    train(model, data, pre, tcfg, Mode.PRETRAIN, output, meta, device=device, progress=progress,
          state_fn=lambda m: {k: v for k, v in m.state_dict().items() if not k.startswith("head.")})


def finetune(cfg: Config, arch_name: str, task_name: str, mode: str, output: Path, backbone: Path | None = None,
             device: str | None = None, progress: bool = True) -> None:
    """FT or QAT of the block linear weights from the shared backbone, with the task's fixed head."""
    arch = cfg.arch(arch_name, backbone_path=backbone)
    pre = arch_preprocess(arch)
    task = load_task(task_name, cfg.load_options(task_name, pre))
    model = task_model(arch, backbone_state(arch), task_name, task.num_classes, seed=cfg.seed, policy=cfg.policy)
    meta = {**_metadata(cfg, arch_name, task_name, mode), "num_classes": task.num_classes}
    train(model, task.train, pre, cfg.finetune_train(task_name, arch_name), mode, output, meta,
          spec=cfg.quant if mode == Mode.QAT else None, device=device, progress=progress,
          quantized=cfg.policy.select_model(model))


def _metadata(cfg: Config, arch: str, task: str, mode: str) -> dict:
    """What a trained file records of its making: ``config_hash`` hashes the settings its job read (a store
    job's file: exactly those). Only QAT records a quantizer: FT and pretraining read none."""
    meta = {"arch": arch, "task": task, "mode": mode, "seed": cfg.seed, "config_hash": cfg.fingerprint()}
    if mode != Mode.PRETRAIN:  # pretraining trains every parameter, whatever the policy
        meta.update(policy=cfg.policy.pattern, scope=cfg.policy.scope)
    if mode == Mode.QAT:
        meta["quant"] = cfg.quant.to_json()
    if cfg.job_kind is None:
        meta["config"] = cfg.name
    else:  # the store folder's key: the file names the job that made it
        meta["store_key"] = cfg.job_key
    return meta


# ---------------------------------------------------------------- evaluation
def arch_pixels(cfg: Config, arch_name: str) -> str:
    """The pixels key (:meth:`Preprocess.pixels`) of an arch's cached splits."""
    return cfg.arch_facts(arch_name).preprocess.pixels()


def cache_splits(cfg: Config, arch_name: str, task_name: str, outputs: dict[str, Path]) -> None:
    """Write the preprocessed ``test`` and ``calib`` splits (``outputs``: split -> path)."""
    pre = cfg.preprocess(arch_name)
    task = load_task(task_name, cfg.load_options(task_name, pre))
    for split, path in outputs.items():
        write_split_cache(task, split, pre, path)


def load_engine(cfg: Config, arch_name: str, checkpoint: Path, device: str | None) -> tuple[Engine, WeightVector]:
    """The evaluation engine around a fine-tuned checkpoint, which must fit the arch tensor by tensor."""
    ckpt = WeightVector.load(checkpoint)
    meta_arch = ckpt.metadata.get("arch")
    if meta_arch is not None and meta_arch != arch_name:
        raise ValueError(f"{checkpoint} was trained for arch {meta_arch!r}, not {arch_name!r}")
    num_classes = ckpt["head.weight"].shape[0] if "head.weight" in ckpt else None
    if num_classes is None:
        raise ValueError(f"{checkpoint} has no head.weight: not a fine-tuned checkpoint")
    model = build_vit(cfg.arch(arch_name), num_classes=num_classes)
    check_fits(ckpt, model.state_dict(), str(checkpoint), arch_name)
    model.load_state_dict(dict(ckpt))
    pre = Preprocess.from_model(model)
    return Engine(model, pre, pick_device(device), cfg.eval_batch_size(), cfg.eval_precision()), ckpt


def proxy_images(cfg: Config, pre: Preprocess, receiver_task: str | None, images: Path | str | int | None = None,
                 tasks: Sequence[str] | None = None, n_images: int = 256,
                 synth_from: torch.nn.Module | None = None) -> tuple[torch.Tensor, str]:
    """The normalised images an input criterion compares on (``qv choose-lambda``), and what they are:
    ``n_images`` training images of ``tasks`` (registered tasks; the config's options where it names
    them), up to ``n_images`` images of the folder ``images``, ``n_images`` images synthesized from
    the receiver's model ``synth_from``, or ``images`` (default 256) noise images. Never the
    receiver's task: naming it in ``tasks`` is an error."""
    if sum(x is not None and x != [] for x in (images, tasks, synth_from)) > 1:
        raise ValueError("give one of --images, --task and --synth")
    if synth_from is not None:
        x = proxy_inputs("synth", n_images, pre, receiver=receiver_task or "", model=synth_from)
        return x, f"{len(x)} images synthesized from the receiver"
    if tasks:
        if receiver_task in tasks:
            raise ValueError(f"--task {receiver_task} is the receiver's own task (its checkpoint's metadata): "
                             "a data-free criterion never sees the receiver's images")

        def train_split(task):
            opts = cfg.load_options(task, pre) if task in cfg.task_names else LoadOptions(preprocess=pre, root=cfg.data_root)
            return load_task(task, opts).train

        x = proxy_inputs("donor", n_images, pre, receiver=receiver_task or "", donor_tasks=tasks, train_split=train_split)
        return x, f"{len(x)} training images of {', '.join(tasks)}"
    if isinstance(images, (str, Path)):
        x = folder_images(images, n_images, pre.pil_transform())
        return pre.normalize(x), f"{len(x)} images of {images}"
    n = images or 256
    return noise_images(n, pre.img_size), f"{n} noise images"


def criterion_inputs(cfg: Config, arch_name: str, receiver: Path, images: Path | str | int | None = None,
                     tasks: Sequence[str] | None = None, n_images: int = 256, synth: bool = False) -> tuple[WeightVector, dict, str]:
    """What an input criterion scores a receiver with: its checkpoint (:func:`load_engine`, on the
    default device), the keyword inputs of :func:`qvlib.datafree.score_lambdas` (its ``model`` and
    the ``inputs``, :func:`proxy_images`; ``synth``: images synthesized from that model) and what
    those images are."""
    engine, ckpt = load_engine(cfg, arch_name, receiver, device=None)
    x, what = proxy_images(cfg, engine.preprocess, ckpt.metadata.get("task"), images, tasks, n_images,
                           synth_from=engine.model if synth else None)
    return ckpt, {"model": engine.model, "inputs": x}, what


def cached_splits(engine: Engine, caches: dict[str, Path]) -> dict:
    """Cached splits loaded onto the engine's device, checked against the arch's input size."""
    out = {}
    for split, path in caches.items():
        images, labels, _ = read_split_cache(path)
        if images.shape[-1] != engine.preprocess.img_size:
            raise ValueError(f"cached split {path} holds {images.shape[-1]}px images; the arch needs {engine.preprocess.img_size}px")
        out[split] = load_split(images, labels, engine.device)
    return out


def evaluate_baselines(cfg: Config, arch_name: str, task_name: str, ft: Path, qat: Path, caches: dict[str, Path],
                       output: Path, device: str | None = None) -> None:
    """FT, PTQ(FT), QAT quantized and QAT unquantized on each cached split: one tidy row each."""
    spec = cfg.quant
    engine, _ = load_engine(cfg, arch_name, ft, device)
    names = cfg.policy.select_model(engine.model)
    qat_ckpt = WeightVector.load(qat)
    _check_spec(qat_ckpt.metadata, spec, qat)
    # Every parameter of the QAT model (scope all trains the head and the rest too; scope linear
    # leaves them equal to FT's), its quantized tensors fake-quantized for QAT_PTQ.
    check_fits(qat_ckpt, engine.base, str(qat), arch_name)
    qat_weights = {n: qat_ckpt[n].to(engine.device) for n in engine.base}
    splits = cached_splits(engine, caches)

    models = {
        Variant.FT: {},
        Variant.PTQ: engine.quantized(names, spec),
        Variant.QAT: qat_weights,
        Variant.QAT_PTQ: {n: fake_quant(w, spec) if n in names else w for n, w in qat_weights.items()},
    }
    rows = []
    for model_name, overrides in models.items():
        for split, data in splits.items():
            correct = engine.correct(overrides, data)
            rows.append({"arch": arch_name, "quant": spec.tag, "seed": cfg.seed, "task": task_name, "model": str(model_name),
                         "quantized": model_name in QUANTIZED_VARIANTS, "bits": spec.bits, "split": str(split),
                         "correct": correct, "n": len(data), "accuracy": accuracy(correct, len(data))})
    write_parquet(pl.DataFrame(rows), output)


def _check_spec(metadata: dict, spec, path) -> None:
    recorded = metadata.get("quant")
    if recorded:
        other = QuantSpec.from_json(recorded)
        if other != spec:
            raise ValueError(f"{path} was made for quantization {other.tag} ({recorded}) but this run uses {spec.tag} ({spec.to_json()})")


def random_control_seeds(cfg: Config, donor: str) -> list[int]:
    """Seeds of the donor's random directions at this replicate: one per ``random_controls``,
    independent of the receiver, so every receiver of a donor sees the same controls."""
    return [stable_seed("random-direction", donor, cfg.seed, k) for k in range(cfg.random_controls)]


def evaluate_cells(cfg: Config, arch_name: str, receiver: str, receiver_ft: Path, donors: list[tuple[str, Path, Path]],
                   caches: dict[str, Path], device: str | None = None, controls: bool = True) -> None:
    """The cells of one receiver, one parquet file per donor (``donors``: (name, vector, output))."""
    engine, _ = load_engine(cfg, arch_name, receiver_ft, device)
    names = cfg.policy.select_model(engine.model)
    carried = cfg.policy.select_carried(engine.base)
    vectors = [_checked_vector(cfg, arch_name, engine, carried, path) for _, path, _ in donors]
    splits = cached_splits(engine, caches)
    datafree = _datafree_inputs(cfg, engine, carried, receiver) if cfg.datafree_criteria and Split.TEST in splits else None
    for (donor, _, output), rho in zip(donors, vectors):
        if datafree is not None:  # proxy images come from the donor's tasks (a merged donor: every task but the receiver's)
            datafree["donor_tasks"] = [donor] if donor in cfg.task_names else [t for t in cfg.task_names if t != receiver]
        rows = _cell_rows(cfg, arch_name, engine, names, splits, datafree, receiver, donor, rho, controls)
        write_parquet(pl.DataFrame(rows, schema_overrides={"control_seed": pl.Int64, "criterion": pl.Utf8}), output)


def _checked_vector(cfg: Config, arch_name: str, engine: Engine, carried: list[str], vector: Path) -> WeightVector:
    """A donor vector, checked against the run's quantizer, the arch and what the policy patches."""
    rho = WeightVector.load(vector)
    _check_spec(rho.metadata, cfg.quant, vector)
    if rho.metadata.get("arch") not in (None, arch_name):
        raise ValueError(f"vector {vector} is for arch {rho.metadata.get('arch')!r}, the receiver is {arch_name!r}")
    try:
        WeightVector({n: engine.base[n].cpu() for n in carried}).check_compatible(rho)
    except ValueError as err:
        raise ValueError(f"vector {vector} does not hold what policy scope {cfg.policy.scope!r} patches: {err}") from None
    return rho


def _cell_rows(cfg: Config, arch_name: str, engine: Engine, names: list[str], splits: dict, datafree: dict | None,
               receiver: str, donor: str, rho: WeightVector, controls: bool) -> list[dict]:
    """Q(theta_R + lambda * rho_D) for every lambda of the sweep on every cached split, plus an adaptive
    oracle search on ``test``. Donor == receiver gives the 'self' control; otherwise (with ``controls``)
    ``cfg.random_controls`` norm-matched random directions are evaluated beside the donor."""
    spec = cfg.quant
    variants = [(Control.SELF if donor == receiver else Control.DONOR, None, rho)]
    if controls and donor != receiver:
        variants += [(Control.RANDOM, s, random_direction(rho, s)) for s in random_control_seeds(cfg, donor)]
    rows = []
    base = {"arch": arch_name, "quant": spec.tag, "seed": cfg.seed, "receiver": receiver, "donor": donor, "bits": spec.bits}
    for control, control_seed, vec in variants:
        vec_dev = {n: t.to(engine.device) for n, t in vec.items()}
        row = {**base, "control": str(control), "control_seed": control_seed, "criterion": None}

        def patched(lam: float) -> dict[str, torch.Tensor]:
            return engine.quantized(names, spec, vec_dev, lam)

        picks = _datafree_picks(cfg, datafree, vec_dev) if datafree is not None else {}
        sweep = _sweep_rows(cfg, engine, patched, splits, picks.values())
        rows += [{**row, **r} for r in sweep]
        full_test = {r["lambda"]: r for r in sweep if r["split"] == Split.TEST and r["n"] == len(splits[Split.TEST])}
        rows += [{**row, **full_test[lam], "search": str(Search.DATAFREE), "criterion": c} for c, lam in picks.items()]
        if Split.TEST in splits and control != Control.RANDOM and cfg.oracle_search:
            found = search_lambda(lambda lam: engine.correct(patched(lam), splits[Split.TEST]))
            c, n = found.best_correct, len(splits[Split.TEST])
            rows.append({**row, "search": str(Search.ADAPTIVE), "lambda": found.best_lambda, "split": str(Split.TEST),
                         "correct": c, "n": n, "accuracy": accuracy(c, n)})
    return rows


def _sweep_rows(cfg: Config, engine: Engine, patched, splits: dict, test_lambdas=()) -> list[dict]:
    """One row per (lambda, split) of the sweep: ``search: sweep``, every lambda on the whole split
    (dense), or ``search: racing``, each lambda on the images its race gave it (``n``). A race on
    test also finishes the lambdas that calib's race and ``test_lambdas`` (data-free picks) chose, so
    every rule reads a whole-split accuracy."""
    settings = cfg.lambda_search
    rows = []
    if settings["method"] == SweepMethod.DENSE:
        for lam in cfg.lambdas:
            for split, data in splits.items():
                c = engine.correct(patched(lam), data)
                rows.append({"search": str(Search.SWEEP), "lambda": float(lam), "split": str(split),
                             "correct": c, "n": len(data), "accuracy": accuracy(c, len(data))})
        return rows
    options = {k: v for k, v in settings.items() if k != "method"}
    races = race_splits(lambda split, lam, idx: engine.correct_mask(patched(lam), splits[split].subset(idx)), cfg.lambdas,
                        {split: data.labels for split, data in splits.items()}, finish_on_test=list(test_lambdas),
                        seed=cfg.seed, **options)
    for split, race in races.items():
        for lam, n in race.seen.items():
            if n:
                rows.append({"search": str(Search.RACING), "lambda": lam, "split": str(split),
                             "correct": race.correct[lam], "n": n, "accuracy": accuracy(race.correct[lam], n)})
    return rows


def _datafree_inputs(cfg: Config, engine: Engine, names: list[str], receiver: str) -> dict:
    """What the data-free rules read, the same for every vector of a cell: the receiver's tensors
    that vectors carry, its model, the noise images, and a reader of other tasks' training images
    (qvlib.datafree.proxy_inputs, which never reads the receiver's task)."""
    pre = engine.preprocess
    train_sets: dict = {}

    def train_split(task: str):
        if task not in train_sets:
            train_sets[task] = load_task(task, cfg.load_options(task, pre)).train
        return train_sets[task]

    return {"receiver": {n: engine.base[n] for n in names}, "model": engine.model, "receiver_task": receiver,
            "inputs": noise_images(cfg.datafree_images, pre.img_size, seed=stable_seed("noise-images", cfg.seed)),
            "train_split": train_split, "n_proxy": cfg.datafree_proxy_images, "proxies": {}, "donor_tasks": [], "preprocess": pre}


def _datafree_picks(cfg: Config, datafree: dict, vector: dict) -> dict[str, float]:
    """Per configured rule (qvlib.datafree.Rule), the sweep lambda it picks from the receiver's
    weights, noise or proxy images alone; its rows (``search: datafree``) carry that lambda's test
    accuracy. A rule on the donor's images has none for the receiver's own vector (the self
    control): no pick there."""
    picks = {}
    for text in cfg.datafree_criteria:
        rule = Rule.parse(text)
        inputs = datafree["inputs"]
        if rule.needs_images and rule.source != "noise":
            key = (rule.source, tuple(datafree["donor_tasks"]) if "donor" in source_parts(rule.source) else ())
            if key not in datafree["proxies"]:
                try:
                    datafree["proxies"][key] = proxy_inputs(
                        rule.source, datafree["n_proxy"], datafree["preprocess"], receiver=datafree["receiver_task"],
                        donor_tasks=key[1], all_tasks=cfg.task_names, train_split=datafree["train_split"], model=datafree["model"],
                        seed=cfg.seed)  # the sample bench/zero_shot_lambda.py scores
                except ValueError:  # the self control: its only tasks are the receiver's
                    datafree["proxies"][key] = None
            inputs = datafree["proxies"][key]
            if inputs is None:
                continue
        scores = score_lambdas(rule.criterion, datafree["receiver"], vector, cfg.quant, cfg.lambdas, cfg.policy,
                               model=datafree["model"], inputs=inputs)
        picks[text] = choose_lambda(scores, rule.tolerance)
    return picks


def vectors_by_task(paths: list[Path]) -> dict[str, WeightVector]:
    """Checkpoints or vectors keyed by the task their metadata names."""
    out = {}
    for path in paths:
        vec = WeightVector.load(path)
        if not vec.metadata.get("task"):
            raise ValueError(f"{path} has no 'task' in its metadata")
        out[vec.metadata["task"]] = vec
    return out


def diagnostics(cfg: Config, arch_name: str, backbone: Path | None, ft: list[Path], vectors: list[Path],
                out_norms: Path, out_cosine: Path, merged: list[Path] = ()) -> None:
    """Relative norms of every FT update and vector, and the vectors' cosine matrix, at one seed; with
    ``merged`` (leave-one-out merged donors), each one's cosine with its receiver's vector too."""
    tag = pl.lit(cfg.quant.tag).alias("quant")
    start = backbone_state(cfg.arch(arch_name, backbone_path=backbone))
    fts, vecs = vectors_by_task(ft), vectors_by_task(vectors)
    missing = sorted(set(vecs) - set(fts))
    if missing:
        raise ValueError(f"no FT checkpoint for task {missing[0]!r}")
    write_parquet(norms_table(arch_name, cfg.seed, start, fts, vecs, cfg.policy).with_columns(tag), out_norms)
    cosine = cosine_table(arch_name, cfg.seed, vecs)
    if merged:
        cosine = pl.concat([cosine, merged_cosine_table(arch_name, cfg.seed, vecs, [WeightVector.load(p) for p in merged])])
    write_parquet(cosine.with_columns(tag), out_cosine)
