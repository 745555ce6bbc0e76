"""What to run first on a GPU rented for the paper grid: one command, one JSON report.

    .venv/bin/python bench/gpu_acceptance.py --json gpu_acceptance.json            # the whole check
    .venv/bin/python bench/gpu_acceptance.py --archs vit_tiny vit_small --skip-smoke  # part 1 only, two archs

Part 1, throughput of config/paper.yaml's archs (ViT-T/S/B/L 16 at 224 px, random timm weights, no
download):
- FT and QAT train-step img/s at the paper's batch (128), fp32 and bf16, with peak GPU memory; the
  paper's training settings (scope all: every parameter trains, AdamW, clip 1.0; QAT fake-quantizes
  the block linears at 3 bits through qvlib.train.quantized_forward). A batch that does not fit is
  retried with grad_accum 2, 4, ... (micro-batch 64, 32, ...): the report says which accumulation
  fits. ViT-L is also measured as the authors run it (batch 64 x grad_accum 2).
- The evaluation engine's img/s per (donor, lambda) cell in both precisions (bench/arch_throughput.py's
  measurement, qvlib.evaluate.Engine), and its ratio to the H100 figure bench/paper_cost.py assumes,
  which scales its GPU-hours to this machine. bench/paper_cost.py assumes nothing for training: the
  report gives the paper's FT + QAT GPU-hours per arch implied by the measured train rate instead
  (config/paper.yaml's epochs and seeds, bench/paper_cost.py's split sizes).

Part 2, the smoke protocol for real (.test/config/paper-smoke.yaml with --smoke-arch, the three
fixture tasks of tests/paper_fixtures.py with more images, a few hundred steps): FT and QAT of each
task through qvlib.pipeline.finetune (timm's pretrained loading of a timm-layout file, timm's
augmentation), vectors, cached 224-px splits, baselines, then every cell (self, donors, random
controls, data-free picks) through qvlib.pipeline.evaluate_cells once in fp32 and once in bf16,
each lambda on the whole split (dense, so both precisions score the same images). Reports the
largest per-cell Top-1 difference and whether any lambda picked on calib or test changes: can the
grid be evaluated in bf16 without changing its tables?

Flags cut every size (--archs, --batch, --steps, --eval-images, --overrides, --smoke-*) so that
tests/test_gpu_acceptance.py runs the whole script on the CPU in seconds (there bf16 = fp32: the
CPU always computes in fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from arch_throughput import cell_rate  # noqa: E402
from paper_cost import H100_THROUGHPUT, PAPER_SPLITS  # noqa: E402
from qvlib.data.base import CALIB_FRACTION, CALIB_MAX, Preprocess  # noqa: E402
from qvlib.evaluate import Engine, load_split  # noqa: E402
from qvlib.models import ARCH_OVERRIDES, ArchSpec, build_vit, freeze_except  # noqa: E402
from qvlib.precision import autocast_for  # noqa: E402
from qvlib.quant import QuantPolicy, QuantSpec  # noqa: E402
from qvlib.train import quantized_forward  # noqa: E402

PAPER = REPO / "config" / "paper.yaml"
SMOKE = REPO / ".test" / "config" / "paper-smoke.yaml"
PRECISIONS = ("fp32", "bf16")
GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", gpus_visible=torch.cuda.device_count())
    return info


def paper_archs(overrides: dict) -> dict[str, ArchSpec]:
    """config/paper.yaml's archs (name -> spec), random weights, with ``overrides`` (tests only)."""
    archs = yaml.safe_load(PAPER.read_text())["archs"]
    return {name: ArchSpec(name, a["timm_name"], overrides) for name, a in archs.items()}


