"""Pair gains under each lambda rule, specific gains over random controls, and their summaries,
on small tables computed by hand."""

import polars as pl
import pytest

from qvlib import tables

BASE = {"arch": "a", "quant": "w2-channel", "seed": 0, "receiver": "R", "donor": "D", "bits": 2, "search": "sweep", "n": 100}


def cell(control, control_seed, accuracies):
    """Rows of one variant: accuracies = {(split, lambda): accuracy}."""
    return [{**BASE, "control": control, "control_seed": control_seed, "split": split, "lambda": lam,
             "accuracy": acc, "correct": int(acc)} for (split, lam), acc in accuracies.items()]


def transfer_table():
    rows = (cell("none", None, {("test", 0.5): 60.0, ("test", 1.0): 70.0, ("calib", 0.5): 65.0, ("calib", 1.0): 55.0})
            + cell("random", 11, {("test", 0.5): 52.0, ("test", 1.0): 48.0, ("calib", 0.5): 51.0, ("calib", 1.0): 53.0})
            + cell("random", 12, {("test", 0.5): 54.0, ("test", 1.0): 44.0, ("calib", 0.5): 40.0, ("calib", 1.0): 45.0}))
    cells = pl.DataFrame(rows, schema_overrides={"control_seed": pl.Int64})
    baselines = pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 0, "task": "R", "model": "ptq", "split": s,
                               "accuracy": 50.0} for s in ("test", "calib")])
    return tables.with_gain(cells, baselines)


def test_pairs_average_random_directions_after_each_picks_its_lambda():
    p = tables.pairs(transfer_table())
    donor = p.filter(pl.col("control") == "none").row(0, named=True)
    # lambda = 1: 70 - 50; oracle: best test lambda (1.0); calib picks 0.5 (65 > 55), scored on test: 60 - 50
    assert (donor["gain_lambda1"], donor["gain_oracle"], donor["gain_calib"]) == (20.0, 20.0, 10.0)
    assert (donor["lambda_oracle"], donor["lambda_calib"], donor["directions"]) == (1.0, 0.5, 1)
    rand = p.filter(pl.col("control") == "random").row(0, named=True)
    # seed 11: -2, +2 (0.5), calib 1.0 -> -2; seed 12: -6, +4 (0.5), calib 1.0 -> -6; averaged
    assert (rand["gain_lambda1"], rand["gain_oracle"], rand["gain_calib"]) == (-4.0, 3.0, -4.0)
    assert rand["directions"] == 2


def test_specific_gain_is_donor_minus_its_random_control():
    spec = tables.specific(tables.pairs(transfer_table()))
    got = {r["rule"]: (r["donor_gain"], r["random_gain"], r["specific_gain"]) for r in spec.to_dicts()}
    assert got == {"lambda=1": (20.0, -4.0, 24.0), "oracle": (20.0, 3.0, 17.0), "calib": (10.0, -4.0, 14.0)}


def test_a_donor_tied_with_its_random_mean_is_exactly_zero_and_no_win():
    # PTQ 23.1; donor 25.4 (+2.3); random directions 25.3, 25.4, 25.5 (mean +2.3, 1e-15 off in floats)
    rows = cell("none", None, {("test", 1.0): 25.4})
    for k, acc in enumerate((25.3, 25.4, 25.5)):
        rows += cell("random", k, {("test", 1.0): acc})
    baselines = pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 0, "task": "R", "model": "ptq", "split": "test", "accuracy": 23.1}])
    spec = tables.specific(tables.pairs(tables.with_gain(pl.DataFrame(rows, schema_overrides={"control_seed": pl.Int64}), baselines)))
    assert spec.filter(pl.col("rule") == "lambda=1")["specific_gain"].to_list() == [0.0]
    summary = tables.summary_specific(spec).filter((pl.col("scope") == "overall") & (pl.col("rule") == "lambda=1"))
    assert summary["share_donor_beats_random"].to_list() == [0.0, 0.0]


def test_oracle_ties_go_to_the_lambda_nearest_one():
    rows = cell("none", None, {("test", 0.5): 60.0, ("test", 1.25): 60.0, ("test", 2.0): 60.0})
    baselines = pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 0, "task": "R", "model": "ptq", "split": "test", "accuracy": 50.0}])
    p = tables.pairs(tables.with_gain(pl.DataFrame(rows, schema_overrides={"control_seed": pl.Int64}), baselines))
    assert p["lambda_oracle"].to_list() == [1.25]


