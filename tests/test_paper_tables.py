"""The paper's Tables 1-3 from hand-made baselines and pair rows: exact values, what is left out, layout."""

import polars as pl
import pytest

from qvlib import paper_tables

RUN = {"arch": "a", "quant": "w3-channel"}
# donor -> receiver: gain at lambda = 1 and under the calib rule, seed 0
GAINS = {("A", "B"): (10.0, 12.0), ("A", "C"): (-5.0, 1.0), ("B", "A"): (3.0, 4.0),
         ("B", "C"): (0.0, 2.0), ("C", "A"): (-2.0, 0.5), ("C", "B"): (7.0, 7.0)}


def pair_rows(seeds=(0,)):
    rows = []
    for seed in seeds:
        for (donor, receiver), (g1, gc) in GAINS.items():
            shift = 2.0 * seed  # seed 1's gains are 2 points higher
            base = {**RUN, "seed": seed, "receiver": receiver, "donor": donor, "kind": "single", "directions": 1}
            rows.append({**base, "control": "none", "gain_lambda1": g1 + shift, "gain_oracle": gc + 1 + shift,
                         "gain_calib": gc + shift})
            rows.append({**base, "control": "random", "gain_lambda1": 99.0, "gain_oracle": 99.0, "gain_calib": 99.0})
        for task in "ABC":  # the receiver's own vector and a merged donor: never counted
            rows.append({**RUN, "seed": seed, "receiver": task, "donor": task, "kind": "single", "directions": 1,
                         "control": "self", "gain_lambda1": 50.0, "gain_oracle": 50.0, "gain_calib": 50.0})
            rows.append({**RUN, "seed": seed, "receiver": task, "donor": "merged:mean", "kind": "merged", "directions": 1,
                         "control": "none", "gain_lambda1": -80.0, "gain_oracle": -80.0, "gain_calib": -80.0})
    return pl.DataFrame(rows)


def baselines(seeds=(0, 1)):
    acc = {"ft": 90.0, "ptq": 20.0, "qat": 85.0, "qat_ptq": 80.0}
    return pl.DataFrame([{**RUN, "seed": s, "task": t, "model": m, "split": split, "accuracy": a + s + (split == "calib")}
                         for s in seeds for t in ("B", "A") for m, a in acc.items() for split in ("test", "calib")])


def test_table1_holds_the_four_models_on_test_averaged_over_seeds_in_run_order():
    t1 = paper_tables.table1(baselines())
    assert t1["task"].to_list() == ["B", "A"]
    row = t1.row(0, named=True)
    # seeds 0 and 1 add 0 and 1 point: the mean adds 0.5; calib rows (one point more) are left out
    assert (row["ft"], row["ptq"], row["qat"], row["qat_ptq"], row["seeds"]) == (90.5, 20.5, 85.5, 80.5, 2)
    with pytest.raises(ValueError, match=r"lack model\(s\) \['qat'\]"):
        paper_tables.table1(baselines().filter(pl.col("model") != "qat"))


def test_table2_donor_and_receiver_statistics_at_lambda_one():
    t2 = paper_tables.transfer_table(pair_rows(), "lambda=1")
    got = {r["task"]: r for r in t2.to_dicts()}
    # donor A gives +10 to B and -5 to C; receiver A gets +3 from B and -2 from C
    assert [got["A"][f"donor_{s}"] for s in ("best", "worst", "mean", "positive")] == [10.0, -5.0, 2.5, 50.0]
    assert [got["A"][f"receiver_{s}"] for s in ("best", "worst", "mean", "positive")] == [3.0, -2.0, 0.5, 50.0]
    # receiver C gets -5 and 0: 0 is not a positive gain
    assert [got["C"][f"receiver_{s}"] for s in ("best", "worst", "mean", "positive")] == [0.0, -5.0, -2.5, 0.0]
    assert got["A"]["donor_pairs"] == 2 and set(t2["rule"]) == {"lambda=1"}


