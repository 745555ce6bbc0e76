"""The study behind the embedded demo's defaults: each setting tried, run through the workflow, and
docs/demo-study.md written from the runs' own tables (never typed by hand).

    .venv/bin/python bench/demo_study.py             # run the settings that are missing, then write the doc
    .venv/bin/python bench/demo_study.py --report    # only rewrite docs/demo-study.md from results/

Every row is tagged with the machine that measured it (CPU model and the instruction set torch's
kernels use): the same seed trains to different weights on different CPUs, so a setting measured on
two machines keeps a row set per machine. The rows are also written to docs/demo-study-rows.csv and
docs/demo-study-grids.csv; a later report keeps the rows of runs that are no longer under results/
(another machine, a fresh clone) from those files and replaces the ones it can recompute here.

Each setting is the default config (config/config.yaml) with a few keys replaced; it runs as its own
workflow (results/study-<key>/), except the default itself, whose seeds extend `make run`'s
results/default/ (seed 0 is reused, the others are added). Wall time per setting is recorded in
results/study/<key>.time.json and reported. The goals are the demo's: on every seed PTQ loses >= 20
points, QAT recovers >= 70% of it, and at the best lambda the donor beats its random control in
>= 80% of pairs with a mean specific gain >= +3 whose 95% interval excludes 0; at the
calib-chosen lambda the donor beats its control in >= 70% of pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qvlib.plots import cell_text, markdown_table  # noqa: E402
from qvlib.provenance import cpu_label, machine_line  # noqa: E402
from qvlib.tables import headline, pairs, single_donors, specific, summary_specific  # noqa: E402
from qvlib.vocab import Rule  # noqa: E402

ARCH = "vit_demo"
TASKS6 = ["shapes", "glyphs", "dots", "blur", "digits", "mnist5k"]
TASKS4 = ["shapes", "glyphs", "dots", "mnist5k"]
LANDED_TASKS = ["shapes", "orientation", "frequency", "glyphs", "dots", "blur", "digits", "mnist5k"]
# key -> (what changes, overrides of config/config.yaml; ``tasks`` and ``quant`` are replaced whole, other maps merged)
OLD_PRETRAIN = {"train": {"steps": 2000}}
SETTINGS = {
    "landed": ("the first landed demo: FT lr 3e-4, backbone pretrained 2,000 steps, 8 tasks (orientation and frequency "
               "included), 1 random direction per donor",
               {"finetune": {"lr": 3.0e-4}, "pretrain": OLD_PRETRAIN, "tasks": LANDED_TASKS, "random_controls": 1, "seeds": [0]}),
    "lr5e-5": ("an earlier default: FT lr 5e-5, backbone pretrained 2,000 steps, 6 tasks (without the two that PTQ "
               "barely hurts), 3 random directions per donor (averaged), seeds 0, 1, 2",
               {"finetune": {"lr": 5.0e-5}, "pretrain": OLD_PRETRAIN, "tasks": TASKS6, "seeds": [0, 1, 2]}),
    "group32": ("lr5e-5 with one scale per group of 32 input columns instead of one per output channel, "
                "seeds 0, 1, 2",
                {"quant": {"bits": 2, "granularity": "group", "group_size": 32}, "finetune": {"lr": 5.0e-5},
                 "pretrain": OLD_PRETRAIN, "tasks": TASKS6, "seeds": [0, 1, 2]}),
    "steps300": ("the previous default: FT lr 1e-4 for 300 steps on a backbone pretrained 4,000 steps, 6 tasks, "
                 "3 random directions per donor, seeds 0, 1, 2",
                 {"finetune": {"steps": 300}, "tasks": TASKS6, "seeds": [0, 1, 2]}),
    "test3000": ("the previous default's trained models (steps300, copied: the generated tasks draw test images from a "
                 "seed of their own, so their training sets are unchanged) scored on 3,000 test images per generated "
                 "task instead of 1,000 (digits and mnist5k keep their fixed 497 and 1,000), seed 2 only (the seed with "
                 "the fewest wins; not timed: the run was interrupted and resumed): does less sampling noise in each "
                 "lambda's accuracy shrink the random directions' best-of-sweep gain?",
                 {"finetune": {"steps": 300}, "tasks": TASKS6, "task_defaults": {"n_test": 3000}}),
    "tasks6": ("the previous default: steps300 with 600 FT and QAT steps instead of 300 (same lr, warmup and backbones): does a "
                "longer, more converged QAT give donor vectors that transfer more evenly across seeds? Seeds 0, 1, 2, run on "
                "two machines (the Xeon's runs from scratch, backbones included)",
                {"tasks": TASKS6, "seeds": [0, 1, 2]}),
    "steps1200": ("tasks6 with 1,200 FT and QAT steps (backbones copied from tasks6), seeds 0 and 2: the "
                  "next point of the steps trend",
                  {"finetune": {"steps": 1200}, "tasks": TASKS6, "seeds": [0, 2]}),
    "controls8": ("tasks6's trained models (copied from the Xeon's runs) scored against 8 norm-matched random "
                  "directions per donor instead of 3 (directions 0-2 are tasks6's own, so the two control sets "
                  "are paired): does a steadier control mean, and a lucky direction counting for less, raise the "
                  "per-seed win shares? Evaluation only, seed 1 only: the seed that missed the goals on the Xeon, chosen for "
                  "that (its run min: the 42 cells, with `make test` and a bench sharing the 2 cores for most of it)",
                  {"random_controls": 8, "tasks": TASKS6, "seeds": [1]}),
    "tasks4": ("an earlier default: tasks6 without blur and digits, the two tasks that fall short of the demo's criteria: PTQ loss >= 50 points and >= 4,000 training images (blur loses 25 points to PTQ, a third of the others, so a donor has little to repair, and its vector is the smallest; digits has 1,300 training images, 30 epochs in 600 steps, and its vector gained +3.6 against its random directions' +2.4 in tasks6). Chosen after seeing tasks6's seeds 0-2 on the Xeon, whose trained models it reuses (copied: a task's backbone, FT, QAT and cells do not depend on the other tasks; the leave-one-out merged donor is recomputed from the four), so seeds 3, 4 and 5, run from nothing after the choice, are the held-out check",
                {"tasks": TASKS4, "seeds": [0, 1, 2, 3, 4, 5]}),
    "default": ("the default: tasks4 plus numerals, a fifth generated task (digits 0-9 drawn by the letters' renderer), "
                 "added after tasks4's seed 4 missed, before numerals was ever run: with 12 pairs per seed one "
                 "donor that fails on all three receivers costs a quarter of the share, with 20 pairs a fifth, which "
                 "still leaves 80%. tasks4's trained models and cells are reused (copied); seeds 0-5",
                 {"seeds": [0, 1, 2, 3, 4, 5]}),
    "holdout": ("the default on seeds 6 and 7, run from nothing (pretraining included) after the default was "
                "fixed: the only seeds that played no part in choosing its tasks",
                {"seeds": [6, 7]}),
}
# Settings reuse what an earlier setting trained through the shared store (qvlib.store): a job that reads
# the same settings has the same key and folder, so steps1200 finds tasks6's backbones, controls8 tasks6's
# backbones, models, vectors and baselines, tasks4 those of the four tasks it shares with tasks6 and the
# default those of tasks4, with nothing copied; what reads a changed key runs (the cells of a new task set
# too: the default's data-free rule outputs@others reads every task's images). test3000 changes the test
# split's size, which the fine-tuning jobs' keys hold although their training images do not change: the
# jobs of the kinds listed are copied from that setting's store folders into the target's (file times
# kept, each with its own job file) before the run. Seeds run in the order given by --seeds (the study
# adds them one call at a time; the recorded wall time is the sum of the calls).
REUSES = {"test3000": ("steps300", ("ft", "qat", "vector"))}
# Sub-grids of the default's lambdas for the selection analysis: the oracle takes the best of k lambdas,
# for the donor and for each random direction alike.
SUB_GRIDS = ([0.25, 0.5, 0.75, 1.0, 1.5, 2.0], [0.5, 0.75, 1.0, 1.5], [0.5, 1.0, 1.5], [1.0])
# Seeds run only after a setting was chosen on the others: their pooled row is the check of the choice.
HELD_OUT = {"tasks4": [3, 4, 5]}
ROWS_CSV = REPO / "docs" / "demo-study-rows.csv"
GRIDS_CSV = REPO / "docs" / "demo-study-grids.csv"
GOALS = {"ptq_loss": 20.0, "qat_recovery": 0.70, "oracle_share": 0.80, "oracle_specific": 3.0, "calib_share": 0.70}


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key, nested maps merged rather than replaced."""
    out = dict(base)
    for name, value in changes.items():
        out[name] = merged(out.get(name, {}), value) if isinstance(value, dict) else value
    return out


