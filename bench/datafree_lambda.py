"""How far the data-free lambda criteria land from the oracle, on a finished run.

    .venv/bin/python bench/datafree_lambda.py --results results/default/vit_demo [--seed 0]

For every (receiver, donor) pair of one seed, each criterion of qvlib.datafree picks a lambda from
the run's own sweep, using only the receiver's FT weights and the vector (``outputs``: plus noise
images); the test gain at that lambda is read from the run's transfer.parquet (no new evaluation).
The FT models and vectors are read from the shared store, where the run's store.json places them.
The same criterion is applied to the donor's first random control. Printed beside them: lambda = 1,
the lambda chosen on the calib split, and the oracle (best lambda on test), the baseline every
figure is a ratio of (share of the oracle gain each rule keeps).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvlib.config import Config  # noqa: E402
from qvlib.datafree import LAMBDA_CRITERIA, choose_lambda, noise_images, score_lambdas  # noqa: E402
from qvlib.pipeline import load_engine, random_control_seeds  # noqa: E402
from qvlib.provenance import machine_line  # noqa: E402
from qvlib.tables import pairs, single_donors  # noqa: E402
from qvlib.vectors import WeightVector, random_direction  # noqa: E402
from qvlib.vocab import Control, Search, Split  # noqa: E402
from run_store import RunStore  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="a finished run's results/<config>/<arch> folder")
    parser.add_argument("--seed", type=int, default=None, help="replicate seed (default: the config's first)")
    parser.add_argument("--images", type=int, default=256, help="noise images for the outputs criterion")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config.load(args.results.parent / "config.yaml").with_seed(args.seed)
    arch, run = args.results.name, RunStore(args.results, cfg)
    transfer = pl.read_parquet(args.results / "transfer.parquet").filter(pl.col("seed") == cfg.seed)
    test = transfer.filter((pl.col("split") == Split.TEST) & (pl.col("search") == Search.SWEEP))
    rows = []
    for receiver in cfg.task_names:
        engine, ckpt = load_engine(cfg, arch, run.ft(receiver, cfg.seed), "cpu")
        inputs = noise_images(args.images, engine.preprocess.img_size)
        for donor in [t for t in cfg.task_names if t != receiver]:
            rho = WeightVector.load(run.vector(donor, cfg.seed, cfg.quant.tag))
            control_seed = random_control_seeds(cfg, donor)[0]
            for control, vec, seed in ((Control.DONOR, rho, None), (Control.RANDOM, random_direction(rho, control_seed), control_seed)):
                gains = test.filter((pl.col("receiver") == receiver) & (pl.col("donor") == donor) & (pl.col("control") == control))
                if seed is not None:
                    gains = gains.filter(pl.col("control_seed") == seed)
                gain_at = dict(zip(gains["lambda"].to_list(), gains["gain"].to_list()))
                for criterion in LAMBDA_CRITERIA:
                    scores = score_lambdas(criterion, ckpt, vec, cfg.quant, cfg.lambdas, cfg.policy,
                                           model=engine.model, inputs=inputs)
                    lam = choose_lambda(scores)
                    rows.append({"receiver": receiver, "donor": donor, "control": str(control), "rule": f"datafree:{criterion}",
                                 "lambda": lam, "gain": gain_at[lam]})
    chosen = pl.DataFrame(rows)
    ref = single_donors(pairs(transfer)).filter(pl.col("control").is_in([str(Control.DONOR), str(Control.RANDOM)]))
    summary = []
    for control in (Control.DONOR, Control.RANDOM):
        r = ref.filter(pl.col("control") == control)
        oracle = float(r["gain_oracle"].mean())
        line = {"control": str(control), "oracle": oracle, "calib": float(r["gain_calib"].mean()), "lambda=1": float(r["gain_lambda1"].mean())}
        for criterion in LAMBDA_CRITERIA:
            c = chosen.filter((pl.col("control") == control) & (pl.col("rule") == f"datafree:{criterion}"))
            line[f"datafree:{criterion}"] = float(c["gain"].mean())
            line[f"median lambda {criterion}"] = float(c["lambda"].median())
        summary.append(line)
    print(f"{arch}, seed {cfg.seed}, {len(ref.filter(pl.col('control') == Control.DONOR))} pairs; machine: {machine_line()}")
    print("mean test gain over PTQ (points) at the lambda each rule picks; the random row averages the donors' random controls")
    print("(oracle and calib over all of a pair's random controls, the data-free rules over the first)")
    for line in summary:
        parts = [f"{k} {v:+.2f}" if not k.startswith("median") else f"{k} {v:.2f}" for k, v in line.items() if k != "control"]
        share = {k: line[k] / line["oracle"] for k in line if k.startswith("datafree") or k in ("calib", "lambda=1")}
        print(f"  {line['control']:>6}: " + ", ".join(parts))
        print("          share of the oracle gain kept: " + ", ".join(f"{k} {v:.2f}" for k, v in share.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
