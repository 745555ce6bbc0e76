"""The paper's Tables 1-3 in the paper's layout, for any run: what a reader compares with the published ones.

- Table 1 (Appendix B, Table 4 for the other archs): per task, Top-1 on test of the FT model, the FT
  model quantized (PTQ), the QAT model *unquantized* (the paper's "QAT" column: the authors' figure
  script scores the QAT checkpoint in full precision) and the QAT model quantized.
- Table 2 (Appendix C): per task, as a donor over its receivers and as a receiver over its donors,
  the best, worst and mean gain over PTQ and the share of positive gains, at lambda = 1.
- Table 3 (Appendix D): the same at the tuned lambda, once per tuning rule the run has (calib: the
  authors' choice on their validation split; oracle: the best lambda on test; data-free rules).

Only single donors' own vectors count (no merged donors, random controls or the receiver's own
vector), as in the paper. With several seeds each figure is the mean of its per-seed values.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .tables import RUN_KEYS, summary_donor, summary_receiver
from .vocab import VARIANT_LABELS, Control, DonorKind, Rule, Split, Variant, rule_columns

# Table 1's columns: the baselines' model names and what each one is, in words.
TABLE1_LABELS: dict[str, str] = {**VARIANT_LABELS, Variant.QAT: "QAT (full precision: the paper's QAT column)"}
STAT_LABELS = {"best": "Best", "worst": "Worst", "mean": "Mean", "positive": "Pos.%"}
ROLES = ("donor", "receiver")


def table1(baselines: pl.DataFrame) -> pl.DataFrame:
    """Per arch, quantizer and task (in the order the run lists them): test Top-1 of each model of
    :data:`TABLE1_LABELS`, the mean over seeds (``seeds`` counts them)."""
    test = baselines.filter(pl.col("split") == Split.TEST)
    missing = sorted(set(map(str, TABLE1_LABELS)) - set(test["model"].unique().to_list()))
    if missing:
        raise ValueError(f"baselines lack model(s) {missing}: Table 1 needs {sorted(map(str, TABLE1_LABELS))}")
    wide = test.pivot(on="model", index=[*RUN_KEYS, "task"], values="accuracy")
    return (wide.group_by("arch", "quant", "task", maintain_order=True)
            .agg(*(pl.col(str(m)).mean() for m in TABLE1_LABELS), pl.col("seed").n_unique().alias("seeds")))


def transfer_table(pair_rows: pl.DataFrame, rule: str) -> pl.DataFrame:
    """Tables 2 and 3: per arch, quantizer and task, ``donor_*`` over the receivers it is given to and
    ``receiver_*`` over the donors it gets (best, worst, mean gain; ``*_positive``: % of gains > 0)
    under lambda ``rule`` (a rule of :func:`qvlib.vocab.rule_columns`)."""
    return _transfer_table(_role_summaries(pair_rows), rule)


def _role_summaries(pair_rows: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """qvlib.tables' donor and receiver summaries (per seed, and pooled as the mean of the per-seed
    figures) of single donors' own vectors: the statistics Tables 2 and 3 lay out."""
    rows = {"donor": summary_donor(pair_rows), "receiver": summary_receiver(pair_rows)}
    return {role: frame.filter((pl.col("control") == Control.DONOR) & (pl.col("kind") == DonorKind.SINGLE))
            for role, frame in rows.items()}


def _transfer_table(summaries: dict[str, pl.DataFrame], rule: str) -> pl.DataFrame:
    rules = summaries["donor"]["rule"].unique(maintain_order=True).to_list()
    if rule not in rules:
        raise ValueError(f"no gains under rule {rule!r}; this run has {', '.join(rules)}")
    frames = []
    for role in ROLES:
        rows = summaries[role].filter(pl.col("rule") == rule)
        seeds = (rows.filter(pl.col("seed").is_not_null()).group_by("arch", "quant", role)
                 .agg(pl.len().alias(f"{role}_seeds")))
        pooled = rows.filter(pl.col("seed").is_null()).join(seeds, on=["arch", "quant", role], how="left")
        frames.append(pooled.select(
            "arch", "quant", pl.col(role).alias("task"), pl.col("best_gain").alias(f"{role}_best"),
            pl.col("worst_gain").alias(f"{role}_worst"), pl.col("mean_gain").alias(f"{role}_mean"),
            (pl.col("share_positive") * 100).alias(f"{role}_positive"), pl.col("pairs").alias(f"{role}_pairs"),
            f"{role}_seeds"))
    out = frames[0].join(frames[1], on=["arch", "quant", "task"], how="full", coalesce=True, maintain_order="left")
    return out.with_columns(pl.lit(str(rule)).alias("rule"))


