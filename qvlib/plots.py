"""Figures and the markdown summary, all derived from the Parquet tables."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .provenance import machine_line
from .tables import headline, single_donors
from .fileio import atomic_write
from .vocab import DATAFREE_RULE_PREFIX, MERGED_PREFIX, RULE_COLUMNS, Control, DonorKind, Rule, Split, VARIANT_LABELS, Variant

CONTROL_COLUMNS = (Control.RANDOM, Control.SELF)
DPI = 110
GAIN_UNITS = "gain over PTQ, points"
COSINE_UNITS = "cosine similarity"
CELL_W, CELL_H = 0.62, 0.42  # inches per heatmap cell: room for an annotation such as "-12.3"
NEUTRAL = "#e6e6e6"  # cells shown apart from the colour scale (self column, cosine diagonal) and missing cells
GAIN_TOP, COSINE_TOP, FIG_BOTTOM = 1.05, 0.7, 0.3  # inches above and below the cells (tick labels overflow into the crop)


def gain_figure_size(n_receivers: int, n_donors: int, n_controls: int = 2) -> tuple[float, float]:
    """Inches of the gain heatmap's canvas before it is cropped to its content (``bbox_inches='tight'``):
    two panels of ``n_donors`` donor columns (single and merged donors) plus ``n_controls`` control
    columns each, and the colour bar. The PNG written is at most this size times :data:`DPI`."""
    return 3.0 + 2 * CELL_W * (n_donors + n_controls + 0.6) + 1.0, GAIN_TOP + CELL_H * n_receivers + FIG_BOTTOM


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gain_matrices(pair_rows: pl.DataFrame, column: str):
    """(donor grid, control columns) as pandas frames indexed by receiver, for one gain column, each
    cell the mean over seeds. The donor grid: every single donor (the diagonal, a receiver's own vector,
    is empty), then each leave-one-out merged donor (``merged:<method>``). The control columns: the
    single donors' random directions (mean over donors), then the receiver's own vector ('self')."""
    import pandas as pd

    merged = (pair_rows.filter((pl.col("kind") == DonorKind.MERGED) & (pl.col("control") == Control.DONOR))
              .group_by("receiver", "donor", maintain_order=True).agg(pl.col(column).mean()))
    pair_rows = single_donors(pair_rows).group_by("receiver", "donor", "control", maintain_order=True).agg(pl.col(column).mean())
    real = pair_rows.filter(pl.col("control") == Control.DONOR)
    receivers = sorted(set(pair_rows["receiver"].to_list()))
    donors = sorted(set(real["donor"].to_list()) | set(receivers))
    grid = (real.pivot(on="donor", index="receiver", values=column).to_pandas().set_index("receiver")
            .reindex(index=receivers, columns=donors).astype(float))
    for label in sorted(set(merged["donor"].to_list())):
        rows = merged.filter(pl.col("donor") == label)
        gains = dict(zip(rows["receiver"].to_list(), rows[column].to_list()))
        grid[label] = [gains.get(r) for r in receivers]
    controls = {}
    rand = pair_rows.filter(pl.col("control") == Control.RANDOM).group_by("receiver", maintain_order=True).agg(pl.col(column).mean())
    controls[Control.RANDOM] = dict(zip(rand["receiver"].to_list(), rand[column].to_list()))
    own = pair_rows.filter(pl.col("control") == Control.SELF)
    controls[Control.SELF] = dict(zip(own["receiver"].to_list(), own[column].to_list()))
    ctrl = pd.DataFrame({str(c): [controls[c].get(r) for r in receivers] for c in CONTROL_COLUMNS}, index=receivers, dtype=float)
    grid.columns.name = ctrl.columns.name = None
    grid.index.name = ctrl.index.name = None
    return grid.astype(float), ctrl


def gain_color_range(donor_grids) -> float:
    """Half-width of the gain colour scale (centred on 0): the largest |gain| among the donor cells
    (single and merged donors) of every panel, at least 1 point. The controls do not set it: the
    receiver's own vector ('self') gains tens of points and would wash out the donors' -2..+3."""
    values = [float(abs(g).max().max()) for g in donor_grids if g.size and g.notna().any().any()]
    return max([1.0, *values])


def _annot_size(n_cells: int) -> float:
    return 8.0 if n_cells <= 12 else 7.0 if n_cells <= 24 else 6.0


def _label_axes(ax, xlabel: str = "", ylabel: str = "", yticks: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=45, length=0)
    for t in ax.get_xticklabels():
        t.set_horizontalalignment("right")
        t.set_rotation_mode("anchor")
    ax.tick_params(axis="y", rotation=0, length=0)
    if not yticks:
        ax.set_yticklabels([])


def _quiet(make):
    """``make``'s figure, without numpy's warnings about the columns that a mask leaves all empty."""
    import functools
    import warnings

    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
            return make(*args, **kwargs)

    return wrapper


@_quiet
def gain_figure(pair_rows: pl.DataFrame, title: str = ""):
    """The gain heatmaps as a matplotlib figure (see :func:`heatmap_gain`)."""
    import seaborn as sns
    from matplotlib.colors import ListedColormap, TwoSlopeNorm

    plt = _matplotlib()
    panels = [("gain_lambda1", "lambda = 1"), ("gain_oracle", "best lambda (oracle on test)")]
    mats = [gain_matrices(pair_rows, col) for col, _ in panels]
    vmax = gain_color_range([donors for donors, _ in mats])
    n_rows, n_cols = mats[0][0].shape
    n_ctrl = mats[0][1].shape[1]
    fig = plt.figure(figsize=gain_figure_size(n_rows, n_cols, n_ctrl))
    height = fig.get_figheight()
    grid = fig.add_gridspec(1, 6, width_ratios=[n_cols, n_ctrl, 0.6, n_cols, n_ctrl, 0.3], wspace=0.06,
                            top=1 - GAIN_TOP / height, bottom=FIG_BOTTOM / height, left=0.12, right=0.97)
    n_single = sum(not str(c).startswith(MERGED_PREFIX) for c in mats[0][0].columns)
    size = _annot_size(n_cols)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    kw = dict(cmap="RdYlGn", norm=norm, annot=True, fmt="+.1f", cbar=False, linewidths=0.5, linecolor="white",
              annot_kws={"size": size})
    neutral = ListedColormap([NEUTRAL])
    mesh = None
    for k, ((col, label), (donors, controls)) in enumerate(zip(panels, mats)):
        ax = fig.add_subplot(grid[0, 3 * k])
        ax.set_facecolor(NEUTRAL)  # missing cells: a receiver is not its own donor
        sns.heatmap(donors, ax=ax, **kw)
        mesh = ax.collections[0]
        if n_single < n_cols:  # the merged donors apart from the single ones
            ax.axvline(n_single, color="white", linewidth=4)
        ax.set_title(f"gain at {label}", fontsize=10)
        _label_axes(ax, "donor", "receiver" if k == 0 else "", yticks=k == 0)
        cax = fig.add_subplot(grid[0, 3 * k + 1])
        cax.set_facecolor(NEUTRAL)
        # random directions on the donors' scale (clipped beyond it); the receiver's own vector apart, neutral
        rand = controls.copy()
        rand[str(Control.SELF)] = float("nan")
        sns.heatmap(rand, ax=cax, **kw)
        own = controls.copy()
        own[str(Control.RANDOM)] = float("nan")
        sns.heatmap(own, ax=cax, cmap=neutral, annot=True, fmt="+.1f", cbar=False, linewidths=0.5, linecolor="white",
                    annot_kws={"size": size, "color": "#333333"})
        cax.set_title("controls", fontsize=9)
        _label_axes(cax, yticks=False)
    cbar_ax = fig.add_subplot(grid[0, 5])
    cbar = fig.colorbar(mesh, cax=cbar_ax, extend="both")
    cbar.set_label(GAIN_UNITS)
    note = ("mean over seeds; 'random': norm-matched random directions (same scale); grey: a receiver is not its own\n"
            "donor, and 'self' (the receiver's own vector: QAT quantized) is off the scale, annotated only")
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9, y=1 - 0.08 / height, va="top")
    return fig


def heatmap_gain(pair_rows: pl.DataFrame, output: str | Path, title: str = "") -> Path:
    """Gain over PTQ at lambda = 1 and at the best lambda (test-set oracle), side by side, mean over
    seeds; rows are receivers, columns donors (single donors, then each leave-one-out merged donor).
    The colour scale is centred on 0 and spans the donor cells (:func:`gain_color_range`); beside each
    panel, the random-direction control (mean over donors) on the same scale and the receiver's own
    vector ('self', an upper bound of tens of points) annotated on a neutral grey."""
    return _save(gain_figure(pair_rows, title), output)


def cosine_matrices(cosine: pl.DataFrame):
    """(task x task matrix, task x merged-donor columns) of the cosine of quantization vectors, mean over seeds."""
    mean = cosine.group_by("task_a", "task_b", maintain_order=True).agg(pl.col("cosine").mean())
    mat = mean.pivot(on="task_b", index="task_a", values="cosine").to_pandas().set_index("task_a")
    mat.index.name = None
    order = sorted(mat.index)
    merged = sorted(c for c in mat.columns if str(c).startswith(MERGED_PREFIX))
    return mat.reindex(index=order, columns=order).astype(float), mat.reindex(index=order, columns=merged).astype(float)


def cosine_color_range(tasks, merged) -> float:
    """Half-width of the cosine colour scale (centred on 0): the largest |cosine| off the diagonal
    (every vector has cosine 1 with itself) and in the merged columns; at least 0.01."""
    import numpy as np

    off = tasks.to_numpy(copy=True)
    np.fill_diagonal(off, np.nan)
    values = np.concatenate([off.ravel(), merged.to_numpy().ravel()])
    values = values[np.isfinite(values)]
    return max(0.01, float(np.abs(values).max())) if values.size else 1.0


@_quiet
def cosine_figure(cosine: pl.DataFrame, title: str = ""):
    """The cosine heatmap as a matplotlib figure (see :func:`heatmap_cosine`)."""
    import numpy as np
    import seaborn as sns
    from matplotlib.colors import ListedColormap, TwoSlopeNorm

    plt = _matplotlib()
    tasks, merged = cosine_matrices(cosine)
    n, m = len(tasks), merged.shape[1]
    vmax = cosine_color_range(tasks, merged)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    size = _annot_size(n + m)
    kw = dict(cmap="vlag", norm=norm, annot=True, fmt=".2f", cbar=False, linewidths=0.5, linecolor="white",
              annot_kws={"size": size})
    height = COSINE_TOP + CELL_H * n + FIG_BOTTOM
    fig = plt.figure(figsize=(2.5 + CELL_W * (n + m + 1.2), height))
    ratios = [n, m, 0.3] if m else [n, 0.3]
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.08 if m else 0.05,
                            top=1 - COSINE_TOP / height, bottom=FIG_BOTTOM / height, left=0.2, right=0.95)
    ax = fig.add_subplot(grid[0, 0])
    diagonal = np.eye(n, dtype=bool)
    sns.heatmap(tasks, ax=ax, mask=diagonal, **kw)
    mesh = ax.collections[0]
    sns.heatmap(tasks.where(diagonal), ax=ax, mask=~diagonal, cmap=ListedColormap([NEUTRAL]), annot=True, fmt=".0f",
                cbar=False, linewidths=0.5, linecolor="white", annot_kws={"size": size, "color": "#666666"})
    ax.set_title("between tasks' vectors", fontsize=9)
    _label_axes(ax)
    if m:  # each receiver's leave-one-out merged donor against the receiver's own vector, apart
        side = fig.add_subplot(grid[0, 1])
        side.set_facecolor(NEUTRAL)
        sns.heatmap(merged, ax=side, **kw)
        side.set_title("vs own vector", fontsize=9)
        _label_axes(side, yticks=False)
    cbar = fig.colorbar(mesh, cax=fig.add_subplot(grid[0, len(ratios) - 1]), extend="both")
    cbar.set_label(COSINE_UNITS)
    note = "mean over seeds; the diagonal (1 by definition) grey, the colour scale spans the other cells"
    fig.suptitle(f"{title or 'cosine similarity of quantization vectors'}\n{note}", fontsize=9, y=1 - 0.08 / height, va="top")
    return fig


def heatmap_cosine(cosine: pl.DataFrame, output: str | Path, title: str = "") -> Path:
    """Cosine similarity of the tasks' quantization vectors, mean over seeds; the diagonal (1 by
    definition) in neutral grey and the colour scale spanning the off-diagonal cosines
    (:func:`cosine_color_range`); each leave-one-out merged donor against the receiver's own vector
    in its own columns, and the colour bar beside them."""
    return _save(cosine_figure(cosine, title), output)


def _save(fig, output: str | Path) -> Path:
    """Write ``fig`` as PNG at :data:`DPI`, cropped to its content (no blank margin), and close it."""
    plt = _matplotlib()
    path = atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.08))
    plt.close(fig)
    return path


def _markers(name: str) -> tuple[str, str]:
    """The HTML comments around a block that ``qv readme`` copies from a run's markdown into the README."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


