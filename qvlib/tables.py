"""Tables of the grid, with polars: baselines, every cell with its gain, one row per pair, summaries.

Gains are derived here from the stored accuracies (gain = accuracy - PTQ accuracy of the receiver
on the same split), never stored by the evaluation jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import polars as pl

# How lambda is chosen for a pair: fixed at 1 (the paper's Fig. 2 left), the best on the test
# split (oracle, Fig. 2 right), or the best on the calib split, then scored on test (deployable).
SETTINGS = ("lambda=1", "oracle", "calib")


def read_all(paths: Iterable[str | Path]) -> pl.DataFrame:
    frames = [pl.read_parquet(p) for p in paths]
    if not frames:
        raise ValueError("no input tables")
    return pl.concat(frames, how="diagonal_relaxed")


def with_gain(cells: pl.DataFrame, baselines: pl.DataFrame) -> pl.DataFrame:
    """Each cell joined with its receiver's PTQ accuracy on the same split, and the gain over it."""
    ptq = (baselines.filter(pl.col("model") == "ptq")
           .select("arch", pl.col("task").alias("receiver"), "split", pl.col("accuracy").alias("ptq_accuracy")))
    out = cells.join(ptq, on=["arch", "receiver", "split"], how="left")
    missing = out.filter(pl.col("ptq_accuracy").is_null())
    if len(missing):
        row = missing.row(0, named=True)
        raise ValueError(f"no PTQ baseline for receiver {row['receiver']!r} ({row['arch']}, split {row['split']})")
    return out.with_columns((pl.col("accuracy") - pl.col("ptq_accuracy")).alias("gain"))


def pairs(transfer: pl.DataFrame) -> pl.DataFrame:
    """One row per (arch, receiver, donor, control): the gain under each way of choosing lambda."""
    keys = ["arch", "receiver", "donor", "control"]
    sweep = transfer.filter(pl.col("search") == "sweep")
    test = sweep.filter(pl.col("split") == "test")
    at_one = test.filter(pl.col("lambda") == 1.0).select(*keys, pl.col("gain").alias("gain_lambda1"))
    near_one = (pl.col("lambda") - 1.0).abs()
    oracle = (test.sort([*keys, "accuracy", near_one], descending=[False] * 4 + [True, False])
              .group_by(keys, maintain_order=True).first()
              .select(*keys, pl.col("gain").alias("gain_oracle"), pl.col("lambda").alias("lambda_oracle")))
    calib_pick = (sweep.filter(pl.col("split") == "calib")
                  .sort([*keys, "accuracy", near_one], descending=[False] * 4 + [True, False])
                  .group_by(keys, maintain_order=True).first()
                  .select(*keys, pl.col("lambda").alias("lambda_calib")))
    calib = (calib_pick.join(test.select(*keys, "lambda", "gain"), left_on=[*keys, "lambda_calib"], right_on=[*keys, "lambda"])
             .rename({"gain": "gain_calib"}))
    out = at_one.join(oracle, on=keys, how="full", coalesce=True).join(calib, on=keys, how="left")
    adaptive = transfer.filter((pl.col("search") == "adaptive") & (pl.col("split") == "test"))
    if len(adaptive):
        out = out.join(adaptive.select(*keys, pl.col("gain").alias("gain_adaptive"), pl.col("lambda").alias("lambda_adaptive")),
                       on=keys, how="left")
    return out.sort(keys)


def _summary(pair_rows: pl.DataFrame, by: str) -> pl.DataFrame:
    rows = []
    columns = {"lambda=1": "gain_lambda1", "oracle": "gain_oracle", "calib": "gain_calib"}
    for setting, col in columns.items():
        if col not in pair_rows.columns:
            continue
        rows.append(pair_rows.group_by(["arch", by, "control"]).agg(
            pl.lit(setting).alias("setting"),
            pl.col(col).mean().alias("mean_gain"),
            pl.col(col).max().alias("best_gain"),
            pl.col(col).min().alias("worst_gain"),
            (pl.col(col) > 0).mean().alias("share_positive"),
            pl.col(col).count().alias("pairs"),
        ))
    return pl.concat(rows).sort(["arch", by, "control", "setting"])


def summary_donor(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per donor over its receivers (self excluded): how good a robustness injector it is."""
    return _summary(pair_rows.filter(pl.col("control") != "self"), "donor")


def summary_receiver(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Per receiver over its donors, plus its own vector as control 'self' (the QAT upper bound)."""
    return _summary(pair_rows, "receiver")


def headline(baselines: pl.DataFrame, pair_rows: pl.DataFrame) -> dict[str, float]:
    """The figures the README quotes: PTQ loss, QAT recovery, gains over real donor pairs."""
    test = baselines.filter(pl.col("split") == "test").pivot(on="model", index=["arch", "task"], values="accuracy")
    loss = test["ft"] - test["ptq"]
    recovered = (test["qat_ptq"] - test["ptq"]).sum() / max(loss.sum(), 1e-9)
    real = pair_rows.filter(pl.col("control") == "none")
    rand = pair_rows.filter(pl.col("control") == "random")
    out = {
        "tasks": float(len(test)),
        "ft_mean": float(test["ft"].mean()),
        "ptq_mean": float(test["ptq"].mean()),
        "qat_ptq_mean": float(test["qat_ptq"].mean()),
        "ptq_loss_mean": float(loss.mean()),
        "qat_recovery": float(recovered),
        "pairs": float(len(real)),
    }
    for setting, col in (("lambda1", "gain_lambda1"), ("oracle", "gain_oracle"), ("calib", "gain_calib")):
        out[f"{setting}_mean"] = float(real[col].mean())
        out[f"{setting}_positive"] = float((real[col] > 0).mean())
        out[f"{setting}_best"] = float(real[col].max())
        if len(rand):
            out[f"{setting}_random_mean"] = float(rand[col].mean())
    return out