def test_ties_smallest_keeps_the_smallest_best_lambda_for_oracle_and_calib():
    # the authors' rule: 0.5 and 1.25 tie on test, 0.5 and 1.0 tie on calib
    rows = cell("none", None, {("test", 0.5): 60.0, ("test", 1.0): 55.0, ("test", 1.25): 60.0, ("test", 2.0): 52.0,
                               ("calib", 0.5): 70.0, ("calib", 1.0): 70.0, ("calib", 1.25): 65.0, ("calib", 2.0): 40.0})
    baselines = pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 0, "task": "R", "model": "ptq", "split": s,
                               "accuracy": 50.0} for s in ("test", "calib")])
    transfer = tables.with_gain(pl.DataFrame(rows, schema_overrides={"control_seed": pl.Int64}), baselines)
    near, small = tables.pairs(transfer).row(0, named=True), tables.pairs(transfer, "smallest").row(0, named=True)
    assert (near["lambda_oracle"], near["lambda_calib"], near["gain_calib"]) == (1.25, 1.0, 5.0)
    assert (small["lambda_oracle"], small["lambda_calib"], small["gain_calib"]) == (0.5, 0.5, 10.0)
    with pytest.raises(ValueError, match="'largest' is not a valid LambdaTies"):
        tables.pairs(transfer, "largest")


def test_missing_baseline_and_missing_controls_are_named():
    cells = pl.DataFrame(cell("none", None, {("test", 1.0): 60.0}), schema_overrides={"control_seed": pl.Int64})
    other = pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 1, "task": "R", "model": "ptq", "split": "test", "accuracy": 50.0}])
    with pytest.raises(ValueError, match="no PTQ baseline for receiver 'R'.*seed 0"):
        tables.with_gain(cells, other)
    with pytest.raises(ValueError, match="random_controls"):
        tables.specific(tables.pairs(tables.with_gain(cells, other.with_columns(pl.lit(0).alias("seed")))))


def specific_rows(values_by_seed):
    rows = []
    for seed, values in values_by_seed.items():
        for i, v in enumerate(values):
            rows.append({"arch": "a", "quant": "w2-channel", "seed": seed, "receiver": f"r{i % 2}", "donor": f"d{i}",
                         "kind": "single", "rule": "oracle", "donor_gain": v + 1.0, "random_gain": 1.0, "specific_gain": v, "directions": 3})
    return pl.DataFrame(rows)


def test_summary_specific_scopes_shares_and_verdicts():
    summary = tables.summary_specific(specific_rows({0: [2.0, 4.0, 6.0, -1.0], 1: [3.0, 5.0, 1.0, 2.0]}))
    overall = summary.filter(pl.col("scope") == "overall")
    assert overall["seed"].to_list() == [0, 1, None]
    pooled = overall.filter(pl.col("seed").is_null()).row(0, named=True)
    assert pooled["specific_gain"] == pytest.approx(22.0 / 8) and pooled["share_donor_beats_random"] == 7 / 8
    assert (pooled["pairs"], pooled["seeds"], pooled["donor_gain"], pooled["random_gain"]) == (8, 2, pytest.approx(22.0 / 8 + 1), 1.0)
    assert pooled["ci_low"] > 0 and pooled["verdict"] == "yes"
    seed0 = overall.filter(pl.col("seed") == 0).row(0, named=True)
    assert seed0["share_donor_beats_random"] == 0.75 and seed0["pairs"] == 4
    per_receiver = summary.filter((pl.col("scope") == "receiver") & pl.col("seed").is_null())
    assert per_receiver["task"].to_list() == ["r0", "r1"]
    assert per_receiver["specific_gain"].to_list() == pytest.approx([(2 + 6 + 3 + 1) / 4, (4 - 1 + 5 + 2) / 4])
    assert set(summary.filter(pl.col("scope") == "donor")["task"]) == {"d0", "d1", "d2", "d3"}


def test_summary_specific_verdict_no_when_random_wins_everywhere():
    summary = tables.summary_specific(specific_rows({0: [-2.0, -3.0, -1.5, -2.5]}))
    assert set(summary.filter(pl.col("scope") == "overall")["verdict"]) == {"no"}


def with_datafree(transfer: pl.DataFrame, picks: dict) -> pl.DataFrame:
    """``transfer`` plus the datafree rows that copy the test row of the lambda each criterion picks:
    picks = {(control_seed, criterion): lambda}."""
    test = transfer.filter((pl.col("split") == "test") & (pl.col("search") == "sweep"))
    extra = []
    for (seed, criterion), lam in picks.items():
        match = pl.col("control_seed").is_null() if seed is None else pl.col("control_seed") == seed
        extra.append(test.filter(match & (pl.col("lambda") == lam))
                     .with_columns(pl.lit("datafree").alias("search"), pl.lit(criterion).alias("criterion")))
    return pl.concat([transfer.with_columns(pl.lit(None, dtype=pl.Utf8).alias("criterion")), *extra], how="diagonal_relaxed")


