"""Zero-shot lambda: which data-free rule picks a lambda (and a donor) as well as labelled calib does.

    # 1. score: every data-free measure at every lambda of the sweep (and 0) for every cell of the
    #    finished seeds, on each image source (noise, the donor's training images, other tasks' images, images
    #    synthesized from the receiver);
    #    cached in <results>/zero_shot_scores/<images>-seed<seed>.parquet (a scored seed is not redone;
    #    seeds can be scored by processes side by side)
    nice -n 19 .venv/bin/python bench/zero_shot_lambda.py --results results/default/vit_demo --seeds 0 1 2 3 7 8 --score
    # 2. select on seeds 0-3, then report fresh seeds (7, 8) held out with the selected rules only;
    #    --report writes the doc
    .venv/bin/python bench/zero_shot_lambda.py --results results/default/vit_demo --select 0 1 2 3 --heldout 7 8 \\
        --report docs/zero-shot-lambda.md

No image of the receiver's task is ever read: proxy images come from qvlib.datafree.task_images,
which refuses the receiver's task, through qvlib.datafree.proxy_tasks. The test gain of the lambda a
rule picks is read from the run's own cells (no new evaluation); lambda = 1, calib and oracle come
from qvlib.tables.pairs on the same cells, and every rule is applied to the donor's random controls
too (specific gain = donor gain - mean random-control gain under the same rule).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvlib.config import Config  # noqa: E402
from qvlib.data.registry import load_task, stable_seed  # noqa: E402
from qvlib.fileio import write_parquet  # noqa: E402
from qvlib.datafree import Rule, choose_lambda, input_measures, proxy_inputs, weight_error  # noqa: E402
from qvlib.pipeline import load_engine, random_control_seeds  # noqa: E402
from qvlib.provenance import machine_line  # noqa: E402
from qvlib.stats import bootstrap_mean  # noqa: E402
from qvlib.tables import pairs, read_all, with_gain, whole_split_sweep  # noqa: E402
from qvlib.vectors import WeightVector, random_direction  # noqa: E402
from qvlib.vocab import Control, Split  # noqa: E402
from run_store import RunStore  # noqa: E402

MERGED = "merged:mean"
TOLERANCES = (0.0, 0.05, 0.1, 0.25)  # a rule takes the lambda nearest 1 among those within (1 + tol) x the lowest score
KEYS = ["seed", "receiver", "donor", "control", "control_seed"]


# ---------------------------------------------------------------------------------------------- scoring
def run_config(results: Path, seeds: list[int], config: Path | None = None) -> Config:
    """The run's config (``config``, by default the one its last job wrote) with every studied seed
    among its replicates: the workflow rewrites it per invocation, e.g. with seeds [1] while seed 0's
    files are already there. Another config finds the store's files of the run made with it."""
    cfg = Config.load(config or results.parent / "config.yaml")
    return Config({**cfg.raw, "seeds": sorted(set(cfg.seeds) | set(seeds))}, cfg.path)


def seed_finished(results: Path, cfg: Config, seed: int) -> bool:
    """Whether every cell (each donor, the receiver itself, the merged donor) and baseline of the seed
    is in the store."""
    run, quant, tasks = RunStore(results, cfg), cfg.quant.tag, cfg.task_names
    try:
        for r in tasks:
            run.baselines(r, seed, quant)
            for d in [*tasks, "merged-mean"]:
                run.cell(r, d, seed, quant)
    except (FileNotFoundError, ValueError):  # not run yet, or not a job of the config
        return False
    return True


