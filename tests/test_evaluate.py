"""Evaluation engine against a plain reference loop, lambda = 0 == PTQ, controls, search, bad input."""

import polars as pl
import pytest
import torch

from helpers import mini_config, qv
from qvlib.evaluate import accuracy, dense_grid, load_split, search_lambda
from qvlib.quant import QuantPolicy, QuantSpec, fake_quant_state
from qvlib.vectors import WeightVector, patch, random_direction


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two tasks fine-tuned (FT and QAT) on the tiny arch, their vectors and cached splits."""
    d = tmp_path_factory.mktemp("grid")
    cfg = mini_config(d / "c.yaml", pretrain=False, tasks=("shapes", "dots"))
    for task in ("shapes", "dots"):
        for mode in ("ft", "qat"):
            qv("finetune", "--config", cfg, "--arch", "tiny", "--task", task, "--mode", mode, "--threads", "1",
               "--no-progress", "-o", d / f"{task}.{mode}.safetensors")
        qv("extract", "--qat", d / f"{task}.qat.safetensors", "--ft", d / f"{task}.ft.safetensors", "-o", d / f"{task}.qv.safetensors")
        qv("cache-splits", "--config", cfg, "--arch", "tiny", "--task", task,
           "--test", d / f"{task}.test.safetensors", "--calib", d / f"{task}.calib.safetensors")
    return d, cfg


def reference_correct(ckpt: dict, images, labels, spec, vector=None, lam=0.0):
    """Load, patch, quantize, then evaluate image by image: the slow obvious way."""
    from qvlib.data.base import Preprocess
    from qvlib.models import ArchSpec, build_vit

    from conftest import TINY

    state = patch(ckpt, [(lam, vector)]) if vector is not None else dict(ckpt)
    state = fake_quant_state(state, spec) if spec is not None else state
    model = build_vit(ArchSpec("tiny", "vit_tiny_patch16_224", TINY), num_classes=ckpt["head.weight"].shape[0])
    model.load_state_dict(state)
    model.eval()
    pre = Preprocess.from_model(model)
    correct = 0
    with torch.no_grad():
        for x, y in zip(images, labels):
            correct += int(model(pre.normalize(x[None])).argmax(1).item() == int(y))
    return correct


def test_engine_matches_reference_loop(grid):
    from qvlib.config import Config
    from qvlib.data.cache import read_split_cache
    from qvlib.pipeline import load_engine

    d, cfg_path = grid
    cfg = Config.load(cfg_path)
    engine, ckpt = load_engine(cfg, "tiny", d / "shapes.ft.safetensors", "cpu")
    images, labels, _ = read_split_cache(d / "shapes.test.safetensors")
    split = load_split(images, labels, engine.device)
    names = QuantPolicy().select_model(engine.model)
    rho = WeightVector.load(d / "dots.qv.safetensors")
    spec = QuantSpec(bits=2)
    for lam in (0.0, 1.0, 1.7):
        got = engine.correct(engine.quantized(names, spec, dict(rho), lam), split)
        assert got == reference_correct(dict(ckpt), images, labels, spec, rho, lam)
    assert engine.correct({}, split) == reference_correct(dict(ckpt), images, labels, None)  # FT, unquantized
    assert engine.passes == 4
    mask = engine.correct_mask(engine.quantized(names, spec, dict(rho), 1.0), split)
    assert mask.dtype == torch.bool and mask.shape == labels.shape
    assert int(mask.sum()) == reference_correct(dict(ckpt), images, labels, spec, rho, 1.0)
    assert int(mask[:7].sum()) == reference_correct(dict(ckpt), images[:7], labels[:7], spec, rho, 1.0)  # per image


def test_transfer_rows_lambda0_equals_ptq_and_self_equals_qat(grid):
    d, cfg = grid
    common = ["--config", cfg, "--arch", "tiny", "--test-cache", d / "shapes.test.safetensors",
              "--calib-cache", d / "shapes.calib.safetensors"]
    qv("evaluate-baselines", "--task", "shapes", "--ft", d / "shapes.ft.safetensors", "--qat", d / "shapes.qat.safetensors",
       "-o", d / "base.parquet", *common)
    qv("evaluate-transfer", "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors",
       "--donor", f"dots={d / 'dots.qv.safetensors'}", "--donor", f"shapes={d / 'shapes.qv.safetensors'}",
       "-o", str(d / "cell_{donor}.parquet"), *common)
    base = pl.read_parquet(d / "base.parquet")
    assert set(base["model"]) == {"ft", "ptq", "qat", "qat_ptq"} and set(base["split"]) == {"test", "calib"}
    assert base.filter(pl.col("split") == "test")["n"].to_list() == [60] * 4
    cell = pl.read_parquet(d / "cell_dots.parquet")
    assert set(cell["control"]) == {"none", "random"}
    assert {"arch", "quant", "seed", "receiver", "donor", "control_seed", "lambda", "bits", "split", "correct", "n", "accuracy"} <= set(cell.columns)
    for split in ("test", "calib"):
        ptq = base.filter((pl.col("model") == "ptq") & (pl.col("split") == split))["correct"].item()
        zero = cell.filter((pl.col("lambda") == 0.0) & (pl.col("split") == split) & (pl.col("search") == "sweep"))
        assert zero["correct"].to_list() == [ptq] * 3  # the donor and its two random controls all start at PTQ
        own = pl.read_parquet(d / "cell_shapes.parquet")
        assert set(own["control"]) == {"self"}
        qat_q = base.filter((pl.col("model") == "qat_ptq") & (pl.col("split") == split))["correct"].item()
        at_one = own.filter((pl.col("lambda") == 1.0) & (pl.col("split") == split) & (pl.col("search") == "sweep"))
        assert at_one["correct"].item() == qat_q
    adaptive = cell.filter(pl.col("search") == "adaptive")
    assert len(adaptive) == 1 and set(adaptive["split"]) == {"test"} and set(adaptive["control"]) == {"none"}


def test_several_donors_in_one_process_write_the_cells_of_one_process_per_donor(grid, tmp_path):
    """A receiver's row in one call (one -o per donor, in order) gives each donor the file a call of its own gives."""
    d, cfg = grid
    common = ["--config", cfg, "--arch", "tiny", "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors",
              "--test-cache", d / "shapes.test.safetensors", "--calib-cache", d / "shapes.calib.safetensors"]
    donors = {"dots": d / "dots.qv.safetensors", "shapes": d / "shapes.qv.safetensors"}
    both = [a for name, path in donors.items() for a in ("--donor", f"{name}={path}")]
    for name, path in donors.items():
        qv("evaluate-transfer", *common, "--donor", f"{name}={path}", "-o", tmp_path / f"alone-{name}.parquet")
    qv("evaluate-transfer", *common, *both, "-o", tmp_path / "row-a.parquet", "-o", tmp_path / "row-b.parquet")
    assert pl.read_parquet(tmp_path / "row-a.parquet").equals(pl.read_parquet(tmp_path / "alone-dots.parquet"))
    assert pl.read_parquet(tmp_path / "row-b.parquet").equals(pl.read_parquet(tmp_path / "alone-shapes.parquet"))
    for outputs, message in ((["x.parquet"], "would write the same file"),
                             (["a.parquet", "b.parquet", "c.parquet"], "2 --donor values but 3 -o paths")):
        proc = qv("evaluate-transfer", *common, *both, *[a for out in outputs for a in ("-o", tmp_path / out)], check=False)
        assert proc.returncode == 2 and message in proc.stderr
        assert not any((tmp_path / out).exists() for out in outputs)


