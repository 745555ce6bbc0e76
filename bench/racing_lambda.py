"""The racing lambda search against the dense grid on a finished run's real cells, in one run.

    .venv/bin/python bench/racing_lambda.py --results results/default/vit_demo

For every (receiver, donor) pair of one seed, and for one norm-matched random direction of each
donor: each lambda of the grid (default: the paper's 11, 0.15 ... 1.50) is scored image by image on
the receiver's whole test split once (the dense grid, the baseline); the race then reads those
per-image results, so it sees exactly what the model would answer on its subsamples, and counts the
image forwards it would spend. Prints, over all cells: the share where the race's lambda is within
0.5 points of the dense grid's best on the full split, and the race's forwards / the dense grid's
(goals: >= 95% and <= 0.35).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qvlib.config import Config  # noqa: E402
from qvlib.pipeline import cache_path, cached_splits, load_engine, random_control_seeds, set_threads  # noqa: E402
from qvlib.racing import race_lambda  # noqa: E402
from qvlib.vectors import WeightVector, random_direction  # noqa: E402
from qvlib.vocab import Split  # noqa: E402

PAPER_GRID = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True, help="a finished run's results/<config>/<arch> folder")
    p.add_argument("--seed", type=int, default=None, help="replicate (default: the config's first seed)")
    p.add_argument("--grid", type=float, nargs="+", default=PAPER_GRID)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=["0.333:2.0"], metavar="KEEP:MARGIN",
                   help="race settings to compare on the same dense results (keep fraction : margin in standard errors of the paired difference)")
    args = p.parse_args()
    settings = [tuple(float(v) for v in item.split(":")) for item in args.settings]
    set_threads(args.threads)
    arch = args.results.name
    cfg = Config.load(args.results.parent / "config.yaml").with_seed(args.seed)
    run = args.results / f"seed{cfg.seed}"
    spec, tasks = cfg.quant, cfg.task_names
    cells = dense_forwards = 0
    hits = {k: 0 for k in settings}
    race_forwards = {k: 0 for k in settings}
    gaps = {k: [] for k in settings}
    for receiver in tasks:
        engine, _ = load_engine(cfg, arch, run / "checkpoints" / f"{receiver}.ft.safetensors", "cpu")
        names = cfg.policy.select_model(engine.model)
        split = cached_splits(engine, {Split.TEST: cache_path(cfg, arch, args.results.parent, receiver, Split.TEST)})[Split.TEST]
        for donor in tasks:
            if donor == receiver:
                continue
            rho = WeightVector.load(run / "vectors" / f"{donor}.safetensors")
            for vector in (rho, random_direction(rho, random_control_seeds(cfg, donor)[0])):
                vec = {n: t.to(engine.device) for n, t in vector.items()}
                right = torch.stack([engine.correct_mask(engine.quantized(names, spec, vec, lam), split) for lam in args.grid])
                full = right.sum(dim=1)
                for keep, margin in settings:
                    result = race_lambda(lambda lam, idx: right[args.grid.index(lam), idx.to(right.device)], args.grid,
                                         split.labels.cpu(), keep=keep, margin=margin)
                    gap = (full.max() - full[args.grid.index(result.best_lambda)]).item() / len(split) * 100
                    gaps[keep, margin].append(gap)
                    hits[keep, margin] += gap <= 0.5
                    race_forwards[keep, margin] += result.forwards
                cells += 1
                dense_forwards += len(args.grid) * len(split)
    print(f"hardware: {platform.processor() or platform.machine()}, {args.threads} threads; torch {torch.__version__}")
    print(f"run {args.results} seed {cfg.seed}: {cells} cells (donor and one random direction per pair), "
          f"grid of {len(args.grid)} lambdas")
    for key in settings:
        print(f"keep {key[0]:.3f}, margin {key[1]:.2f}: within 0.5 points of the dense best {hits[key]}/{cells} = "
              f"{hits[key] / cells:.3f} (goal >= 0.95), largest gap {max(gaps[key]):.2f} points; image forwards race "
              f"{race_forwards[key]:,} / dense {dense_forwards:,} = {race_forwards[key] / dense_forwards:.3f} (goal <= 0.35)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