README_START, README_END = _markers("readme")  # the summary's headline block: verdicts, per-seed table, machine
VERDICT_BLOCK = "verdict"  # the summary's short block for a front page: verdict lines, seeds and machine
SUMMARY_BLOCKS = ("readme", VERDICT_BLOCK)  # the blocks `qv readme --summary` copies where the target has them


def cell_text(v, digits: int = 1) -> str:
    """A table cell as the markdown tables print it: floats to ``digits`` decimals, missing as empty."""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "" if v is None else str(v)


def markdown_table(df: pl.DataFrame, digits: int = 1) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell_text(v, digits) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


# Per-seed table: the share of the PTQ loss (FT - PTQ) that the QAT model, quantized, wins back.
QAT_RECOVERS = "QAT quantized recovers %"

RULE_LABELS = {Rule.LAMBDA1: "lambda = 1", Rule.ORACLE: "best lambda (oracle on test)",
               Rule.CALIB: "lambda chosen on calib (deployable)"}


def _ci(row: dict) -> str:
    return f"{row['specific_gain']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]"


def verdict_lines(summary_specific: pl.DataFrame) -> list[str]:
    """One line per lambda rule, pooled over seeds: verdict, specific gain with its interval, share."""
    pooled = summary_specific.filter((pl.col("scope") == "overall") & pl.col("seed").is_null()
                                     & (pl.col("kind") == DonorKind.SINGLE))
    lines = []
    for rule in Rule:
        rows = pooled.filter(pl.col("rule") == rule).to_dicts()
        if rows:
            r = rows[0]
            lines.append(f"- {RULE_LABELS[rule]}: **{r['verdict']}**; specific gain {_ci(r)} points (95% bootstrap interval over "
                         f"{r['pairs']} pairs from {r['seeds']} seed(s)); the donor beats its random control in "
                         f"{100 * r['share_donor_beats_random']:.0f}% of pairs (donor {r['donor_gain']:+.1f}, random {r['random_gain']:+.1f}).")
    return lines