def test_datafree_rules_read_the_picked_lambda_and_have_their_own_specific_gain():
    transfer = with_datafree(transfer_table(), {(None, "weights"): 0.5, (11, "weights"): 1.0, (12, "weights"): 0.5})
    p = tables.pairs(transfer)
    donor = p.filter(pl.col("control") == "none").row(0, named=True)
    assert (donor["gain_datafree_weights"], donor["lambda_datafree_weights"]) == (10.0, 0.5)
    # random: seed 11 at 1.0 -> -2, seed 12 at 0.5 -> +4; averaged +1
    assert p.filter(pl.col("control") == "random")["gain_datafree_weights"].to_list() == [1.0]
    spec = tables.specific(p)
    got = {r["rule"]: r["specific_gain"] for r in spec.to_dicts()}
    assert got == {"lambda=1": 24.0, "oracle": 17.0, "calib": 14.0, "datafree:weights": 9.0}
    summary = tables.summary_specific(spec)
    assert summary.filter(pl.col("scope") == "overall")["rule"].unique(maintain_order=True).to_list() == [
        "lambda=1", "oracle", "calib", "datafree:weights"]


def test_a_merged_donor_is_its_own_kind_apart_from_single_donors():
    single = transfer_table()
    merged = single.with_columns(pl.lit("merged:mean").alias("donor"), (pl.col("accuracy") + 10.0).alias("accuracy"),
                                 (pl.col("gain") + 10.0).alias("gain"))
    p = tables.pairs(pl.concat([single, merged]))
    assert dict(zip(p["donor"], p["kind"])) == {"D": "single", "merged:mean": "merged"}
    summary = tables.summary_specific(tables.specific(p))
    overall = summary.filter((pl.col("scope") == "overall") & (pl.col("rule") == "oracle") & pl.col("seed").is_null())
    # single: donor 20, random 3; merged: both 10 higher -> same specific gain, kept in separate rows
    assert {r["kind"]: (r["donor_gain"], r["random_gain"], r["pairs"]) for r in overall.to_dicts()} == {
        "single": (20.0, 3.0, 1), "merged": (30.0, 13.0, 1)}
    heads = tables.headline(pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 0, "task": "R", "model": m, "split": "test",
                                           "accuracy": a} for m, a in (("ft", 90.0), ("ptq", 50.0), ("qat", 85.0), ("qat_ptq", 88.0))]), p)
    assert (heads["pairs"][0], heads["oracle_mean"][0]) == (1, 20.0)  # the headline is about single donors


def test_racing_rows_that_saw_part_of_a_split_are_not_read_by_any_rule():
    """A race's dropped lambda (n < the split) may look best on its few images; the rules ignore it."""
    rows = cell("none", None, {("test", 1.0): 70.0, ("test", 0.5): 60.0, ("calib", 1.0): 55.0, ("calib", 0.5): 65.0})
    rows += [{**rows[0], "lambda": 2.0, "accuracy": 99.0, "n": 10, "split": split} for split in ("test", "calib")]
    raced = pl.DataFrame([{**r, "search": "racing"} for r in rows])
    base = pl.DataFrame([{"arch": "a", "quant": "w2-channel", "seed": 0, "task": "R", "model": "ptq", "split": s,
                          "accuracy": 50.0} for s in ("test", "calib")])
    donor = tables.pairs(tables.with_gain(raced, base)).row(0, named=True)
    assert (donor["gain_lambda1"], donor["gain_oracle"], donor["lambda_oracle"], donor["lambda_calib"]) == (20.0, 20.0, 1.0, 0.5)