def config_for(key: str, seeds: list[int] | None = None) -> tuple[Path, str]:
    """The config file of a setting and its run name (``seeds``: run only these so far)."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    _, overrides = SETTINGS[key]
    cfg = copy.deepcopy(base)
    for name, value in overrides.items():
        if name == "tasks":
            cfg["tasks"] = {t: {} for t in value}
        elif isinstance(value, dict) and name != "quant":  # a quantizer is replaced whole
            cfg[name] = merged(cfg.get(name, {}), value)
        else:
            cfg[name] = value
    if seeds:
        cfg["seeds"] = list(seeds)
    cfg["name"] = "default" if key == "default" else f"study-{key}"
    path = REPO / "results" / "study" / f"{key}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg["name"]


def copy_trained(source: Path, target: Path, kinds) -> None:
    """The store jobs of ``kinds`` of config ``source`` copied into the folders of the same jobs (same
    labels) of config ``target`` where those differ and are missing, file times kept (so Snakemake sees
    them as up to date), each with the target's own job file (which names the folder it was copied from).
    Nothing is copied where the two configs share the job, or where the source has not run it."""
    from qvlib.store import JOB, JOB_FILE, LOG_FILE
    from run_store import effective, plan_of

    def plan(path: Path):
        return plan_of(effective(yaml.safe_load(path.read_text())))

    donors = {(job.kind, *sorted(job.labels.items())): job for job in plan(source).jobs() if job.kind in kinds}
    for job in plan(target).jobs():
        found = donors.get((job.kind, *sorted(job.labels.items())))
        if found is None or found.key == job.key:
            continue
        have, missing = [REPO / f for f in found.files], [REPO / f for f in job.files]
        if not all(f.exists() for f in have) or all(f.exists() for f in missing):
            continue
        folder = REPO / job.folder
        folder.mkdir(parents=True, exist_ok=True)
        for path in [*have, REPO / found.folder / LOG_FILE]:
            if path.exists():
                shutil.copy2(path, folder / path.name)
        doc = job.document()
        doc[JOB] = {**doc[JOB], "copied_from": found.folder}
        (folder / JOB_FILE).write_text(json.dumps(doc, sort_keys=True) + "\n")


def run(key: str, cores: int, seeds: list[int] | None = None) -> None:
    path, name = config_for(key, seeds)
    if key in REUSES:
        source, kinds = REUSES[key]
        copy_trained(config_for(source)[0], path, kinds)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", str(path), "-q"],
                   cwd=REPO, env=env, check=True)
    timing = REPO / "results" / "study" / f"{key}.time.json"
    before = json.loads(timing.read_text())["wall_s"] if seeds and timing.exists() else 0.0
    timing.write_text(json.dumps({"wall_s": before + time.perf_counter() - t0}))


def rows_of(key: str, seeds: list[int] | None = None) -> list[dict]:
    """Per seed (and pooled): the demo's figures and whether they meet the goals, recomputed from the
    run's cells with this checkout's code. With ``seeds``, only the row pooled over those seeds."""
    _, name = config_for(key)
    out = REPO / "results" / name / ARCH
    baselines, transfer = pl.read_parquet(out / "baselines.parquet"), pl.read_parquet(out / "transfer.parquet")
    if seeds:
        baselines, transfer = (t.filter(pl.col("seed").is_in(seeds)) for t in (baselines, transfer))
    pair_rows = pairs(transfer)
    everything = summary_specific(specific(pair_rows))
    summary = everything.filter((pl.col("scope") == "overall") & (pl.col("kind") == "single"))
    merged = everything.filter((pl.col("scope") == "donor") & (pl.col("kind") == "merged") & (pl.col("rule") == Rule.ORACLE))
    heads = headline(baselines, pair_rows)
    timing = REPO / "results" / "study" / f"{key}.time.json"
    minutes = json.loads(timing.read_text())["wall_s"] / 60 if timing.exists() else None
    rows = []
    for seed in [*heads["seed"].to_list(), None]:
        if seed is None and len(heads) < 2:
            continue
        spec = {r["rule"]: r for r in summary.filter(pl.col("seed").is_null() if seed is None else pl.col("seed") == seed).to_dicts()}
        h = heads.filter(pl.col("seed") == seed) if seed is not None else heads
        oracle, calib = spec[Rule.ORACLE], spec[Rule.CALIB]
        ptq_loss, recovery = float(h["ptq_loss_mean"].mean()), float(h["qat_recovery"].mean())
        meets = (ptq_loss >= GOALS["ptq_loss"] and recovery >= GOALS["qat_recovery"]
                 and oracle["share_donor_beats_random"] >= GOALS["oracle_share"]
                 and oracle["specific_gain"] >= GOALS["oracle_specific"] and oracle["ci_low"] > 0
                 and calib["share_donor_beats_random"] >= GOALS["calib_share"])
        rows.append({
            "setting": key, "machine": cpu_label(), "seed": "pooled" if seed is None else str(seed),
            "FT": float(h["ft_mean"].mean()), "PTQ loss": ptq_loss, "QAT recovers %": 100 * recovery,
            "donor oracle": oracle["donor_gain"], "random oracle": oracle["random_gain"],
            "specific oracle [95% CI]": f"{oracle['specific_gain']:+.1f} [{oracle['ci_low']:+.1f}, {oracle['ci_high']:+.1f}]",
            "wins oracle %": 100 * oracle["share_donor_beats_random"],
            "specific calib [95% CI]": f"{calib['specific_gain']:+.1f} [{calib['ci_low']:+.1f}, {calib['ci_high']:+.1f}]",
            "wins calib %": 100 * calib["share_donor_beats_random"],
            "specific lambda=1": spec[Rule.LAMBDA1]["specific_gain"],
            "wins lambda=1 %": 100 * spec[Rule.LAMBDA1]["share_donor_beats_random"],
            "pairs": oracle["pairs"], "verdict (oracle)": oracle["verdict"],
            "merged donor oracle specific [95% CI]": _merged_cell(merged, seed),
            "meets goals": ("yes" if meets else "no") if seed is not None
            else ("every seed" if all(r["meets goals"] == "yes" for r in rows) else "not every seed"),
            "run min": minutes if (seed is None or len(heads) == 1) and not seeds else None,
        })
    if seeds:
        return [{**rows[-1], "seed": "pooled " + ", ".join(map(str, seeds))}]
    return rows


def all_rows(key: str) -> list[dict]:
    """A setting's rows, and for a setting with held-out seeds the row pooled over those alone."""
    rows = rows_of(key)
    return rows + rows_of(key, HELD_OUT[key]) if key in HELD_OUT else rows