def test_racing_cells_reach_the_whole_split_where_a_rule_reads_it(grid, tmp_path):
    """The same cell dense and raced: racing rows give each lambda's answers on the images it saw;
    lambda = 1, the oracle, calib's pick (on test) and the data-free picks are scored on the whole
    split and agree with the dense cell; pairs() reads both alike."""
    from qvlib import tables

    d, _ = grid
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    common = ["--arch", "tiny", "--test-cache", d / "shapes.test.safetensors", "--calib-cache", d / "shapes.calib.safetensors",
              "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors", "--donor", f"dots={d / 'dots.qv.safetensors'}"]
    extra = dict(tasks=("shapes", "dots"), pretrain=False, lambdas=lambdas, oracle_search=False,
                 datafree={"criteria": ["weights"]}, random_controls=1)
    dense_cfg = mini_config(tmp_path / "dense.yaml", **extra)
    race_cfg = mini_config(tmp_path / "race.yaml", **extra, lambda_search={"method": "racing", "start": 8, "keep": 0.25, "margin": 0})
    qv("evaluate-transfer", "--config", dense_cfg, *common, "-o", tmp_path / "dense.parquet")
    qv("evaluate-transfer", "--config", race_cfg, *common, "-o", tmp_path / "race.parquet")
    dense, race = pl.read_parquet(tmp_path / "dense.parquet"), pl.read_parquet(tmp_path / "race.parquet")
    assert set(race["search"]) == {"racing", "datafree"} and set(dense["search"]) == {"sweep", "datafree"}
    n = {s: dense.filter(pl.col("split") == s)["n"].max() for s in ("test", "calib")}
    raced = race.filter(pl.col("search") == "racing")
    assert raced["n"].min() == 8 and raced["n"].sum() < 0.8 * len(lambdas) * (n["test"] + n["calib"]) * 2
    for (control, split), rows in raced.group_by("control", "split"):
        full = rows.filter(pl.col("n") == n[split])
        if split == "test":  # lambda = 1 is kept to the end on test (the lambda = 1 rule reads it), not on calib
            assert 1.0 in full["lambda"].to_list()
        joined = full.join(dense.filter(pl.col("search") == "sweep"), on=["control", "split", "lambda"])
        assert len(joined) == len(full) and joined["correct"].to_list() == joined["correct_right"].to_list()
    base = pl.DataFrame([{"arch": "tiny", "quant": dense["quant"][0], "seed": 0, "task": "shapes", "model": "ptq",
                          "split": s, "accuracy": 10.0} for s in ("test", "calib")])
    got = {name: tables.pairs(tables.with_gain(t, base)).sort("control") for name, t in (("dense", dense), ("race", race))}
    for col in ("gain_lambda1", "gain_datafree_weights"):
        assert got["race"][col].to_list() == got["dense"][col].to_list()
    for col in ("gain_oracle", "gain_calib"):  # the race's pick is no better than the dense best
        assert all(r <= dn + 1e-9 for r, dn in zip(got["race"][col], got["dense"][col]))
    datafree = race.filter(pl.col("search") == "datafree")
    assert datafree["n"].to_list() == [n["test"]] * 2