def test_quantizer_comparison_reads_gains_over_the_best_ptq_of_the_same_bits():
    base_rows = []
    for quant, bits, ptq, qat in (("w2-channel", 2, 40.0, 80.0), ("w2-channel-mse", 2, 50.0, 82.0), ("w3-channel", 3, 85.0, 88.0)):
        for model, acc in (("ft", 90.0), ("ptq", ptq), ("qat_ptq", qat), ("qat", 89.0)):
            base_rows.append({"arch": "a", "quant": quant, "seed": 0, "task": "R", "bits": bits, "model": model,
                              "split": "test", "accuracy": acc})
    baselines = pl.DataFrame(base_rows)
    pair_rows = pl.DataFrame([
        {"arch": "a", "quant": q, "seed": 0, "receiver": "R", "donor": "D", "control": c, "kind": "single",
         "gain_lambda1": g1, "gain_oracle": go, "gain_calib": gc, "directions": 1}
        for q, c, g1, go, gc in (("w2-channel", "none", 20.0, 25.0, 22.0), ("w2-channel", "random", 2.0, 5.0, 4.0),
                                 ("w2-channel-mse", "none", 6.0, 8.0, 7.0), ("w2-channel-mse", "random", 1.0, 3.0, 2.0),
                                 ("w3-channel", "none", 1.0, 2.0, 1.0), ("w3-channel", "random", 0.0, 1.0, 0.5))])
    out = tables.quantizers(baselines, pair_rows)
    row = {(r["quant"], r["rule"]): r for r in out.to_dicts()}
    absmax = row[("w2-channel", "oracle")]
    # patched = PTQ 40 + 25 = 65; the best 2-bit PTQ on R is mse's 50: 65 - 50 = +15; random 40 + 5 - 50 = -5
    assert (absmax["ptq"], absmax["best_ptq_same_bits"], absmax["patched"], absmax["patched_over_best_ptq"]) == (40.0, 50.0, 65.0, 15.0)
    assert (absmax["random"], absmax["random_over_best_ptq"], absmax["qat_ptq"], absmax["ft"]) == (45.0, -5.0, 80.0, 90.0)
    mse = row[("w2-channel-mse", "lambda=1")]
    assert (mse["patched"], mse["patched_over_best_ptq"], mse["random_over_best_ptq"]) == (56.0, 6.0, 1.0)
    w3 = row[("w3-channel", "calib")]
    assert (w3["best_ptq_same_bits"], w3["patched_over_best_ptq"]) == (85.0, 1.0)  # 3 bits compared only with 3 bits
    assert out["rule"].to_list()[:3] == ["lambda=1", "oracle", "calib"]