def grid_selection(key: str) -> list[dict]:
    """Per seed, the oracle's specific gain and win share when the best lambda is taken over a sub-grid
    of the setting's lambdas (the setting's own rows, re-read; nothing is re-evaluated)."""
    out = REPO / "results" / config_for(key)[1] / ARCH
    transfer, rows = pl.read_parquet(out / "transfer.parquet"), []
    for grid in SUB_GRIDS:
        summary = summary_specific(specific(single_donors(pairs(transfer.filter(pl.col("lambda").is_in(grid))))))
        summary = summary.filter((pl.col("scope") == "overall") & (pl.col("rule") == Rule.ORACLE))
        per_seed = summary.sort("seed", nulls_last=True).to_dicts()
        for r in per_seed if len(per_seed) > 2 else per_seed[:1]:  # one seed: its pooled row is the same row
            rows.append({"setting": key, "machine": cpu_label(), "lambdas": ", ".join(f"{g:g}" for g in grid), "seed": "pooled" if r["seed"] is None else str(r["seed"]),
                         "donor oracle": r["donor_gain"], "random oracle": r["random_gain"],
                         "specific oracle [95% CI]": f"{r['specific_gain']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]",
                         "wins oracle %": 100 * r["share_donor_beats_random"], "pairs": r["pairs"]})
    return rows