# ---------------------------------------------------------------- part 1: throughput
def train_step_rate(arch: ArchSpec, qat: bool, precision: str, batch: int, accum: int, steps: int, warmup: int,
                    device: torch.device, bits: int = 3) -> dict:
    """img/s of the paper's training step (scope all, AdamW, clip 1.0) at ``batch`` = ``accum``
    micro-batches, and the peak GPU memory; raises torch.OutOfMemoryError where it does not fit."""
    model = build_vit(arch, num_classes=100, seed=0).to(device)
    policy = QuantPolicy(scope="all")
    freeze_except(model, policy)
    model.train()
    names = policy.select_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    spec = QuantSpec(bits=bits)
    micro = batch // accum
    size = model.patch_embed.img_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(micro, 3, *size, device=device, generator=gen)
    y = torch.randint(0, 100, (micro,), device=device, generator=gen)
    autocast = autocast_for(device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            with autocast:
                logits = quantized_forward(model, names, spec, x) if qat else model(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    sync(device)
    rate = steps * micro * accum / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"img_per_s": rate, "peak_memory_gib": peak}


def fitting_train_rate(arch: ArchSpec, qat: bool, precision: str, batch: int, accum: int, steps: int, warmup: int,
                       device: torch.device) -> dict:
    """``train_step_rate`` at ``batch``, doubling grad_accum from ``accum`` until it fits in memory
    (``fits``: it did at the accumulation asked for)."""
    tried = []
    while accum <= batch:
        try:
            out = train_step_rate(arch, qat, precision, batch, accum, steps, warmup, device)
            return {**out, "grad_accum": accum, "micro_batch": batch // accum, "fits": not tried, "out_of_memory_at": tried}
        except torch.OutOfMemoryError:
            tried.append(accum)
            accum *= 2
        finally:
            gc.collect()  # the failed attempt's model and optimizer state, before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"img_per_s": None, "peak_memory_gib": None, "grad_accum": None, "micro_batch": None, "fits": False,
            "out_of_memory_at": tried}


def eval_rates(arch: ArchSpec, n: int, batch: int, cells: int, device: torch.device) -> dict[str, float]:
    """The engine's img/s per (donor, lambda) cell in fp32 and bf16 (bench/arch_throughput.py's cell)."""
    model = build_vit(arch, 100, seed=0)
    pre = Preprocess.from_model(model)
    policy = QuantPolicy(scope="all")
    names = policy.select_model(model)
    gen = torch.Generator().manual_seed(0)
    split = load_split(torch.randint(0, 256, (n, 3, pre.img_size, pre.img_size), dtype=torch.uint8, generator=gen),
                       torch.randint(0, 100, (n,), generator=gen), device)
    engine = Engine(model, pre, device, batch)
    vector = {k: 0.01 * torch.randn_like(engine.base[k]) for k in policy.select_carried(engine.base)}
    out = {}
    for precision in PRECISIONS:
        engine.precision = precision
        out[precision] = cell_rate(engine, names, QuantSpec(bits=3), vector, split, cells)
    return out


def paper_train_images(timm_name: str) -> int:
    """Training images one seed's FT (or QAT) of every paper task reads: epochs x (train - calib)."""
    tasks = yaml.safe_load(PAPER.read_text())["tasks"]
    total = 0
    for name, task in tasks.items():
        train, _ = PAPER_SPLITS[name]
        total += task["train"]["epochs"] * (train - min(int(train * CALIB_FRACTION), CALIB_MAX))
    return total


def throughput(args, device: torch.device) -> dict:
    archs = paper_archs(args.overrides)
    seeds = len(yaml.safe_load(PAPER.read_text())["seeds"])
    train_rows, eval_rows, hours = [], [], {}
    for name in args.archs:
        arch = archs[name]
        # the paper's batch in one step; ViT-L also as the authors run it (half the batch, grad_accum 2)
        for accum in (1, 2) if name == "vit_large" else (1,):
            for precision in PRECISIONS:
                for qat in (False, True):
                    r = fitting_train_rate(arch, qat, precision, args.batch, accum, args.steps, args.warmup, device)
                    row = {"arch": name, "timm_name": arch.timm_name, "mode": "qat" if qat else "ft", "precision": precision,
                           "batch": args.batch, "asked_grad_accum": accum, **r}
                    train_rows.append(row)
                    print(f"train {name:10s} {row['mode']:3s} {precision} batch {row['batch']:4d} accum {row['grad_accum']} "
                          f"{_num(r['img_per_s'], '.1f')} img/s peak {_num(r['peak_memory_gib'], '.1f')} GiB"
                          f"{'' if not r['out_of_memory_at'] else ' (out of memory at accum ' + str(r['out_of_memory_at']) + ')'}",
                          flush=True)
        rates = eval_rates(arch, args.eval_images, args.eval_batch, args.eval_cells, device)
        for precision, rate in rates.items():
            assumed = H100_THROUGHPUT[precision].get(arch.timm_name)
            eval_rows.append({"arch": name, "timm_name": arch.timm_name, "precision": precision, "img_per_s": rate,
                              "paper_cost_img_per_s": assumed, "ratio_to_paper_cost": rate / assumed if assumed else None})
            print(f"eval  {name:10s} {precision} {rate:10.1f} img/s per cell, paper_cost.py assumes {assumed} "
                  f"(ratio {_num(rate / assumed if assumed else None, '.3f')})", flush=True)
        images = paper_train_images(arch.timm_name)
        hours[name] = {}
        for precision in PRECISIONS:
            per_mode = [r for r in train_rows if r["arch"] == name and r["precision"] == precision and r["asked_grad_accum"] == 1]
            if all(r["img_per_s"] for r in per_mode):
                hours[name][precision] = sum(seeds * images / r["img_per_s"] / 3600 for r in per_mode)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"train": train_rows, "eval": eval_rows, "paper_train_gpu_hours": hours,
            "paper_train_images_per_seed_and_mode": {a: paper_train_images(archs[a].timm_name) for a in args.archs}}


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