def score_seed(results: Path, cfg: Config, seed: int, n_images: int, train_sets: dict) -> pl.DataFrame:
    cfg = cfg.with_seed(seed)
    arch, run, quant = results.name, RunStore(results, cfg), cfg.quant.tag
    tasks = cfg.task_names
    lambdas = [0.0, *map(float, cfg.lambdas)]
    rows = []
    for receiver in tasks:
        engine, ckpt = load_engine(cfg, arch, run.ft(receiver, seed), "cpu")
        pre = engine.preprocess

        def images(source: str, donor_tasks: list[str]) -> torch.Tensor:
            return proxy_inputs(source, n_images, pre, receiver=receiver, donor_tasks=donor_tasks, all_tasks=tasks,
                                train_split=train_sets.__getitem__, model=engine.model,
                                seed=stable_seed("noise-images", seed) if source == "noise" else seed)

        others = images("others", [])
        noise = images("noise", [])
        synth = images("synth", [])
        donors = [(d, run.vector(d, seed, quant), [d]) for d in tasks if d != receiver]
        donors.append((MERGED, run.merged(receiver, "mean", seed, quant), [t for t in tasks if t != receiver]))
        for donor, path, donor_tasks in donors:
            rho = WeightVector.load(path)
            inputs = {"noise": noise, "others": others, "synth": synth, "donor": images("donor", donor_tasks)}
            variants = [(str(Control.DONOR), -1, rho)] + [(str(Control.RANDOM), s, random_direction(rho, s))
                                                          for s in random_control_seeds(cfg, donor)]
            for control, cseed, vec in variants:
                base = {"seed": seed, "receiver": receiver, "donor": donor, "control": control, "control_seed": cseed}
                for lam, score in weight_error(ckpt, vec, cfg.quant, lambdas, cfg.policy).items():
                    rows.append({**base, "source": "weights", "measure": "weights", "lambda": lam, "score": score})
                for source, x in inputs.items():
                    for lam, ms in input_measures(ckpt, vec, cfg.quant, lambdas, cfg.policy, model=engine.model, inputs=x).items():
                        rows += [{**base, "source": source, "measure": m, "lambda": lam, "score": v} for m, v in ms.items()]
    return pl.DataFrame(rows)


def scores_file(results: Path, n_images: int, seed: int) -> Path:
    """One seed's scores (one file per seed, so that seeds can be scored by processes side by side)."""
    return results / "zero_shot_scores" / f"{n_images}-seed{seed}.parquet"


def score(results: Path, seeds: list[int], n_images: int, config: Path | None = None) -> None:
    cfg = run_config(results, seeds, config)
    todo = [s for s in seeds if not scores_file(results, n_images, s).exists()]
    if not todo:
        print(f"seeds {seeds} already scored")
        return
    train_sets = {}
    run = RunStore(results, cfg)
    for s in todo:
        if not seed_finished(results, cfg, s):
            print(f"seed {s}: cells not finished, skipped")
            continue
        if not train_sets:
            for t in cfg.task_names:  # the tasks' own training splits (without calib), as the workflow draws them
                probe = load_engine(cfg, results.name, run.ft(t, s), "cpu")[0]
                train_sets[t] = load_task(t, cfg.load_options(t, probe.preprocess)).train
        t0 = time.time()
        frame = score_seed(results, cfg, s, n_images, train_sets)
        out = write_parquet(frame, scores_file(results, n_images, s))
        print(f"seed {s}: {len(frame)} scores in {time.time() - t0:.0f} s -> {out}")


# ---------------------------------------------------------------------------------------------- rules
MIXED_SOURCES = (("others", "synth"), ("donor", "synth"), ("others", "donor"))  # the measure on both image sets together