def tuned_rules(pair_rows: pl.DataFrame) -> list[str]:
    """The rules of Table 3: every rule of the run that tunes lambda (all but lambda = 1), calib first."""
    rules = [r for r in rule_columns(pair_rows.columns) if r != Rule.LAMBDA1]
    return sorted(rules, key=lambda r: (r != Rule.CALIB, r != Rule.ORACLE, r))


def transfer_tables(pair_rows: pl.DataFrame) -> pl.DataFrame:
    """Table 2 (rule lambda=1) and Table 3 (one block per tuned rule) in one frame, column ``rule``."""
    summaries = _role_summaries(pair_rows)
    return pl.concat([_transfer_table(summaries, r) for r in [str(Rule.LAMBDA1), *tuned_rules(pair_rows)]])


RULE_TEXT = {
    str(Rule.LAMBDA1): "the vector at unit scale (lambda = 1)",
    str(Rule.CALIB): "lambda picked per pair on the calib split (the authors' validation split), scored on test",
    str(Rule.ORACLE): "lambda picked per pair on the test split itself (oracle)",
}


def _text(rule: str) -> str:
    return RULE_TEXT.get(rule, f"lambda picked per pair by the data-free rule {rule}, scored on test")


def _cell(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _table1_markdown(t1: pl.DataFrame) -> list[str]:
    head = ["Dataset", *TABLE1_LABELS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([row["task"], *(_cell(row[str(m)]) for m in TABLE1_LABELS)]) + " |"
              for row in t1.iter_rows(named=True)]
    return lines


def _transfer_markdown(rows: pl.DataFrame) -> list[str]:
    stats = list(STAT_LABELS)
    head = ["Dataset", *(f"{role.capitalize()} {STAT_LABELS[s]}" for role in ROLES for s in stats)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.iter_rows(named=True):
        cells = [_cell(row[f"{role}_{s}"], 1 if s == "positive" else 2) + ("%" if s == "positive" and row[f"{role}_{s}"] is not None else "")
                 for role in ROLES for s in stats]
        lines.append("| " + " | ".join([row["task"], *cells]) + " |")
    return lines


def paper_markdown(name: str, t1: pl.DataFrame, t23: pl.DataFrame) -> str:
    """Tables 1-3 of one arch and quantizer as markdown, each table saying what its columns are."""
    seeds = int(t1["seeds"].max()) if len(t1) else 0
    out = [f"# {name}: the paper's Tables 1-3",
           "",
           f"Test Top-1 (%) and gains (points over the receiver's PTQ accuracy); {seeds} seed(s), each figure the mean "
           "of its per-seed values. Only single donors' own vectors count (no merged donors, random controls or the "
           "receiver's own vector).",
           "",
           "## Table 1: baselines",
           "",
           "PTQ is the FT model quantized; the paper's QAT column is the QAT model in full precision; "
           "QAT quantized is what the receiver's own QAT achieves once deployed.",
           "",
           *_table1_markdown(t1),
           ""]
    for number, rules in ((2, [str(Rule.LAMBDA1)]), (3, [r for r in t23["rule"].unique(maintain_order=True) if r != Rule.LAMBDA1])):
        for rule in rules:
            out += [f"## Table {number}: transfer, {_text(rule)}", "",
                    "Donor columns: over the receivers a task's vector is given to; receiver columns: over the donors "
                    "a task gets. Pos.% = share of gains above 0.", "",
                    *_transfer_markdown(t23.filter(pl.col("rule") == rule)), ""]
    return "\n".join(out)


def write_paper_tables(name: str, baselines: pl.DataFrame, pair_rows: pl.DataFrame, out_md: Path, out_table1: Path,
                       out_transfer: Path) -> str:
    """Tables 1-3 of one arch and quantizer: ``out_table1`` and ``out_transfer`` (Parquet) and ``out_md``."""
    from .report import write_parquet
    from .fileio import atomic_write

    t1, t23 = table1(baselines), transfer_tables(pair_rows)
    # within each rule's block (blocks stay in their order), the tasks in Table 1's order, others after
    order = {task: i for i, task in enumerate(t1["task"].unique(maintain_order=True))}
    row = pl.col("task").replace_strict(order, default=len(order), return_dtype=pl.Int64)
    t23 = t23.sort(pl.col("rule").rle_id(), row, "task", maintain_order=True)
    text = paper_markdown(name, t1, t23)
    write_parquet(t1, Path(out_table1))
    write_parquet(t23, Path(out_transfer))
    atomic_write(out_md, lambda tmp: Path(tmp).write_text(text))
    return text