# ---------------------------------------------------------------- part 2: the smoke protocol, fp32 vs bf16
def smoke_config(args, work: Path, precision: str) -> Path:
    """.test/config/paper-smoke.yaml at this run's sizes, its files under ``work``."""
    from paper_fixtures import BACKBONE_FILE

    raw = yaml.safe_load(SMOKE.read_text())
    arch = dict(yaml.safe_load(PAPER.read_text())["archs"][args.smoke_arch])  # with its own train keys (ViT-L: 64 x 2)
    timm_name = arch["timm_name"]
    arch["backbone"] = {**arch["backbone"], "file": str(work / BACKBONE_FILE.replace("vit_tiny_patch16_224", timm_name))}
    if args.overrides:
        arch["overrides"] = args.overrides
    raw.update(name="gpu-acceptance", data_root=str(work / "data"), archs={args.smoke_arch: arch})
    for task in raw["tasks"].values():
        task.pop("train", None)  # every task the same number of steps
        task.update(max_train=None, max_test=None)
    raw["finetune"].pop("epochs", None)
    raw["finetune"].update(steps=args.smoke_steps, batch_size=args.smoke_batch, warmup_steps=max(1, args.smoke_steps // 10),
                           num_workers=args.workers, log_every=max(1, args.smoke_steps // 5))
    raw["lambda_search"] = {"method": "dense"}  # both precisions score every lambda on the same images
    if args.lambdas:
        raw["lambdas"] = args.lambdas
    raw["evaluate"] = {**raw.get("evaluate", {}), "precision": precision}
    path = work / f"smoke-{precision}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def smoke_protocol(args, work: Path, device: torch.device) -> dict:
    import polars as pl

    from paper_fixtures import BACKBONE_FILE, TASKS, write_hf_task, write_timm_checkpoint
    from qvlib import pipeline
    from qvlib.checkpoints import extract_vector
    from qvlib.config import Config
    from qvlib.vectors import WeightVector

    dev = str(device)
    t0 = time.perf_counter()
    for task in TASKS:
        write_hf_task(work / "data", task, args.smoke_train, args.smoke_test)
    timm_name = yaml.safe_load(PAPER.read_text())["archs"][args.smoke_arch]["timm_name"]
    ckpt_file = work / BACKBONE_FILE.replace("vit_tiny_patch16_224", timm_name)
    write_timm_checkpoint(ckpt_file, timm_name=timm_name, overrides=args.overrides)
    configs = {p: Config.load(smoke_config(args, work, p)).with_seed(None) for p in PRECISIONS}
    cfg = configs["fp32"]
    arch, tag = args.smoke_arch, cfg.quant.tag
    tasks = cfg.task_names
    out = work / "results"
    ck, vec = {}, {}
    train_s = {}
    for task in tasks:
        for mode in ("ft", "qat"):
            path = out / "checkpoints" / f"{task}.{mode}.safetensors"
            start = time.perf_counter()
            pipeline.finetune(cfg, arch, task, mode, path, device=dev, progress=False)
            train_s[f"{task}.{mode}"] = time.perf_counter() - start
            ck[task, mode] = path
            print(f"smoke: {task} {mode} trained in {train_s[f'{task}.{mode}']:.1f} s", flush=True)
        rho = extract_vector(WeightVector.load(ck[task, "qat"]), WeightVector.load(ck[task, "ft"]), cfg.policy)
        vec[task] = rho.save(out / "vectors" / f"{task}.safetensors")
    caches = {}
    for task in tasks:
        caches[task] = {s: out / "cache" / f"{task}.{s}.safetensors" for s in ("test", "calib")}
        pipeline.cache_splits(cfg, arch, task, caches[task])
    base_rows = []
    for task in tasks:
        path = out / "baselines" / f"{task}.parquet"
        pipeline.evaluate_baselines(cfg, arch, task, ck[task, "ft"], ck[task, "qat"], caches[task], path, device=dev)
        base_rows.append(pl.read_parquet(path))
    base = pl.concat(base_rows)
    eval_s, cells = {}, {}
    for precision, pcfg in configs.items():
        start = time.perf_counter()
        frames = []
        for receiver in tasks:
            donors = [(d, vec[d], out / precision / receiver / f"{d}.parquet") for d in tasks]
            pipeline.evaluate_cells(pcfg, arch, receiver, ck[receiver, "ft"], donors, caches[receiver], device=dev)
            frames += [pl.read_parquet(p) for _, _, p in donors]
        eval_s[precision] = time.perf_counter() - start
        cells[precision] = pl.concat(frames, how="diagonal_relaxed")
        print(f"smoke: every cell evaluated in {precision} in {eval_s[precision]:.1f} s", flush=True)
    return {"arch": arch, "timm_name": timm_name, "quant": tag, "steps": args.smoke_steps, "batch": args.smoke_batch,
            "tasks": {t: {"classes": len(TASKS[t].classes), "train_images": args.smoke_train, "test_images": args.smoke_test}
                      for t in tasks},
            "baselines": base.select("task", "model", "split", "accuracy", "n").to_dicts(),
            "ft_test_accuracy": {r["task"]: r["accuracy"] for r in
                                 base.filter((pl.col("model") == "ft") & (pl.col("split") == "test")).to_dicts()},
            "train_seconds": train_s, "eval_seconds": eval_s, "wall_seconds": time.perf_counter() - t0,
            **compare_precisions(cells["fp32"], cells["bf16"])}


CELL_KEYS = ["receiver", "donor", "control", "control_seed", "search", "criterion", "lambda", "split"]


def compare_precisions(fp32, bf16) -> dict:
    """Per row of the cell tables (cell, lambda, split): Top-1 in fp32 vs bf16, in points; and per
    (cell, split) whether the best lambda moves."""
    import polars as pl

    joined = fp32.join(bf16, on=CELL_KEYS, how="full", suffix="_bf16", nulls_equal=True, coalesce=True)
    unmatched = joined.filter(pl.col("accuracy").is_null() | pl.col("accuracy_bf16").is_null()).height
    joined = joined.drop_nulls(["accuracy", "accuracy_bf16"])
    joined = joined.with_columns(diff=(pl.col("accuracy_bf16") - pl.col("accuracy")).abs())  # accuracy is in points
    worst = joined.sort("diff", descending=True).head(1).to_dicts()
    sweep = joined.filter(pl.col("search") == "sweep")
    keys = ["receiver", "donor", "control", "control_seed", "split"]

    def best(col: str):
        return (sweep.sort("lambda").group_by(keys, maintain_order=True)
                .agg(pl.col("lambda").get(pl.col(col).arg_max()).alias(f"best_{col}")))

    picks = best("accuracy").join(best("accuracy_bf16"), on=keys, nulls_equal=True)
    moved = picks.filter(pl.col("best_accuracy") != pl.col("best_accuracy_bf16"))
    return {"rows_compared": joined.height, "rows_unmatched": unmatched,
            "max_top1_diff_points": float(joined["diff"].max()) if joined.height else None,
            "mean_top1_diff_points": float(joined["diff"].mean()) if joined.height else None,
            "worst_row": {k: worst[0][k] for k in CELL_KEYS + ["accuracy", "accuracy_bf16", "n"]} if worst else None,
            "cells_compared": picks.height, "best_lambda_changes": moved.height,
            "best_lambda_changes_rows": moved.to_dicts()[:10]}


# ---------------------------------------------------------------- command line
def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in ARCH_OVERRIDES or not value:
            raise SystemExit(f"--overrides takes KEY=VALUE with KEY one of {', '.join(ARCH_OVERRIDES)}, got {item!r}")
        out[key] = float(value) if key == "mlp_ratio" else int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    archs = list(yaml.safe_load(PAPER.read_text())["archs"])
    p.add_argument("--archs", nargs="+", default=archs, choices=archs, help="archs of config/paper.yaml to measure")
    p.add_argument("--batch", type=int, default=128, help="train batch (the paper's 128; ViT-L also at half x 2)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps first")
    p.add_argument("--eval-images", type=int, default=4096, help="images of the resident split per eval cell")
    p.add_argument("--eval-batch", type=int, default=256, help="the engine's batch (config/paper.yaml's evaluate)")
    p.add_argument("--eval-cells", type=int, default=3, help="timed cells per precision")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="arch overrides for a cut-down run (tests: depth=2); the real check uses none")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-smoke", action="store_true")
    p.add_argument("--smoke-arch", default="vit_small", choices=archs)
    p.add_argument("--smoke-steps", type=int, default=300, help="FT and QAT steps per task")
    p.add_argument("--smoke-batch", type=int, default=128)
    p.add_argument("--smoke-train", type=int, default=1024, help="training images per fixture task")
    p.add_argument("--smoke-test", type=int, default=512, help="test images per fixture task")
    p.add_argument("--lambdas", type=float, nargs="+", default=None, help="lambda grid (default: the config's 11)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--work", type=Path, default=None, help="folder for the smoke run's files (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.overrides = parse_overrides(args.overrides)
    device = torch.device(args.device)
    report = {"hardware": hardware(device), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    print("hardware: " + ", ".join(f"{k} {v}" for k, v in report["hardware"].items()), flush=True)
    if not args.skip_throughput:
        report["throughput"] = throughput(args, device)
    if not args.skip_smoke:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            report["smoke"] = smoke_protocol(args, work, device)
        s = report["smoke"]
        print(f"smoke: FT test accuracy {s['ft_test_accuracy']}; fp32 vs bf16 over {s['rows_compared']} rows: largest "
              f"Top-1 difference {_num(s['max_top1_diff_points'], '.2f')} points, best lambda changed in "
              f"{s['best_lambda_changes']} of {s['cells_compared']} (cell, split)s", flush=True)
    text = json.dumps(report, indent=1, sort_keys=True, default=_json_default)
    if args.json:
        args.json.write_text(text)
        print(f"report: {args.json}")
    else:
        print(text)
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