def per_seed_table(heads: pl.DataFrame, summary_specific: pl.DataFrame) -> pl.DataFrame:
    """One row per seed and a last row with the mean and the standard deviation over seeds."""
    overall = summary_specific.filter((pl.col("scope") == "overall") & (pl.col("kind") == DonorKind.SINGLE))
    cols = {"seed": [], "PTQ loss": [], QAT_RECOVERS: []}
    for rule in Rule:
        cols[f"donor {rule}"] = []
        cols[f"random {rule}"] = []
    for rule in (Rule.ORACLE, Rule.CALIB):
        cols[f"specific {rule} [95% CI]"] = []
        cols[f"donor > random {rule} %"] = []
    for h in heads.to_dicts():
        cols["seed"].append(str(h["seed"]))
        cols["PTQ loss"].append(f"{h['ptq_loss_mean']:.1f}")
        cols[QAT_RECOVERS].append("n/a" if h["qat_recovery"] is None else f"{100 * h['qat_recovery']:.0f}")
        for rule, col in RULE_COLUMNS.items():
            key = col.removeprefix("gain_")
            cols[f"donor {rule}"].append(f"{h[f'{key}_mean']:+.1f}")
            cols[f"random {rule}"].append(f"{h[f'{key}_random_mean']:+.1f}")
        for rule in (Rule.ORACLE, Rule.CALIB):
            r = overall.filter((pl.col("rule") == rule) & (pl.col("seed") == h["seed"])).to_dicts()[0]
            cols[f"specific {rule} [95% CI]"].append(_ci(r))
            cols[f"donor > random {rule} %"].append(f"{100 * r['share_donor_beats_random']:.0f}")
    if len(heads) > 1:
        def mean_sd(values, scale=1.0, sign=True):
            values = values.drop_nulls()
            if values.is_empty():
                return "n/a"
            m, sd = float(values.mean()) * scale, float(values.std()) * scale
            return f"{m:+.1f} ± {sd:.1f}" if sign else f"{m:.1f} ± {sd:.1f}"

        cols["seed"].append("mean ± sd")
        cols["PTQ loss"].append(mean_sd(heads["ptq_loss_mean"], sign=False))
        cols[QAT_RECOVERS].append(mean_sd(heads["qat_recovery"], 100, sign=False))
        for rule, col in RULE_COLUMNS.items():
            key = col.removeprefix("gain_")
            cols[f"donor {rule}"].append(mean_sd(heads[f"{key}_mean"]))
            cols[f"random {rule}"].append(mean_sd(heads[f"{key}_random_mean"]))
        for rule in (Rule.ORACLE, Rule.CALIB):
            r = overall.filter((pl.col("rule") == rule) & pl.col("seed").is_null()).to_dicts()[0]
            cols[f"specific {rule} [95% CI]"].append(_ci(r) + " pooled")
            per = overall.filter((pl.col("rule") == rule) & pl.col("seed").is_not_null())["share_donor_beats_random"]
            cols[f"donor > random {rule} %"].append(mean_sd(per, 100, sign=False))
    return pl.DataFrame(cols)