def _merged_cell(merged: pl.DataFrame, seed) -> str:
    """The leave-one-out merged donor's specific gain at the oracle lambda and its win share, where the run has one."""
    rows = merged.filter(pl.col("seed").is_null() if seed is None else pl.col("seed") == seed).to_dicts()
    return "; ".join(f"{r['task']} {r['specific_gain']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}], wins "
                     f"{100 * r['share_donor_beats_random']:.0f}%" for r in rows)


def as_text(rows: list[dict]) -> list[dict[str, str]]:
    """Rows as the doc prints them (floats to one decimal, missing as empty): the form kept in the CSVs."""
    return [{k: cell_text(v) for k, v in r.items()} for r in rows]


def with_carried(fresh: list[dict], csv: Path, keys: list[str]) -> pl.DataFrame:
    """``fresh`` rows plus the rows of ``csv`` whose (setting, machine) ``fresh`` does not recompute,
    grouped by setting in the order of ``keys`` (within one: carried machines first); all text."""
    now = pl.DataFrame(as_text(fresh)) if fresh else pl.DataFrame()
    kept = pl.read_csv(csv, infer_schema=False) if csv.exists() else pl.DataFrame()
    if len(kept) and len(now):
        redone = now.select("setting", "machine").unique()
        kept = kept.join(redone, on=["setting", "machine"], how="anti")
    frames = [f for f in (kept, now) if len(f)]
    if not frames:
        return pl.DataFrame()
    table = pl.concat(frames, how="diagonal")
    order = {k: i for i, k in enumerate(keys)}
    table = table.filter(pl.col("setting").is_in(keys))
    return table.with_columns(pl.col("setting").replace_strict(order, return_dtype=pl.Int64).alias("_order")) \
        .sort("_order", maintain_order=True).drop("_order")