def mixed_scores(scores: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """An input measure on the union of two equal-sized image sources: the mean of its two scores
    (exact for the mean KL and the disagreement share; the feature error's pooled ratio is
    approximated by the mean of the two ratios), named ``a+b``."""
    both = scores.filter(pl.col("source").is_in([a, b]) & (pl.col("measure") != "weights"))
    return (both.group_by([*KEYS, "measure", "lambda"], maintain_order=True)
            .agg(pl.col("score").mean(), pl.len().alias("n")).filter(pl.col("n") == 2).drop("n")
            .with_columns(pl.lit(f"{a}+{b}").alias("source")).select(scores.columns))


def picks(scores: pl.DataFrame, sweep_lambdas: list[float]) -> pl.DataFrame:
    """Per cell variant and rule (qvlib.datafree.Rule): the lambda it picks among the sweep's, and
    the rank score (best score / score at lambda 0: the share of PTQ's departure from the receiver left)."""
    rows = []
    scores = pl.concat([scores, *(mixed_scores(scores, a, b) for a, b in MIXED_SOURCES)], how="diagonal_relaxed")
    for key, g in scores.group_by([*KEYS, "source", "measure"], maintain_order=True):
        d = dict(zip(g["lambda"].to_list(), g["score"].to_list()))
        at0 = d.get(0.0, float("nan"))
        cand = {lam: d[lam] for lam in sweep_lambdas if lam in d}
        for tol in TOLERANCES:
            if key[6] == "weights" and tol != 0.0:
                continue
            rule = Rule(key[6], key[5] if key[6] != "weights" else "noise", tol)
            lam = choose_lambda(cand, tol)
            rows.append({**dict(zip(KEYS, key[:5])), "rule": rule.name, "lambda": lam,
                         "rank_score": cand[lam] / at0 if at0 > 0 else float("nan")})
    return pl.DataFrame(rows)


def load_cells(results: Path, cfg: Config, seeds: list[int]) -> pl.DataFrame:
    run, quant, cells, base = RunStore(results, cfg), cfg.quant.tag, [], []
    donors = [*cfg.task_names, *(f"merged-{m}" for m in cfg.merged_donors)]
    for s in seeds:  # each seed's cells and baselines in the order of their old file names
        cells += [run.cell(r, d, s, quant) for r, d in sorted(((r, d) for r in cfg.task_names for d in donors),
                                                              key=lambda rd: (rd[0], f"{rd[1]}.parquet"))]
        base += [run.baselines(t, s, quant) for t in sorted(cfg.task_names, key=lambda t: f"{t}.parquet")]
    return with_gain(read_all(cells), read_all(base))


def evaluate(results: Path, seeds: list[int], n_images: int, rules: list[str] | None = None,
             config: Path | None = None) -> dict:
    """Per rule: the pooled tables of the study on ``seeds``."""
    cfg = run_config(results, seeds, config)
    transfer = load_cells(results, cfg, seeds)
    ref = pairs(transfer)  # lambda = 1, calib, oracle, per (pair, control), random controls averaged
    ref = ref.rename({"donor": "donor"}).select("seed", "receiver", "donor", "control", "gain_lambda1", "gain_calib", "gain_oracle")
    keys5 = KEYS
    test = whole_split_sweep(transfer.with_columns(pl.col("control_seed").fill_null(-1)), ["arch", "quant", *keys5])
    test = test.filter(pl.col("split") == Split.TEST).select(*keys5, "lambda", "gain")
    scores = pl.concat([pl.read_parquet(scores_file(results, n_images, s)) for s in seeds])
    chosen = picks(scores, [float(x) for x in cfg.lambdas])
    if rules is not None:
        chosen = chosen.filter(pl.col("rule").is_in(rules))
    chosen = chosen.join(test, on=[*keys5, "lambda"], how="left")
    if chosen["gain"].null_count():
        raise ValueError("a picked lambda has no test cell")
    per_pair = (chosen.group_by(["seed", "receiver", "donor", "control", "rule"])
                .agg(pl.col("gain").mean(), pl.col("lambda").mean(), pl.col("rank_score").mean())
                .join(ref, on=["seed", "receiver", "donor", "control"], how="left")
                .with_columns(pl.when(pl.col("donor") == MERGED).then(pl.lit("merged")).otherwise(pl.lit("single")).alias("kind"))
                .sort(["seed", "receiver", "donor", "control", "rule"]))  # one order, so that the bootstrap draws repeat
    return {"per_pair": per_pair, "cfg": cfg}


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    if not len(pos) or not len(neg):
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def rule_table(per_pair: pl.DataFrame) -> pl.DataFrame:
    """One row per (rule, kind): pooled donor gain with its interval, lambda = 1 / calib / oracle, the
    random controls under the rule, specific gain with its interval, worst seed against lambda = 1,
    and the AUROC of -rank score for specific gain > 0."""
    donor = per_pair.filter(pl.col("control") == Control.DONOR)
    rand = per_pair.filter(pl.col("control") == Control.RANDOM).select("seed", "receiver", "donor", "rule",
                                                                       pl.col("gain").alias("random_gain"),
                                                                       pl.col("rank_score").alias("random_rank"))
    both = donor.join(rand, on=["seed", "receiver", "donor", "rule"], how="inner").with_columns(
        (pl.col("gain") - pl.col("random_gain")).alias("specific")).sort(["seed", "receiver", "donor", "rule"])
    rows = []
    for (rule, kind), g in both.group_by(["rule", "kind"], maintain_order=True):
        iv = bootstrap_mean(g["gain"].to_list(), g["seed"].to_list())
        sp = bootstrap_mean(g["specific"].to_list(), g["seed"].to_list())
        per_seed = g.group_by("seed").agg((pl.col("gain").mean() - pl.col("gain_lambda1").mean()).alias("d"))
        s = g["specific"].to_numpy() > 0
        rs = -g["rank_score"].to_numpy()
        rows.append({"rule": rule, "kind": kind, "pairs": len(g), "gain": iv.mean, "low": iv.low, "high": iv.high,
                     "lambda1": g["gain_lambda1"].mean(), "calib": g["gain_calib"].mean(), "oracle": g["gain_oracle"].mean(),
                     "of_calib": iv.mean / g["gain_calib"].mean(), "random": g["random_gain"].mean(),
                     "specific": sp.mean, "specific_low": sp.low, "specific_high": sp.high,
                     "worst_seed_vs_lambda1": per_seed["d"].min(), "median_lambda": g["lambda"].median(),
                     "auroc": _auroc(rs[s], rs[~s]),
                     "auroc_vs_random": _auroc(*(lambda v: (v[s], v[~s]))(g["random_rank"].to_numpy() - g["rank_score"].to_numpy()))})
    return pl.DataFrame(rows).sort(["kind", "gain", "rule"], descending=[False, True, False])


def donor_choice(per_pair: pl.DataFrame) -> pl.DataFrame:
    """Per rule: for each (seed, receiver), the donor (single or merged) of lowest rank score at its
    picked lambda, and its test gain there, beside the mean single donor, the best single donor
    (its oracle gain) and the merged donor under the same rule."""
    donor = per_pair.filter(pl.col("control") == Control.DONOR)
    rows = []
    for (rule,), g in donor.group_by(["rule"], maintain_order=True):
        top = g.sort("rank_score").group_by(["seed", "receiver"]).first()
        single = g.filter(pl.col("kind") == "single").group_by(["seed", "receiver"]).agg(
            pl.col("gain").mean().alias("mean_single"), pl.col("gain_oracle").max().alias("best_single_oracle"),
            pl.col("gain").max().alias("best_single_rule"))
        merged = g.filter(pl.col("kind") == "merged").select("seed", "receiver", pl.col("gain").alias("merged"))
        t = top.join(single, on=["seed", "receiver"]).join(merged, on=["seed", "receiver"]).sort(["seed", "receiver"])
        iv = bootstrap_mean(t["gain"].to_list(), t["seed"].to_list())
        rows.append({"rule": rule, "receivers": len(t), "top_ranked": iv.mean, "low": iv.low, "high": iv.high,
                     "mean_single": t["mean_single"].mean(), "best_single_rule": t["best_single_rule"].mean(),
                     "best_single_oracle": t["best_single_oracle"].mean(), "merged": t["merged"].mean(),
                     "top_is_merged": float((t["donor"] == MERGED).mean())})
    return pl.DataFrame(rows).sort(["top_ranked", "rule"], descending=[True, False])


# ---------------------------------------------------------------------------------------------- output
def _fmt(df: pl.DataFrame, cols: list[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.iter_rows(named=True):
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:+.2f}" if isinstance(v, float) and c not in ("auroc", "auroc_vs_random", "of_calib", "selection", "median_lambda", "top_is_merged",
                                                                               "single_auroc", "single_of_calib", "merged_of_calib")
                         else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


MAIN_COLS = ["rule", "pairs", "gain", "low", "high", "lambda1", "calib", "oracle", "of_calib", "random", "specific",
             "specific_low", "specific_high", "worst_seed_vs_lambda1", "median_lambda", "auroc", "auroc_vs_random"]
DONOR_COLS = ["rule", "receivers", "top_ranked", "low", "high", "mean_single", "best_single_rule", "best_single_oracle",
              "merged", "top_is_merged"]


def selection_score(table: pl.DataFrame) -> pl.DataFrame:
    """A rule's selection score on the selection seeds: the smaller of its single and merged shares of
    calib's pooled gain (both must hold), ties broken by the worse seed against lambda = 1."""
    wide = table.group_by("rule").agg(pl.col("of_calib").min().alias("min_of_calib"),
                                      pl.col("worst_seed_vs_lambda1").min().alias("worst_seed"),
                                      pl.col("specific_low").min().alias("min_specific_low"))
    return wide.sort(["min_of_calib", "worst_seed", "rule"], descending=[True, True, False])  # the name: ties in one order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="a run's results/<config>/<arch> folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="--score: the seeds to score")
    ap.add_argument("--score", action="store_true", help="score the finished seeds (cached)")
    ap.add_argument("--images", type=int, default=256, help="proxy / noise images per criterion")
    ap.add_argument("--select", type=int, nargs="+", default=None, help="selection seeds: every rule, ranked")
    ap.add_argument("--heldout", type=int, nargs="+", default=None, help="held-out seeds: the selected rules only")
    ap.add_argument("--report", type=Path, default=None, help="write the study (markdown) here")
    ap.add_argument("--config", type=Path, default=None,
                    help="the config the run was made with (default: <results>/../config.yaml, the last job's)")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report's setup (where the seeds ran)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.score:
        score(args.results, args.seeds, args.images, args.config)
    if not args.select:
        return 0
    sel = evaluate(args.results, args.select, args.images, config=args.config)
    table = rule_table(sel["per_pair"])
    ranked = selection_score(table)
    print(f"selection seeds {args.select}:")
    print("\n".join(_fmt(_compact(table, ranked), ["rule", "selection", "single", "single_of_calib", "merged", "merged_of_calib", "worst_seed",
                                                   "single_specific_low", "single_auroc"])))
    for kind in ("single", "merged"):
        print(f"{kind}:")
        print("\n".join(_fmt(table.filter(pl.col("kind") == kind), MAIN_COLS)))
    print("\n".join(_fmt(donor_choice(sel["per_pair"]), DONOR_COLS)))
    winner = ranked["rule"][0]
    out = {"select": args.select, "winner": winner, "selection": table, "ranked": ranked, "donors": donor_choice(sel["per_pair"])}
    if args.heldout:
        keep = held_rules(ranked)
        held = evaluate(args.results, args.heldout, args.images, rules=keep, config=args.config)
        out["heldout"] = rule_table(held["per_pair"])
        out["heldout_donors"] = donor_choice(held["per_pair"])
        out["heldout_per_seed"] = per_seed_table(held["per_pair"], winner)
        print(f"held-out seeds {args.heldout}:")
        print("\n".join(_fmt(out["heldout"], ["kind", *MAIN_COLS])))
        print("\n".join(_fmt(out["heldout_donors"], DONOR_COLS)))
        print("\n".join(_fmt(out["heldout_per_seed"], ["seed", "kind", "pairs", "rule", "lambda1", "calib", "oracle"])))
    if args.report:
        write_report(args, out)
    return 0


def held_rules(ranked: pl.DataFrame) -> list[str]:
    """The rules read on the held-out seeds: the selected one, the runner-up, and the old data-free rules."""
    return list(dict.fromkeys([*ranked["rule"][:2].to_list(), "outputs", "weights"]))


def per_seed_table(per_pair: pl.DataFrame, rule: str) -> pl.DataFrame:
    d = per_pair.filter((pl.col("control") == Control.DONOR) & (pl.col("rule") == rule))
    return (d.group_by(["seed", "kind"]).agg(pl.len().alias("pairs"), pl.col("gain").mean().alias("rule"),
                                             pl.col("gain_lambda1").mean().alias("lambda1"), pl.col("gain_calib").mean().alias("calib"),
                                             pl.col("gain_oracle").mean().alias("oracle"))
            .sort(["kind", "seed"]))


def _compact(table: pl.DataFrame, ranked: pl.DataFrame) -> pl.DataFrame:
    """One row per rule: single and merged pooled gain and share of calib, worst seed, specific interval."""
    s = table.filter(pl.col("kind") == "single").select("rule", pl.col("gain").alias("single"), pl.col("of_calib").alias("single_of_calib"),
                                                       pl.col("specific_low").alias("single_specific_low"), pl.col("auroc").alias("single_auroc"))
    m = table.filter(pl.col("kind") == "merged").select("rule", pl.col("gain").alias("merged"), pl.col("of_calib").alias("merged_of_calib"))
    return (ranked.select("rule", pl.col("min_of_calib").alias("selection"), "worst_seed")
            .join(s, on="rule", maintain_order="left").join(m, on="rule", maintain_order="left"))


def _goal(table: pl.DataFrame, rule: str) -> list[str]:
    lines = []
    ok = True
    for kind in ("single", "merged"):
        r = table.filter((pl.col("rule") == rule) & (pl.col("kind") == kind)).row(0, named=True)
        share, worst, low = r["of_calib"], r["worst_seed_vs_lambda1"], r["specific_low"]
        met = share >= 0.95 and worst >= 0 and low > 0
        ok &= met
        lines.append(f"- {kind} donors: {r['gain']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] = {share:.0%} of calib's {r['calib']:+.2f} "
                     f"(goal >= 95%: {'yes' if share >= 0.95 else 'no'}); worst seed against lambda = 1: {worst:+.2f} "
                     f"(goal >= 0: {'yes' if worst >= 0 else 'no'}); specific gain {r['specific']:+.2f} "
                     f"[{r['specific_low']:+.2f}, {r['specific_high']:+.2f}] (goal: interval above 0: {'yes' if low > 0 else 'no'})")
    lines.append(f"- goal {'met' if ok else 'not met'} on these seeds.")
    return lines


def render(args, out: dict) -> str:
    sel, held = args.select, args.heldout or []
    winner, runner_up = out["winner"], out["ranked"]["rule"][1]
    cmd_score = (f"nice -n 19 .venv/bin/python bench/zero_shot_lambda.py --results {args.results} --seeds "
                 f"{' '.join(map(str, sel + held))} --score --images {args.images}")
    cmd_report = (f".venv/bin/python bench/zero_shot_lambda.py --results {args.results} --images {args.images} --select "
                  f"{' '.join(map(str, sel))}" + (f" --heldout {' '.join(map(str, held))}" if held else "") + f" --report {args.report}"
                  + "".join(f" --note {shlex.quote(n)}" for n in args.note))
    rules = sorted(out["selection"]["rule"].unique().to_list())
    lines = [
        "# Zero-shot lambda: choosing lambda (and the donor) without the receiver's data",
        "",
        "<!-- written by bench/zero_shot_lambda.py --report; do not edit by hand -->",
        "",
        "**The question** (issue 33). The method's promise is zero-shot: no data of the receiver. The lambda of the patch "
        "`Q(theta_R + lambda rho_D)` is chosen in the workflow on a labelled calib split of the receiver (`calib`), which a "
        "zero-shot user does not have. Which rule, reading no image of the receiver's task, picks a lambda as good as calib's, "
        "and can the same score say which donor to use?",
        "",
        "**The rules tried.** Each scores every lambda of the sweep (lower is better) and takes the lowest "
        "(`~t`: the lambda nearest 1 among those within (1 + t) x the lowest score); nothing else is tuned.",
        "",
        "- `weights`: `||Q(theta + lambda rho) - theta||^2 / ||theta||^2` per layer, no images (the old rule).",
        "- `outputs@S`, `agreement@S`, `features@S` (`outputs` alone: on noise): how far the patched, quantized receiver lands from the full-precision "
        "receiver on images S: mean KL of the class probabilities, share of top-1 disagreements, relative error of the "
        "pre-logit features (`qvlib.datafree.input_measures`, one forward pass per lambda).",
        f"- images S ({args.images} per source): `noise` (standard-normal images, the old `outputs` rule), `donor` (the donor's "
        "own training images; for the leave-one-out merged donor, its tasks'), `others` (training images of every task but the "
        "receiver's), `synth` (images synthesized from the receiver's model alone: class-conditional inversion, "
        "`qvlib.datafree.synthesized_images`), and two sources together, `a+b` (both image sets: here the mean of the two "
        "sets' scores, which is the measure on their union for `outputs` and `agreement`; for `features` the mean of two "
        "ratios stands in for the pooled one). `qvlib.datafree.proxy_inputs` refuses the receiver's task before any image is "
        "read (tests/test_datafree.py proves it for every receiver and source).",
        "",
        "Every rule is applied to the donor's three norm-matched random directions too: *specific gain* = donor gain - mean "
        "random-direction gain under the same rule (a rule that lifts random directions as well is not specific). The test "
        "gains of the lambdas a rule picks are read from the run's own cells (no new evaluation); lambda = 1, calib and oracle "
        "come from `qvlib.tables.pairs` on the same cells; intervals are `qvlib.stats.bootstrap_mean` over pairs within seeds.",
        "",
        f"**Selection on seeds {', '.join(map(str, sel))} only**; seeds {', '.join(map(str, held)) or '(none yet)'} "
        "read once afterwards, with the selected rule, the runner-up and the old rules. The selection score of a rule is the smaller of its single-donor and "
        "merged-donor shares of calib's pooled gain (ties: the better worst seed against lambda = 1).",
        "",
        "Commands (the workflow run, then the scoring and this report):",
        "",
        "```",
        f"PATH=$PWD/.venv/bin:$PATH snakemake --cores 2 --config 'seeds=[{','.join(map(str, sel + held))}]'",
        cmd_score,
        cmd_report,
        "```",
        "",
        f"Machine: {machine_line()}.",
        *([""] + list(args.note) if args.note else []),
        "",
        f"## Selection seeds {', '.join(map(str, sel))}: every rule",
        "",
        "Pooled test gain over PTQ (points), single donors and the leave-one-out merged donor; share of the calib rule's "
        "gain; the worse of the two kinds' worst seed against lambda = 1; the lower end of the single donors' specific-gain "
        "interval; AUROC of the rank score (best score / score at lambda 0) for 'specific gain > 0'.",
        "",
        *_fmt(_compact(out["selection"], out["ranked"]), ["rule", "selection", "single", "single_of_calib", "merged", "merged_of_calib",
                                                          "worst_seed", "single_specific_low", "single_auroc"]),
        "",
        f"Selected: **`{winner}`**.",
        "",
        "### Selection seeds, the selected rule, the runner-up and the old ones in full",
        "",
    ]
    keep = held_rules(out["ranked"])
    for kind in ("single", "merged"):
        t = out["selection"].filter(pl.col("rule").is_in(pl.Series(keep).implode()) & (pl.col("kind") == kind))
        lines += [f"{kind} donors:", "", *_fmt(t, MAIN_COLS), ""]
    lines += ["### Which donor (selection seeds)", "",
              "Per receiver and seed, the donor (four single donors and the merged one) whose rank score is the lowest, "
              "at the lambda the rule picks, against the mean single donor, the best single donor under the rule, the best "
              "single donor at its oracle lambda, and the merged donor under the rule.", "",
              *_fmt(out["donors"].filter(pl.col("rule").is_in(pl.Series(keep + [r for r in rules if r.startswith(winner.split('~')[0])]).implode())), DONOR_COLS), ""]
    if "heldout" in out:
        lines += [f"## Seeds {', '.join(map(str, held))}: not used for the selection", "",
                  f"The selected rule `{winner}` and the runner-up `{runner_up}` beside the old data-free rules (`outputs`: KL on "
                  "noise, `weights`), lambda = 1, calib and oracle; these seeds were read once, after the selection was fixed.", ""]
        for kind in ("single", "merged"):
            t = out["heldout"].filter(pl.col("kind") == kind)
            lines += [f"{kind} donors:", "", *_fmt(t, MAIN_COLS), ""]
        lines += ["Per seed (donor pairs, `rule` = the selected rule):", "", *_fmt(out["heldout_per_seed"], ["seed", "kind", "pairs", "rule", "lambda1", "calib", "oracle"]), "",
                  "Which donor (held out):", "", *_fmt(out["heldout_donors"], DONOR_COLS), "",
                  "### The goal", "",
                  "At least 95% of calib's pooled gain for single and merged donors, never below lambda = 1 on any seed, "
                  "specific gain's 95% interval above 0:", "", *_goal(out["heldout"], winner), ""]
    return "\n".join(lines) + "\n"


def write_report(args, out: dict) -> None:
    args.report.write_text(render(args, out))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    sys.exit(main())