def _specific_by(summary_specific: pl.DataFrame, scope: str) -> pl.DataFrame:
    """Pooled specific gain of each task (as receiver or donor), one column per rule."""
    rows = summary_specific.filter((pl.col("scope") == scope) & pl.col("seed").is_null())
    if scope != "donor":  # a merged donor has its own rows as a donor; per receiver, single donors only
        rows = rows.filter(pl.col("kind") == DonorKind.SINGLE)
    out = None
    for rule in Rule:
        part = rows.filter(pl.col("rule") == rule).select(
            pl.col("task"),
            pl.struct("specific_gain", "ci_low", "ci_high").map_elements(_ci, return_dtype=pl.Utf8).alias(f"{rule} [95% CI]"),
            (100 * pl.col("share_donor_beats_random")).round(0).cast(pl.Int64).alias(f"{rule} wins %"))
        out = part if out is None else out.join(part, on="task", how="full", coalesce=True)
    return out.sort("task")


def rule_label(rule: str) -> str:
    if rule.startswith(DATAFREE_RULE_PREFIX):
        return f"lambda chosen data-free ({rule.removeprefix(DATAFREE_RULE_PREFIX)})"
    return RULE_LABELS[Rule(rule)]


def _pooled_by_rule(summary_specific: pl.DataFrame) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    """Pooled over seeds, rule -> row: of the single donors overall, and of each merged donor (by label)."""
    pooled = summary_specific.filter(pl.col("seed").is_null())
    single = {r["rule"]: r for r in pooled.filter((pl.col("scope") == "overall") & (pl.col("kind") == DonorKind.SINGLE)).to_dicts()}
    merged: dict[str, dict[str, dict]] = {}
    for r in pooled.filter((pl.col("scope") == "donor") & (pl.col("kind") == DonorKind.MERGED)).sort("task").to_dicts():
        merged.setdefault(r["task"], {})[r["rule"]] = r
    return single, merged