def machine_pairs(table: pl.DataFrame) -> pl.DataFrame:
    """Per (setting, seed) measured on more than one machine: the headline figures side by side."""
    if not len(table):
        return table
    shown = ["PTQ loss", "QAT recovers %", "wins oracle %", "specific oracle [95% CI]", "wins calib %", "meets goals"]
    several = table.group_by("setting").agg(pl.col("machine").n_unique().alias("machines")).filter(pl.col("machines") > 1)
    rows = table.join(several.select("setting"), on="setting", how="semi")
    return rows.select("setting", "seed", "machine", *shown).sort("setting", "seed", maintain_order=True)


def report(keys: list[str]) -> str:
    here = [k for k in keys if (REPO / "results" / config_for(k)[1] / ARCH / "summary_specific.parquet").exists()]
    table = with_carried([r for k in here for r in all_rows(k)], ROWS_CSV, keys)
    grid_keys = [k for k in ("steps300", "tasks6", "tasks4", "default", "holdout") if k in here]
    grids = with_carried([r for k in grid_keys for r in grid_selection(k)], GRIDS_CSV, keys)
    for frame, csv in ((table, ROWS_CSV), (grids, GRIDS_CSV)):
        if len(frame):
            frame.write_csv(csv)
    lines = [
        "# The demo study: what makes the embedded demo show transfer beyond a random direction",
        "",
        "Generated by `.venv/bin/python bench/demo_study.py --report` from the runs' own tables (results/*/vit_demo/).",
        "Each row names the CPU that measured it (model and the instruction set of torch's CPU kernels): the same",
        "config and seed train to different weights on different CPUs (their matrix kernels round differently and",
        "2-bit rounding amplifies it), so a setting run on two machines has a row set per machine. Rows of runs",
        "that are not under results/ here are carried from docs/demo-study-rows.csv, which this script writes.",
        f"This report was written on: {machine_line()}.",
        "",
        "Settings (each is `config/config.yaml` with these keys replaced):",
        "",
        *[f"- `{k}`: {SETTINGS[k][0]}" for k in keys],
        "",
        "Gains are Top-1 points over the receiver's PTQ accuracy, means over the donor-receiver pairs of a seed;",
        "`specific` = donor gain - mean gain of the donor's own norm-matched random directions under the same",
        "lambda rule, with a 95% bootstrap interval over pairs (pooled rows: over seeds, then pairs); `wins` =",
        "share of pairs where the donor beats its random control (a tie is not a win). `run min` = wall minutes of",
        "the whole `snakemake` calls of that setting on the row's machine, install excluded. AMD EPYC rows: steps300",
        "is the call that added seeds 1 and 2 to `make run`'s seed 0; tasks6 and steps1200 there start from",
        "steps300's backbones, so their times leave pretraining out; other work shared the 2 cores during some of",
        "those runs: treat them as upper bounds. Xeon rows: tasks6 in two calls from nothing (seed 2, then seeds 0",
        "and 1), pretraining included, nothing else running; tasks4 in one call that trained seeds 3-5 from nothing",
        "and reused tasks6's models for seeds 0-2 (their leave-one-out merged donors and cells recomputed); the",
        "default in one call that reused tasks4's models and cells and added numerals' on all six seeds.",
        "Goals, on every seed: PTQ loss >= 20, QAT recovers >= 70%, oracle wins >= 80% with specific >= +3 and",
        "its interval above 0, calib wins >= 70%. `meets goals` of a pooled row says whether every seed met them.",
        "",
        markdown_table(table) if len(table) else "(no study run found under results/)",
        "",
    ]
    twice = machine_pairs(table)
    if len(twice):
        lines += [
            "## The same setting and seed on two machines",
            "",
            "Same code, config and seed; only the CPU differs (`bench/cpu_numerics.py` shows where: kernels of",
            "another instruction set round differently from the first training step on, and 2-bit codes flip):",
            "",
            markdown_table(twice),
            "",
        ]
    if len(grids):
        lines += [
            "## The oracle's best-of-sweep selection (rows re-read over sub-grids of the lambdas, nothing re-evaluated)",
            "",
            "The oracle rule takes each vector's best lambda on test: the donor's and, separately, each random",
            "direction's. A random direction's accuracy moves by a few points from one lambda to the next with no",
            "trend (2-bit rounding flips), so its best of k lambdas gains more the larger k is, while the donor's",
            "curve has a real peak. Below, the same evaluated cells with the best taken over fewer lambdas (the last",
            "rows of a setting are the lambda = 1 rule): where a setting's wins rise as the grid shrinks, the oracle's",
            "shortfall is this selection, not the donors. The sub-grids were chosen after seeing these seeds, so they",
            "are not a retuned default.",
            "",
            markdown_table(grids),
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only write the doc from existing results")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", help="run the settings on these seeds only (more can be added later)")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "demo-study.md")
    args = parser.parse_args()
    if not args.report:
        for key in args.settings:
            run(key, args.cores, args.seeds)
    text = report(list(SETTINGS))
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
