"""Figures and the markdown summary, all derived from the Parquet tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .tables import headline
from .vectors import atomic_write

CONTROL_COLUMNS = ("random", "self")
DPI = 110


def gain_figure_size(n_receivers: int, n_donors: int) -> tuple[float, float]:
    """Inches of the gain heatmap figure (two panels of donors plus two control columns each)."""
    return 2.0 + 1.6 * (n_donors + 2.5), 2.8 + 0.55 * n_receivers


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gain_matrices(pair_rows: pl.DataFrame, column: str):
    """(donor grid, control columns) as pandas frames indexed by receiver, for one gain column."""
    real = pair_rows.filter(pl.col("control") == "none")
    receivers = sorted(set(pair_rows["receiver"].to_list()))
    donors = sorted(set(real["donor"].to_list()) | set(receivers))
    grid = (real.pivot(on="donor", index="receiver", values=column).to_pandas().set_index("receiver")
            .reindex(index=receivers, columns=donors))
    controls = {}
    rand = pair_rows.filter(pl.col("control") == "random").group_by("receiver").agg(pl.col(column).mean())
    controls["random"] = dict(zip(rand["receiver"].to_list(), rand[column].to_list()))
    own = pair_rows.filter(pl.col("control") == "self")
    controls["self"] = dict(zip(own["receiver"].to_list(), own[column].to_list()))
    import pandas as pd

    ctrl = pd.DataFrame({c: [controls[c].get(r) for r in receivers] for c in CONTROL_COLUMNS}, index=receivers, dtype=float)
    return grid, ctrl


def heatmap_gain(pair_rows: pl.DataFrame, output: str | Path, title: str = "") -> Path:
    """Gain over PTQ at lambda = 1 and at the best lambda (test-set oracle), side by side; rows are
    receivers, columns donors; the random-direction control (mean over donors) and the receiver's
    own vector ('self') are separate columns on the right of each panel."""
    import seaborn as sns

    plt = _matplotlib()
    panels = [("gain_lambda1", "gain at lambda = 1"), ("gain_oracle", "gain at best lambda (oracle)")]
    mats = [gain_matrices(pair_rows, col) for col, _ in panels]
    vmax = max(1.0, *(float(abs(m).max().max()) for pair in mats for m in pair if m.size))
    n_rows, n_cols = mats[0][0].shape
    fig = plt.figure(figsize=gain_figure_size(n_rows, n_cols))
    grid = fig.add_gridspec(1, 5, width_ratios=[n_cols, 2, 0.6, n_cols, 2], wspace=0.08)
    kw = dict(cmap="RdYlGn", center=0.0, vmin=-vmax, vmax=vmax, annot=True, fmt=".1f", cbar=False,
              linewidths=0.5, linecolor="white", annot_kws={"size": 8})
    for k, ((col, label), (donors, controls)) in enumerate(zip(panels, mats)):
        ax = fig.add_subplot(grid[0, 3 * k])
        sns.heatmap(donors, ax=ax, **kw)
        ax.set_title(label)
        ax.set_xlabel("donor")
        ax.set_ylabel("receiver" if k == 0 else "")
        ax.tick_params(axis="y", rotation=0)
        if k:
            ax.set_yticklabels([])
        cax = fig.add_subplot(grid[0, 3 * k + 1])
        sns.heatmap(controls, ax=cax, **kw)
        cax.set_yticklabels([])
        cax.set_ylabel("")
        cax.set_title("controls", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=1.6 / fig.get_figwidth(), right=0.98, top=1 - 0.9 / fig.get_figheight(), bottom=1.3 / fig.get_figheight())
    return _save(fig, output, tight=False)


def heatmap_cosine(cosine: pl.DataFrame, output: str | Path, title: str = "") -> Path:
    import seaborn as sns

    plt = _matplotlib()
    mat = cosine.pivot(on="task_b", index="task_a", values="cosine").to_pandas().set_index("task_a")
    order = sorted(mat.index)
    mat = mat.reindex(index=order, columns=order)
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(order), 1.0 + 0.55 * len(order)))
    sns.heatmap(mat, ax=ax, cmap="vlag", center=0.0, vmin=-1, vmax=1, annot=True, fmt=".2f", annot_kws={"size": 8})
    ax.set_title(title or "cosine similarity of quantization vectors")
    ax.set_xlabel("")
    ax.set_ylabel("")
    return _save(fig, output)


def _save(fig, output: str | Path, tight: bool = True) -> Path:
    plt = _matplotlib()
    if tight:
        fig.tight_layout()
    path = atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    plt.close(fig)
    return path


def markdown_table(df: pl.DataFrame, digits: int = 1) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def summary_markdown(arch: str, baselines: pl.DataFrame, pair_rows: pl.DataFrame, norms: pl.DataFrame) -> str:
    h = headline(baselines, pair_rows)
    test = (baselines.filter(pl.col("split") == "test")
            .pivot(on="model", index="task", values="accuracy")
            .select("task", "ft", "ptq", "qat_ptq", "qat").sort("task"))
    real = pair_rows.filter(pl.col("control") == "none")
    rand = pair_rows.filter(pl.col("control") == "random").group_by("receiver").agg(
        pl.col("gain_lambda1").mean().alias("random_lambda1"), pl.col("gain_oracle").mean().alias("random_oracle"))
    own = pair_rows.filter(pl.col("control") == "self").select("receiver", pl.col("gain_lambda1").alias("self_lambda1"))
    per_receiver = (real.sort("gain_oracle", descending=True).group_by("receiver", maintain_order=True)
                    .agg(pl.col("donor").first().alias("best_donor"), pl.col("gain_oracle").max().alias("best_oracle"),
                         pl.col("gain_lambda1").max().alias("best_lambda1"), pl.col("gain_calib").mean().alias("mean_calib"))
                    .join(rand, on="receiver", how="left").join(own, on="receiver", how="left")
                    .with_columns((pl.col("best_oracle") - pl.col("random_oracle")).alias("best_minus_random"))
                    .sort("receiver"))
    qv = norms.filter(pl.col("layer_type") == "all").select("task", "ft_update_rel", "qv_rel").sort("task")
    return "\n".join([
        f"# {arch}: quantization-vector transfer",
        "",
        f"{int(h['tasks'])} tasks, {int(h['pairs'])} donor-receiver pairs. Accuracies are Top-1 (%) on each task's test split;",
        "gains are points over the receiver's PTQ accuracy.",
        "",
        f"- PTQ loses {h['ptq_loss_mean']:.1f} points on average (FT {h['ft_mean']:.1f} -> PTQ {h['ptq_mean']:.1f});"
        f" QAT recovers {100 * h['qat_recovery']:.0f}% of that loss (QAT quantized {h['qat_ptq_mean']:.1f}).",
        f"- lambda = 1: mean gain {h['lambda1_mean']:+.1f}, {100 * h['lambda1_positive']:.0f}% of pairs positive, best {h['lambda1_best']:+.1f}"
        + (f"; random direction {h['lambda1_random_mean']:+.1f}." if "lambda1_random_mean" in h else "."),
        f"- best lambda (oracle on test): mean gain {h['oracle_mean']:+.1f}, {100 * h['oracle_positive']:.0f}% positive, best {h['oracle_best']:+.1f}"
        + (f"; random direction {h['oracle_random_mean']:+.1f}." if "oracle_random_mean" in h else "."),
        f"- lambda chosen on calib (deployable): mean gain {h['calib_mean']:+.1f}, {100 * h['calib_positive']:.0f}% positive"
        + (f"; random direction {h['calib_random_mean']:+.1f}." if "calib_random_mean" in h else "."),
        "",
        "## Baselines (test Top-1)",
        "",
        markdown_table(test),
        "",
        "## Per receiver: best donor against the controls",
        "",
        "`best_minus_random` is the best donor's oracle gain minus the mean gain of norm-matched random directions;",
        "`self_lambda1` is the receiver's own vector at lambda = 1 (its QAT model), the upper bound.",
        "",
        markdown_table(per_receiver),
        "",
        "## Size of the moves (quantized weights)",
        "",
        "`ft_update_rel` = ||theta_FT - theta_0|| / ||theta_0||, `qv_rel` = ||rho|| / ||theta_FT||.",
        "",
        markdown_table(qv, digits=3),
        "",
    ])