def _gaps(single: dict[str, dict], rule: str) -> tuple[float, float] | None:
    """The single donors' gain under ``rule`` minus their gain under oracle and under calib."""
    if str(Rule.ORACLE) not in single or str(Rule.CALIB) not in single:
        return None
    gain = single[rule]["donor_gain"]
    return gain - single[str(Rule.ORACLE)]["donor_gain"], gain - single[str(Rule.CALIB)]["donor_gain"]


def merged_and_datafree_table(summary_specific: pl.DataFrame) -> pl.DataFrame | None:
    """Per lambda rule, pooled over seeds: the mean single donor, each merged donor, and each one's
    random control, with the specific gain of each; data-free rules also show their gap to the oracle
    and to calib (gain under the rule minus gain under oracle / calib, single donors). None when the run
    has neither merged donors nor data-free rules."""
    single, merged = _pooled_by_rule(summary_specific)
    if not merged and not any(r.startswith(DATAFREE_RULE_PREFIX) for r in single):
        return None
    rows = []
    for rule, s in single.items():
        row = {"rule": rule_label(rule), "single donor": s["donor_gain"], "its random": s["random_gain"],
               "single specific [95% CI]": _ci(s)}
        for label, by_rule in merged.items():
            m = by_rule.get(rule)
            row[label] = m["donor_gain"] if m else None
            row[f"{label} random"] = m["random_gain"] if m else None
            row[f"{label} specific [95% CI]"] = _ci(m) if m else ""
        gaps = _gaps(single, rule) if rule.startswith(DATAFREE_RULE_PREFIX) else None
        if gaps:
            row["gap to oracle"], row["gap to calib"] = gaps
        rows.append(row)
    return pl.DataFrame(rows)


