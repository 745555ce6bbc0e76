"""Tables of the grid, with polars: baselines, every cell with its gain, one row per pair, the
specific gain of every donor over its random control, and summaries with intervals.

Gains are derived here from the stored accuracies (gain = accuracy - PTQ accuracy of the receiver
on the same split and seed), never stored by the evaluation jobs. Every table carries ``seed``
(the replicate); summaries have one row per seed and a pooled row with ``seed`` null.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import polars as pl

from .stats import bootstrap_mean, verdict
from .vocab import (DATAFREE_GAIN_PREFIX, LambdaTies, MERGED_PREFIX, RULE_COLUMNS, Control, DonorKind, Rule, Search, Split,
                    QUANTIZED_VARIANTS, Variant, rule_columns)

RUN_KEYS = ["arch", "quant", "seed"]  # one replicate of one grid
PAIR_KEYS = [*RUN_KEYS, "receiver", "donor"]


def read_table(path: str | Path) -> pl.DataFrame:
    """One Parquet file; a truncated or foreign file raises ValueError naming it and the way out."""
    try:
        return pl.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # polars raises several kinds (ComputeError, OSError, ...) for a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable Parquet table ({reason}): delete it and rerun the workflow, "
                         "which rebuilds it") from None


def read_all(paths: Iterable[str | Path]) -> pl.DataFrame:
    frames = [read_table(p) for p in paths]
    if not frames:
        raise ValueError("no input tables")
    return pl.concat(frames, how="diagonal_relaxed")


def quantized_model() -> pl.Expr:
    """Column ``quantized`` of baselines.parquet: whether the row's model runs with quantized weights
    (``ptq`` = FT quantized, ``qat_ptq`` = QAT quantized) or in full precision (``ft``, ``qat``)."""
    return pl.col("model").is_in([str(v) for v in QUANTIZED_VARIANTS]).alias("quantized")


def with_gain(cells: pl.DataFrame, baselines: pl.DataFrame) -> pl.DataFrame:
    """Each cell joined with its receiver's PTQ accuracy on the same split and seed, and the gain over it."""
    ptq = (baselines.filter(pl.col("model") == Variant.PTQ)
           .select(*RUN_KEYS, pl.col("task").alias("receiver"), "split", pl.col("accuracy").alias("ptq_accuracy")))
    out = cells.join(ptq, on=[*RUN_KEYS, "receiver", "split"], how="left", maintain_order="left")
    missing = out.filter(pl.col("ptq_accuracy").is_null())
    if len(missing):
        row = missing.row(0, named=True)
        raise ValueError(f"no PTQ baseline for receiver {row['receiver']!r} ({row['arch']}, seed {row['seed']}, split {row['split']})")
    return out.with_columns((pl.col("accuracy") - pl.col("ptq_accuracy")).alias("gain"))


def _best(rows: pl.DataFrame, keys: list[str], ties: str = LambdaTies.NEAREST_ONE) -> pl.DataFrame:
    """The row of highest accuracy per key; ties go to the lambda nearest 1, then the smaller
    (``ties`` nearest_one), or to the smallest lambda (``ties`` smallest, the authors' rule)."""
    ties = LambdaTies(ties)
    order = ["lambda"] if ties == LambdaTies.SMALLEST else [(pl.col("lambda") - 1.0).abs(), "lambda"]
    return (rows.sort([*keys, "accuracy", *order], descending=[False] * len(keys) + [True] + [False] * len(order))
            .group_by(keys, maintain_order=True).first())