def test_random_control_has_exactly_the_donor_norms():
    g = torch.Generator().manual_seed(0)
    rho = WeightVector({"a": torch.randn(4, 5, generator=g), "b": torch.randn(3, 3, generator=g) * 7})
    r = random_direction(rho, seed=11)
    for name in rho:
        assert float(r[name].double().norm()) == pytest.approx(float(rho[name].double().norm()), rel=1e-6)
    assert abs(r.cosine(rho)) < 0.9
    assert all(torch.equal(r[n], random_direction(rho, seed=11)[n]) for n in rho)
    assert not torch.equal(r["a"], random_direction(rho, seed=12)["a"])


def test_adaptive_search_finds_dense_grid_best_with_fewer_passes():
    grid = dense_grid()
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 2.0 and grid[10] == 1.0
    for peak in (0.0, 0.35, 0.8, 1.0, 1.25, 1.9, 2.0):
        curve = {lam: int(1000 - 400 * (lam - peak) ** 2) for lam in grid}
        calls = []
        found = search_lambda(lambda lam: calls.append(lam) or curve[lam])
        assert found.best_correct == max(curve.values())
        assert len(calls) == len(set(calls)) <= 9
    flat = search_lambda(lambda lam: 5)
    assert flat.best_lambda == min(flat.evaluated, key=lambda lam: abs(lam - 1.0))  # ties prefer lambda near 1


def test_bad_inputs_fail_clearly_and_write_nothing(grid, tmp_path):
    d, cfg = grid
    common = ["--config", cfg, "--arch", "tiny", "--test-cache", d / "shapes.test.safetensors"]
    out = tmp_path / "o.parquet"
    # a vector made for another quantization spec
    rho = WeightVector.load(d / "dots.qv.safetensors")
    WeightVector(dict(rho)).save(tmp_path / "w4.safetensors", {**rho.metadata, "quant": QuantSpec(bits=4).to_json()})
    proc = qv("evaluate-transfer", "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors",
              "--donor", f"dots={tmp_path / 'w4.safetensors'}", "-o", out, *common, check=False)
    assert proc.returncode == 2 and "w4-channel" in proc.stderr and "w2-channel" in proc.stderr
    # a vector of another shape
    WeightVector({k: torch.zeros(2, 2) for k in rho}).save(tmp_path / "shape.safetensors", {"quant": QuantSpec(bits=2).to_json()})
    proc = qv("evaluate-transfer", "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors",
              "--donor", f"dots={tmp_path / 'shape.safetensors'}", "-o", out, *common, check=False)
    assert proc.returncode == 2 and "(2, 2)" in proc.stderr
    # a receiver without cached splits
    proc = qv("evaluate-transfer", "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors",
              "--donor", f"dots={d / 'dots.qv.safetensors'}", "-o", out, "--config", cfg, "--arch", "tiny",
              "--test-cache", tmp_path / "none.safetensors", check=False)
    assert proc.returncode == 2 and "no cached split" in proc.stderr
    # a malformed donor
    proc = qv("evaluate-transfer", "--receiver", "shapes", "--ft", d / "shapes.ft.safetensors",
              "--donor", "dots", "-o", out, *common, check=False)
    assert proc.returncode == 2 and "NAME=VECTOR" in proc.stderr
    assert not out.exists()


def test_accuracy_helper():
    assert accuracy(3, 4) == 75.0
    assert accuracy(0, 0) != accuracy(0, 0)  # nan