def merged_and_datafree_verdicts(summary_specific: pl.DataFrame) -> list[str]:
    """Sentences, pooled over seeds: does each merged donor beat the mean single donor and its own
    random control (best lambda and calib), and how far is each data-free rule from oracle and calib."""
    single, merged = _pooled_by_rule(summary_specific)
    lines = []
    for label, by_rule in merged.items():
        parts = []
        for rule in (Rule.ORACLE, Rule.CALIB):
            m, s = by_rule.get(str(rule)), single.get(str(rule))
            if m and s:
                parts.append(f"at the {rule} lambda it gains {m['donor_gain']:+.1f} against {s['donor_gain']:+.1f} for the mean single "
                             f"donor ({'better' if m['donor_gain'] > s['donor_gain'] else 'not better'}), and beyond its own random "
                             f"control {_ci(m)} (**{m['verdict']}**)")
        if parts:
            lines.append(f"- `{label}`: " + "; ".join(parts) + ".")
    for rule, s in single.items():
        gaps = _gaps(single, rule) if rule.startswith(DATAFREE_RULE_PREFIX) else None
        if gaps:
            lines.append(f"- {rule_label(rule)}: single donors gain {s['donor_gain']:+.1f}, {gaps[0]:+.1f} from the oracle and "
                         f"{gaps[1]:+.1f} from calib; beyond the same rule on random directions {_ci(s)} (**{s['verdict']}**).")
    return lines


def _merged_and_datafree_lines(summary_specific: pl.DataFrame) -> list[str]:
    table = merged_and_datafree_table(summary_specific)
    if table is None:
        return []
    return ["**Beyond one donor, and lambda without receiver data** (pooled over seeds):", "",
            *merged_and_datafree_verdicts(summary_specific), "", "**Single donor, leave-one-out merged donor and random directions under each lambda rule** (pooled over "
            "seeds; gains in points over PTQ; `merged:<method>` merges every task's vector except the receiver's own; "
            "data-free rules pick lambda from the receiver's weights or noise images, no receiver data; `gap to oracle` / "
            "`gap to calib` = the single donors' gain under the rule minus their gain under oracle / calib):",
            "", markdown_table(table), ""]


def best_donors(real: pl.DataFrame) -> pl.DataFrame:
    """Per receiver, the donor of highest oracle gain (ties to the alphabetically first donor) with that
    donor's own oracle gain and its gain at lambda = 1 (``best_donor_lambda1``)."""
    return (real.sort(["receiver", "gain_oracle", "donor"], descending=[False, True, False], nulls_last=True)
            .group_by("receiver", maintain_order=True)
            .agg(pl.col("donor").first().alias("best_donor"), pl.col("gain_oracle").first().alias("best_oracle"),
                 pl.col("gain_lambda1").first().alias("best_donor_lambda1")))