def whole_split_sweep(transfer: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The sweep's rows scored on a whole split: every ``sweep`` row, and the ``racing`` rows of the
    lambdas that reached the end of their race (those a race dropped early saw fewer images)."""
    sweep = transfer.filter(pl.col("search").is_in([str(Search.SWEEP), str(Search.RACING)]))
    return sweep.filter(pl.col("n") == pl.col("n").max().over([*keys, "split"]))


def pairs(transfer: pl.DataFrame, ties: str = LambdaTies.NEAREST_ONE) -> pl.DataFrame:
    """One row per (arch, quant, seed, receiver, donor, control): the gain under each lambda rule.

    Each random direction picks its own best lambda (oracle, calib) like a donor does; a pair's
    several random directions are then averaged (``directions`` counts them)."""
    keys = [*PAIR_KEYS, "control", "control_seed"]
    sweep = whole_split_sweep(transfer.with_columns(pl.col("control_seed").fill_null(-1)), keys)
    test = sweep.filter(pl.col("split") == Split.TEST)
    at_one = test.filter(pl.col("lambda") == 1.0).select(*keys, pl.col("gain").alias("gain_lambda1"))
    oracle = _best(test, keys, ties).select(*keys, pl.col("gain").alias("gain_oracle"), pl.col("lambda").alias("lambda_oracle"))
    calib_pick = _best(sweep.filter(pl.col("split") == Split.CALIB), keys, ties).select(*keys, pl.col("lambda").alias("lambda_calib"))
    calib = (calib_pick.join(test.select(*keys, "lambda", "gain"), left_on=[*keys, "lambda_calib"], right_on=[*keys, "lambda"])
             .rename({"gain": "gain_calib"}))
    out = at_one.join(oracle, on=keys, how="full", coalesce=True).join(calib, on=keys, how="left")
    adaptive = transfer.filter((pl.col("search") == Search.ADAPTIVE) & (pl.col("split") == Split.TEST))
    if len(adaptive):
        adaptive = adaptive.with_columns(pl.col("control_seed").fill_null(-1))
        out = out.join(adaptive.select(*keys, pl.col("gain").alias("gain_adaptive"), pl.col("lambda").alias("lambda_adaptive")),
                       on=keys, how="left")
    if "criterion" in transfer.columns:
        datafree = transfer.filter((pl.col("search") == Search.DATAFREE) & (pl.col("split") == Split.TEST))
        datafree = datafree.with_columns(pl.col("control_seed").fill_null(-1))
        for criterion in sorted(datafree["criterion"].unique().to_list()):
            picked = datafree.filter(pl.col("criterion") == criterion)
            out = out.join(picked.select(*keys, pl.col("gain").alias(f"{DATAFREE_GAIN_PREFIX}{criterion}"),
                                         pl.col("lambda").alias(f"lambda_datafree_{criterion}")), on=keys, how="left")
    values = [c for c in out.columns if c not in keys]
    return (out.sort(keys).group_by([*PAIR_KEYS, "control"], maintain_order=True)
            .agg(*(pl.col(c).mean() for c in values), pl.len().cast(pl.Int64).alias("directions"))
            .with_columns(donor_kind().alias("kind"))
            .sort([*PAIR_KEYS, "control"]))


def donor_kind() -> pl.Expr:
    """``merged`` for a leave-one-out merged donor (``merged:<method>``), ``single`` for one task's vector."""
    return (pl.when(pl.col("donor").str.starts_with(MERGED_PREFIX)).then(pl.lit(str(DonorKind.MERGED)))
            .otherwise(pl.lit(str(DonorKind.SINGLE))))


def single_donors(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """The pairs whose donor is one task's vector (merged donors and their controls left out)."""
    return pair_rows.filter(pl.col("kind") == DonorKind.SINGLE)


# Accuracies are whole counts over a split, so a donor and the mean of its random directions that
# score the same differ only by float rounding (2.3 - mean(2.2, 2.3, 2.4) = 1e-15): rounding the
# difference makes such a tie exactly 0, which counts as no win.
TIE_DECIMALS = 9


def specific(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per donor pair and lambda rule: donor gain, random-control gain and their difference
    (``specific_gain``, a tie exactly 0): what the donor's direction adds beyond a perturbation of the same size."""
    donor = pair_rows.filter(pl.col("control") == Control.DONOR)
    rand = pair_rows.filter(pl.col("control") == Control.RANDOM)
    frames = []
    for rule, col in rule_columns(pair_rows.columns).items():
        frames.append(donor.select(*PAIR_KEYS, "kind", pl.col(col).alias("donor_gain"))
                      .join(rand.select(*PAIR_KEYS, pl.col(col).alias("random_gain"), "directions"), on=PAIR_KEYS, how="inner")
                      .with_columns(pl.lit(str(rule)).alias("rule"),
                                    (pl.col("donor_gain") - pl.col("random_gain")).round(TIE_DECIMALS).alias("specific_gain")))
    if not frames or not sum(len(f) for f in frames):
        raise ValueError("no donor pair has a random control: run the grid with random_controls >= 1")
    return (pl.concat(frames).drop_nulls("specific_gain")
            .select(*PAIR_KEYS, "kind", "rule", "donor_gain", "random_gain", "specific_gain", "directions")
            .with_columns(rule_order()).sort([*PAIR_KEYS, "_order", "rule"]).drop("_order"))


def _interval_row(rows: pl.DataFrame, pooled: bool) -> dict:
    spec = rows["specific_gain"].to_list()
    ci = bootstrap_mean(spec, rows["seed"].to_list() if pooled else None)
    return {"donor_gain": float(rows["donor_gain"].mean()), "random_gain": float(rows["random_gain"].mean()),
            "specific_gain": ci.mean, "ci_low": ci.low, "ci_high": ci.high,
            "share_donor_beats_random": float((rows["specific_gain"] > 0).mean()),
            "pairs": len(rows), "seeds": rows["seed"].n_unique(), "verdict": str(verdict(ci))}


def summary_specific(spec_rows: pl.DataFrame) -> pl.DataFrame:
    """Specific gain overall, per receiver and per donor, for each lambda rule: mean, bootstrap 95%
    interval over pairs (over seeds and pairs for the pooled rows, ``seed`` null), share of pairs
    where the donor beats its random control, and the verdict."""
    out = []
    for scope, by in (("overall", None), ("receiver", "receiver"), ("donor", "donor")):
        keys = ["arch", "quant", "kind", "rule"] + ([by] if by else [])
        for key, rows in spec_rows.group_by(keys, maintain_order=True):
            named = dict(zip(keys, key))
            base = {"arch": named["arch"], "quant": named["quant"], "kind": named["kind"], "rule": named["rule"],
                    "scope": scope, "task": named.get(by) if by else None}
            for seed, seed_rows in rows.group_by("seed", maintain_order=True):
                out.append({**base, "seed": seed[0], **_interval_row(seed_rows, pooled=False)})
            out.append({**base, "seed": None, **_interval_row(rows, pooled=True)})
    return (pl.DataFrame(out, schema_overrides={"seed": pl.Int64, "task": pl.Utf8}).with_columns(rule_order())
            .sort(["arch", "quant", "kind", "scope", "task", "_order", "rule", "seed"], nulls_last=True).drop("_order"))


def _summary(pair_rows: pl.DataFrame, by: str) -> pl.DataFrame:
    """Per seed and pooled (``seed`` null: the mean of the per-seed figures and ``mean_gain_sd``,
    their standard deviation over seeds)."""
    rows = []
    for rule, col in rule_columns(pair_rows.columns).items():
        rows.append(pair_rows.group_by([*RUN_KEYS, by, "control", "kind"], maintain_order=True).agg(
            pl.lit(str(rule)).alias("rule"),
            pl.col(col).mean().alias("mean_gain"),
            pl.col(col).max().alias("best_gain"),
            pl.col(col).min().alias("worst_gain"),
            (pl.col(col) > 0).mean().alias("share_positive"),
            pl.col(col).count().alias("pairs"),
        ))
    per_seed = pl.concat(rows)
    stats = ["mean_gain", "best_gain", "worst_gain", "share_positive"]
    pooled = (per_seed.sort([*RUN_KEYS, by, "control", "kind", "rule"])
              .group_by(["arch", "quant", by, "control", "kind", "rule"], maintain_order=True)
              .agg(*(pl.col(c).mean() for c in stats), pl.col("mean_gain").std().alias("mean_gain_sd"), pl.col("pairs").sum())
              .with_columns(pl.lit(None, dtype=per_seed.schema["seed"]).alias("seed")))
    return (pl.concat([per_seed, pooled], how="diagonal_relaxed")
            .sort(["arch", "quant", by, "kind", "control", "rule", "seed"], nulls_last=True))


def summary_donor(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per donor over its receivers (self excluded): how good a robustness injector it is."""
    return _summary(pair_rows.filter(pl.col("control") != Control.SELF), "donor")


def summary_receiver(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per receiver over its donors, plus its own vector as control 'self' (the QAT upper bound)."""
    return _summary(pair_rows, "receiver")


def headline(baselines: pl.DataFrame, pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per seed, the figures the README quotes: PTQ loss, QAT recovery, single donors' and their random
    controls' gains."""
    pair_rows = single_donors(pair_rows)
    test = baselines.filter(pl.col("split") == Split.TEST).pivot(on="model", index=[*RUN_KEYS, "task"], values="accuracy")
    base = test.group_by(RUN_KEYS, maintain_order=True).agg(
        pl.len().alias("tasks"),
        pl.col(Variant.FT).mean().alias("ft_mean"),
        pl.col(Variant.PTQ).mean().alias("ptq_mean"),
        pl.col(Variant.QAT_PTQ).mean().alias("qat_ptq_mean"),
        (pl.col(Variant.FT) - pl.col(Variant.PTQ)).mean().alias("ptq_loss_mean"),
        # share of the PTQ loss that QAT recovers; undefined (null) where PTQ loses nothing
        pl.when((pl.col(Variant.FT) - pl.col(Variant.PTQ)).sum() > 0)
        .then((pl.col(Variant.QAT_PTQ) - pl.col(Variant.PTQ)).sum() / (pl.col(Variant.FT) - pl.col(Variant.PTQ)).sum())
        .alias("qat_recovery"),
    )
    gains = []
    for rule, col in rule_columns(pair_rows.columns).items():
        key = col.removeprefix("gain_")
        gains += [pl.col(col).filter(pl.col("control") == Control.DONOR).mean().alias(f"{key}_mean"),
                  (pl.col(col).filter(pl.col("control") == Control.DONOR) > 0).mean().alias(f"{key}_positive"),
                  pl.col(col).filter(pl.col("control") == Control.DONOR).max().alias(f"{key}_best"),
                  pl.col(col).filter(pl.col("control") == Control.RANDOM).mean().alias(f"{key}_random_mean")]
    pairs_n = (pl.col("control") == Control.DONOR).sum().alias("pairs")
    return (base.join(pair_rows.group_by(RUN_KEYS, maintain_order=True).agg(pairs_n, *gains), on=RUN_KEYS, how="left")
            .sort(RUN_KEYS))


def quantizers(baselines: pl.DataFrame, pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per arch, quantizer and lambda rule (seeds pooled): FT, PTQ, QAT and QV-patched test accuracy
    (single donors, and their random controls), and the patched models' gain over the *best data-free
    PTQ of the same bit-width* on each receiver: whether a vector adds anything once a better
    quantizer is used. Means over tasks / pairs, test split."""
    test = baselines.filter(pl.col("split") == Split.TEST).pivot(on="model", index=[*RUN_KEYS, "task", "bits"], values="accuracy")
    best_ptq = test.group_by("arch", "seed", "bits", "task", maintain_order=True).agg(pl.col(Variant.PTQ).max().alias("best_ptq"))
    test = test.join(best_ptq, on=["arch", "seed", "bits", "task"], maintain_order="left")
    base = test.group_by("arch", "quant", "bits", maintain_order=True).agg(
        pl.col(Variant.FT).mean().alias("ft"), pl.col(Variant.PTQ).mean().alias("ptq"),
        pl.col(Variant.QAT_PTQ).mean(), pl.col("best_ptq").mean().alias("best_ptq_same_bits"),
        pl.col("seed").n_unique().alias("seeds"))
    pairs_ = single_donors(pair_rows).filter(pl.col("control").is_in([str(Control.DONOR), str(Control.RANDOM)]))
    pairs_ = pairs_.join(test.select(*RUN_KEYS, pl.col("task").alias("receiver"), Variant.PTQ, "best_ptq"),
                         on=[*RUN_KEYS, "receiver"], maintain_order="left")
    frames = []
    for rule, col in RULE_COLUMNS.items():  # the fixed rules; data-free ones have their own comparison in summary.md
        patched = pl.col(Variant.PTQ) + pl.col(col)
        agg = []
        for control, name in ((Control.DONOR, "patched"), (Control.RANDOM, "random")):
            pick = pl.col("control") == control
            agg += [patched.filter(pick).mean().alias(name),
                    (patched - pl.col("best_ptq")).filter(pick).mean().alias(f"{name}_over_best_ptq")]
        frames.append(pairs_.group_by("arch", "quant", maintain_order=True).agg(pl.lit(str(rule)).alias("rule"), *agg,
                                                           (pl.col("control") == Control.DONOR).sum().alias("pairs")))
    out = base.join(pl.concat(frames), on=["arch", "quant"], how="left", maintain_order="left_right")
    return out.with_columns(rule_order()).sort("arch", "bits", "quant", "_order").drop("_order")


def rule_order() -> pl.Expr:
    """``_order``: a rule's place in :class:`Rule` (lambda = 1, oracle, calib), data-free rules after them."""
    order = {str(r): i for i, r in enumerate(Rule)}
    return pl.col("rule").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_order")