def test_qv_readme_replaces_the_summary_and_quantizer_blocks(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    qv = str(Path(sys.executable).parent / "qv")
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- readme:start -->old<!-- readme:end -->\nmid\n<!-- readme-quantizers:start -->old<!-- readme-quantizers:end -->\n")
    (tmp_path / "summary.md").write_text("x <!-- readme:start -->NEW HEADLINE<!-- readme:end --> y")
    (tmp_path / "quantizers.md").write_text("# t\n<!-- readme-quantizers:start -->| a |<!-- readme-quantizers:end -->\n")
    proc = subprocess.run([qv, "readme", "--summary", tmp_path / "summary.md", "--quantizers", tmp_path / "quantizers.md",
                           "--readme", readme], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert readme.read_text() == ("top\n<!-- readme:start -->NEW HEADLINE<!-- readme:end -->\nmid\n"
                                  "<!-- readme-quantizers:start -->| a |<!-- readme-quantizers:end -->\n")
    (tmp_path / "bad.md").write_text("no markers")
    proc = subprocess.run([qv, "readme", "--quantizers", tmp_path / "bad.md", "--readme", readme], capture_output=True, text=True)
    assert proc.returncode != 0 and "readme-quantizers:start" in proc.stderr


def test_cell_text_and_markdown_table_print_the_same_cells():
    from qvlib.plots import cell_text, markdown_table

    assert [cell_text(v) for v in (1.25, 1.0 / 3, None, 7, "pooled")] == ["1.2", "0.3", "", "7", "pooled"]
    assert cell_text(2.0 / 3, digits=3) == "0.667"
    table = markdown_table(pl.DataFrame({"seed": ["0", None], "wins %": [80.0, 86.66]}))
    assert table.splitlines() == ["| seed | wins % |", "|---|---|", "| 0 | 80.0 |", "|  | 86.7 |"]


# ---------------------------------------------------------------- run files: determinism and damaged inputs
GRID_TASKS = ("a", "b", "c")


def write_run_files(folder, seeds=(0, 1)):
    """Per-task and per-cell files of a small grid as the workflow writes them (two seeds, three tasks, a
    random control per donor, coarse accuracies so that many donors tie); returns the `qv tables` inputs."""
    import random

    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    run = {"arch": "tiny", "quant": "w2-channel", "bits": 2}
    files = {"baselines": [], "cells": [], "norms": [], "cosine": []}
    for seed in seeds:
        for task in GRID_TASKS:
            rows = [{**run, "seed": seed, "task": task, "model": m, "split": s, "accuracy": float(acc), "correct": acc, "n": 100}
                    for m, acc in (("ft", 90), ("ptq", 40), ("qat", 88), ("qat_ptq", 80)) for s in ("test", "calib")]
            files["baselines"].append(folder / f"base-{seed}-{task}.parquet")
            pl.DataFrame(rows).write_parquet(files["baselines"][-1])
            for donor in GRID_TASKS:
                variants = [("self", None)] if donor == task else [("none", None), ("random", 100 + seed)]
                rows = [{**run, "seed": seed, "receiver": task, "donor": donor, "control": control, "control_seed": cseed,
                         "search": "sweep", "split": split, "lambda": lam, "n": 100, "accuracy": float(acc), "correct": acc}
                        for control, cseed in variants for split in ("test", "calib") for lam in (0.5, 1.0, 2.0)
                        for acc in [5 * rng.randint(8, 14)]]
                files["cells"].append(folder / f"cell-{seed}-{task}-{donor}.parquet")
                pl.DataFrame(rows, schema_overrides={"control_seed": pl.Int64}).write_parquet(files["cells"][-1])
        files["norms"].append(folder / f"norms-{seed}.parquet")
        pl.DataFrame([{**run, "seed": seed, "task": t, "layer_type": "all", "ft_update_rel": 0.1, "qv_rel": 0.01 * (i + 1)}
                      for i, t in enumerate(GRID_TASKS)]).write_parquet(files["norms"][-1])
        files["cosine"].append(folder / f"cosine-{seed}.parquet")
        pl.DataFrame([{**run, "seed": seed, "task_a": a, "task_b": b, "cosine": 1.0 if a == b else 0.25}
                      for a in GRID_TASKS for b in GRID_TASKS]).write_parquet(files["cosine"][-1])
    return files


TABLE_OUTPUTS = ("baselines", "transfer", "donor", "receiver", "specific", "summary-specific", "norms", "cosine", "quantizers")


def run_report_steps(files, out):
    """`qv tables` then `qv figures`, as the workflow's tables and figures rules call them."""
    from helpers import qv

    out.mkdir()
    args = ["tables"]
    for key in ("baselines", "cells", "norms", "cosine"):
        args += [f"--{key}", *files[key]]
    for name in TABLE_OUTPUTS:
        args += [f"--out-{name}", out / f"{name}.parquet"]
    qv(*args, "--out-quantizers-md", out / "quantizers.md")
    qv("figures", "--arch", "tiny", "--quant", "w2-channel", "--baselines", out / "baselines.parquet",
       "--transfer", out / "transfer.parquet", "--summary-specific", out / "summary-specific.parquet",
       "--norms", out / "norms.parquet", "--cosine", out / "cosine.parquet", "--out-gain", out / "gain.png",
       "--out-cosine", out / "cos.png", "--out-summary", out / "summary.md")


def test_tables_and_summary_are_byte_identical_on_identical_inputs(tmp_path):
    files = write_run_files(tmp_path / "in")
    run_report_steps(files, tmp_path / "one")
    run_report_steps(files, tmp_path / "two")
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert {"summary.md", "quantizers.md", "specific.parquet", "receiver.parquet"} <= set(names)
    for name in names:
        if name.endswith(".png"):
            continue  # figures: matplotlib's rendering, not ours
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_best_donor_ties_go_to_the_first_donor_and_its_lambda1_gain_is_its_own():
    from qvlib.plots import best_donors

    rows = [{"receiver": "r", "donor": d, "gain_oracle": go, "gain_lambda1": g1}
            for d, go, g1 in (("d3", 5.0, 9.0), ("d1", 5.0, 1.0), ("d2", 5.0, 2.0), ("d0", 4.0, 20.0))]
    for order in (rows, rows[::-1], rows[1:] + rows[:1]):
        best = best_donors(pl.DataFrame(order)).row(0, named=True)
        # three donors tie on the oracle gain: the first by name wins; its lambda-1 gain, not d0's 20
        assert (best["best_donor"], best["best_oracle"], best["best_donor_lambda1"]) == ("d1", 5.0, 1.0)


def test_a_truncated_cell_file_is_named_with_what_to_do(tmp_path):
    from helpers import qv

    files = write_run_files(tmp_path / "in", seeds=(0,))
    bad = files["cells"][1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{bad}.*not a readable Parquet table.*delete it and rerun"):
        tables.read_all(files["cells"])
    out = tmp_path / "out"
    args = ["tables"]
    for key in ("baselines", "cells", "norms", "cosine"):
        args += [f"--{key}", *files[key]]
    proc = qv(*args, *(x for name in TABLE_OUTPUTS for x in (f"--out-{name}", out / f"{name}.parquet")),
              "--out-quantizers-md", out / "quantizers.md", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and str(bad) in lines[-1] and "delete it" in lines[-1], proc.stderr
    assert not [line for line in lines if "Traceback" in line] and not out.exists()