def summary_markdown(arch: str, baselines: pl.DataFrame, pair_rows: pl.DataFrame, summary_specific: pl.DataFrame,
                     norms: pl.DataFrame) -> str:
    heads = headline(baselines, pair_rows)
    seeds = heads["seed"].to_list()
    directions = pair_rows.filter(pl.col("control") == Control.RANDOM)["directions"]
    test = (baselines.filter(pl.col("split") == Split.TEST)
            .group_by("task", "model", maintain_order=True).agg(pl.col("accuracy").mean())
            .pivot(on="model", index="task", values="accuracy")
            .select("task", *(pl.col(str(v)).alias(VARIANT_LABELS[v]) for v in Variant)).sort("task"))
    mean = (single_donors(pair_rows).group_by("receiver", "donor", "control", maintain_order=True)
            .agg(pl.col("gain_lambda1", "gain_oracle", "gain_calib").mean()))
    real = mean.filter(pl.col("control") == Control.DONOR)
    rand = mean.filter(pl.col("control") == Control.RANDOM).group_by("receiver", maintain_order=True).agg(
        pl.col("gain_lambda1").mean().alias("random_lambda1"), pl.col("gain_oracle").mean().alias("random_oracle"))
    own = mean.filter(pl.col("control") == Control.SELF).select("receiver", pl.col("gain_lambda1").alias("self_lambda1"))
    per_receiver = (best_donors(real)
                    .join(real.group_by("receiver", maintain_order=True).agg(pl.col("gain_calib").mean().alias("mean_calib")),
                          on="receiver", how="left", maintain_order="left")
                    .join(rand, on="receiver", how="left").join(own, on="receiver", how="left")
                    .with_columns((pl.col("best_oracle") - pl.col("random_oracle")).alias("best_minus_random"))
                    .sort("receiver"))
    qv = (norms.filter(pl.col("layer_type") == "all").group_by("task", maintain_order=True)
          .agg(pl.col("ft_update_rel").mean(), pl.col("qv_rel").mean()).sort("task"))
    n_pairs = int(heads["pairs"][0]) if len(heads) else 0
    return "\n".join([
        f"# {arch}: quantization-vector transfer",
        "",
        f"{int(heads['tasks'][0])} tasks, {n_pairs} donor-receiver pairs per seed; seeds: {', '.join(map(str, seeds))}; "
        f"norm-matched random directions per donor: {int(directions.max()) if len(directions) else 0}. Accuracies are Top-1 (%) "
        "on each task's test split; gains are points over the receiver's PTQ accuracy; the *specific gain* of a pair is the "
        "donor's gain minus the mean gain of its own random directions under the same lambda rule.",
        "",
        _markers(VERDICT_BLOCK)[0],
        f"**Does a donor's direction beat random directions of its size?** {int(heads['tasks'][0])} tasks, {n_pairs} "
        f"pairs per seed, seeds {', '.join(map(str, seeds))}, pooled; specific gain in points with its 95% bootstrap interval:",
        "",
        *verdict_lines(summary_specific),
        *merged_and_datafree_verdicts(summary_specific),
        "",
        f"Measured on: {machine_line()}.",
        _markers(VERDICT_BLOCK)[1],
        "",
        README_START,
        "**Transfer beyond a random direction** (pooled over seeds):",
        "",
        *verdict_lines(summary_specific),
        "",
        "Per seed (gains are means over pairs; the last row is the mean and standard deviation over seeds; `PTQ loss` = FT (full "
        "precision) minus PTQ (FT quantized), points; `QAT quantized recovers %` = the share of that loss the QAT model, quantized, wins back):",
        "",
        markdown_table(per_seed_table(heads, summary_specific)),
        "",
        *_merged_and_datafree_lines(summary_specific),
        f"Summary written on: {machine_line()}.",
        README_END,
        "",
        "## Specific gain per receiver (pooled over seeds)",
        "",
        markdown_table(_specific_by(summary_specific, "receiver")),
        "",
        "## Specific gain per donor (pooled over seeds)",
        "",
        markdown_table(_specific_by(summary_specific, "donor")),
        "",
        "## Baselines (test Top-1, mean over seeds)",
        "",
        markdown_table(test),
        "",
        "## Per receiver: best donor against the controls (mean over seeds)",
        "",
        "`best_minus_random` is the best donor's oracle gain minus the mean gain of norm-matched random directions;",
        "`best_donor_lambda1` is that donor's gain at lambda = 1; `mean_calib` the mean over donors of the gain at the lambda",
        "chosen on calib; `self_lambda1` is the receiver's own vector at lambda = 1 (its QAT model quantized: QAT quantized), the upper bound.",
        "",
        markdown_table(per_receiver),
        "",
        "## Size of the moves (quantized weights, mean over seeds)",
        "",
        "`ft_update_rel` = ||theta_FT - theta_0|| / ||theta_0||, `qv_rel` = ||rho|| / ||theta_FT||.",
        "",
        markdown_table(qv, digits=3),
        "",
    ])