def test_table3_has_one_block_per_tuned_rule_calib_first_and_several_seeds_average():
    t23 = paper_tables.transfer_tables(pair_rows(seeds=(0, 1)))
    assert t23["rule"].unique(maintain_order=True).to_list() == ["lambda=1", "calib", "oracle"]
    calib_a = t23.filter((pl.col("rule") == "calib") & (pl.col("task") == "A")).row(0, named=True)
    # donor A under calib: seed 0 (12, 1), seed 1 (14, 3): best (12 + 14) / 2, worst (1 + 3) / 2
    assert (calib_a["donor_best"], calib_a["donor_worst"], calib_a["donor_mean"]) == (13.0, 2.0, 7.5)
    assert calib_a["donor_seeds"] == 2 and calib_a["donor_pairs"] == 4
    with pytest.raises(ValueError, match="no gains under rule 'datafree:outputs'"):
        paper_tables.transfer_table(pair_rows(), "datafree:outputs")


def test_markdown_labels_each_table_and_model_in_words(tmp_path):
    text = paper_tables.write_paper_tables("vit_b w3-channel", baselines(), pair_rows(), tmp_path / "paper_tables.md",
                                           tmp_path / "t1.parquet", tmp_path / "t23.parquet")
    assert (tmp_path / "paper_tables.md").read_text() == text
    assert "| Dataset | FT (full precision) | PTQ (FT quantized) | QAT (full precision: the paper's QAT column) | QAT quantized |" in text
    assert "## Table 2: transfer, the vector at unit scale (lambda = 1)" in text
    assert "## Table 3: transfer, lambda picked per pair on the calib split" in text
    assert "| A | 10.00 | -5.00 | 2.50 | 50.0% | 3.00 | -2.00 | 0.50 | 50.0% |" in text
    written = pl.read_parquet(tmp_path / "t23.parquet")
    # rows in Table 1's order (B, A), a task Table 1 lacks (C) after them; the same rows as transfer_tables
    assert written.filter(pl.col("rule") == "calib")["task"].to_list() == ["B", "A", "C"]
    assert written.sort("rule", "task").equals(paper_tables.transfer_tables(pair_rows()).sort("rule", "task"))


def test_qv_paper_tables_writes_the_three_files_from_a_runs_tables(tmp_path):
    from qvlib import cli, tables

    cells = pl.DataFrame([{**RUN, "seed": 0, "receiver": r, "donor": d, "bits": 3, "search": "sweep", "n": 100,
                           "control": "none", "control_seed": None, "split": split, "lambda": lam,
                           "accuracy": acc + (lam == 0.5) * (split == "calib"), "correct": int(acc)}
                          for r, d, acc in (("A", "B", 30.0), ("B", "A", 10.0))
                          for split in ("test", "calib") for lam in (0.5, 1.0)],
                         schema_overrides={"control_seed": pl.Int64})
    base = baselines(seeds=(0,)).with_columns(pl.when(pl.col("model") == "ptq").then(20.0).otherwise(pl.col("accuracy"))
                                              .alias("accuracy"))
    base.write_parquet(tmp_path / "baselines.parquet")
    tables.with_gain(cells, base).write_parquet(tmp_path / "transfer.parquet")
    out = {k: tmp_path / f"paper_{k}" for k in ("tables.md", "table1.parquet", "transfer.parquet")}
    code = cli.main(["paper-tables", "--name", "a w3-channel", "--quant", "w3-channel",
                     "--baselines", str(tmp_path / "baselines.parquet"), "--transfer", str(tmp_path / "transfer.parquet"),
                     "--out-md", str(out["tables.md"]), "--out-table1", str(out["table1.parquet"]),
                     "--out-transfer", str(out["transfer.parquet"])])
    assert code == 0 and all(p.exists() for p in out.values())
    t23 = pl.read_parquet(out["transfer.parquet"])
    # donor B gives receiver A 30 - 20 = +10 at lambda = 1; calib picks 0.5 (one point more on calib)
    row = t23.filter((pl.col("rule") == "lambda=1") & (pl.col("task") == "B")).row(0, named=True)
    assert (row["donor_best"], row["receiver_best"]) == (10.0, -10.0)
    assert set(t23["rule"]) == {"lambda=1", "oracle", "calib"}
    assert "# a w3-channel: the paper's Tables 1-3" in out["tables.md"].read_text()