def readme_block(summary: str, name: str = "readme") -> str:
    """The part of a summary between the ``name`` markers (``<!-- name:start -->``), markers included."""
    start_mark, end_mark = _markers(name)
    if start_mark not in summary or end_mark not in summary:
        raise ValueError(f"the summary has no {start_mark} ... {end_mark} block")
    start = summary.index(start_mark)
    return summary[start:summary.index(end_mark) + len(end_mark)]


def has_block(text: str, name: str) -> bool:
    """Does ``text`` hold both markers of block ``name``?"""
    start_mark, end_mark = _markers(name)
    return start_mark in text and end_mark in text


def replace_readme_block(readme: str, block: str, name: str = "readme") -> str:
    """``readme`` with its ``name``-marker block replaced by ``block``."""
    start_mark, end_mark = _markers(name)
    if start_mark not in readme or end_mark not in readme:
        raise ValueError(f"the README has no {start_mark} ... {end_mark} block to replace")
    start, end = readme.index(start_mark), readme.index(end_mark) + len(end_mark)
    return readme[:start] + block + readme[end:]


QUANTIZERS_BLOCK = "readme-quantizers"


def quantizers_markdown(arch: str, table: pl.DataFrame) -> str:
    """The quantizer comparison (``tables.quantizers``) as markdown: per bit-width, FT, PTQ, QV-patched
    and QAT quantized accuracy under each quantizer, and the patched models' gain over the best data-free PTQ."""
    lines = [f"# {arch}: quantization vectors against better quantizers", "",
             "Top-1 (%) on the test splits, means over tasks (FT, PTQ and QAT quantized) or single-donor pairs (patched), "
             "seeds pooled. `best PTQ` is, per receiver, the best PTQ accuracy among this run's quantizers of the "
             "same bit-width; `over best PTQ` is the patched model's accuracy minus it: positive means the vector "
             "adds something a better data-free quantizer alone does not. `random` is the same with the pairs' "
             "norm-matched random directions.", "", _markers(QUANTIZERS_BLOCK)[0]]
    for (bits,), rows in table.group_by("bits", maintain_order=True):
        lines += [f"**{bits} bits**", ""]  # bold, not a heading: the block also sits inside the README's sections
        view = rows.select(
            "quant", pl.col("rule").map_elements(rule_label, return_dtype=pl.Utf8).alias("lambda rule"),
            pl.col("ft").alias(VARIANT_LABELS[Variant.FT]), pl.col("ptq").alias(VARIANT_LABELS[Variant.PTQ]),
            pl.col("best_ptq_same_bits").alias("best PTQ"), pl.col("patched").alias("QV-patched"),
            pl.col("random").alias("random-patched"), pl.col(Variant.QAT_PTQ).alias(VARIANT_LABELS[Variant.QAT_PTQ]),
            pl.col("patched_over_best_ptq").alias("patched over best PTQ"),
            pl.col("random_over_best_ptq").alias("random over best PTQ"), "pairs", "seeds")
        lines += [markdown_table(view), ""]
    lines += [machine_line(), _markers(QUANTIZERS_BLOCK)[1]]
    return "\n".join(lines) + "\n"
