"""The racing lambda search against the dense grid on a finished run's real cells, in one run.

    .venv/bin/python bench/racing_lambda.py --results results/default/vit_demo

For every (receiver, donor) pair of one seed, and for one norm-matched random direction of each
donor: each lambda of the grid (default: the paper's 11, 0.15 ... 1.50) is scored image by image on
the receiver's whole test and calib splits once (the dense grid, the baseline); the races the
workflow runs (qvlib.racing.race_splits: test with lambda = 1 kept, calib, then calib's pick
finished on test) read those per-image results, so they see exactly what the model would answer on
their subsamples, and count the image forwards they would spend. Prints, over all cells: the share
where the test race's lambda is within 0.5 points of the dense grid's best on the whole test split,
the same for calib's pick against the dense calib pick, and the races' forwards / the dense grid's
on both splits (goals: >= 95% and <= 0.35), beside the floor no race can go under: lambda = 1 and
the pick each on the whole test split (the lambda = 1 and oracle rules read those accuracies).
The dense per-image answers are computed once and kept (``--dense-cache``), so comparing more
settings afterwards costs only the races themselves.
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
from qvlib.pipeline import cached_splits, load_engine, random_control_seeds, set_threads  # noqa: E402
from qvlib.racing import race_splits  # noqa: E402
from qvlib.vectors import WeightVector, random_direction  # noqa: E402
from qvlib.vocab import Split  # noqa: E402
from run_store import RunStore  # noqa: E402

PAPER_GRID = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50]


def best(full: torch.Tensor, grid: list[float]) -> int:
    """Index of the dense grid's best lambda (ties: nearest 1, then smaller), as the tables pick it."""
    return min(range(len(full)), key=lambda i: (-int(full[i]), abs(grid[i] - 1.0), grid[i]))


def dense_answers(cfg, arch: str, args, run: RunStore, tasks: list[str], cache_file: Path) -> dict:
    """(receiver, donor, 'donor' | 'random') -> ({split: bool answers (lambdas, images)}, {split: labels}):
    every lambda of the grid on every image, computed once and kept in ``cache_file`` (keyed by the grid)."""
    if cache_file.exists():
        saved = torch.load(cache_file, weights_only=True)  # never unpickle code from a file
        if saved["grid"] == list(args.grid):
            return saved["answers"]
    answers = {}
    for receiver in tasks:
        engine, _ = load_engine(cfg, arch, run.ft(receiver, cfg.seed), "cpu")
        names = cfg.policy.select_model(engine.model)
        splits = cached_splits(engine, {s: run.split(receiver, s) for s in (Split.TEST, Split.CALIB)})
        labels = {str(s): data.labels.cpu() for s, data in splits.items()}
        for donor in tasks:
            if donor == receiver:
                continue
            rho = WeightVector.load(run.vector(donor, cfg.seed, cfg.quant.tag))
            for variant, vector in (("donor", rho), ("random", random_direction(rho, random_control_seeds(cfg, donor)[0]))):
                vec = {n: t.to(engine.device) for n, t in vector.items()}
                right = {str(s): torch.stack([engine.correct_mask(engine.quantized(names, cfg.quant, vec, lam), data).cpu()
                                              for lam in args.grid]) for s, data in splits.items()}
                answers[(receiver, donor, variant)] = (right, labels)
    torch.save({"grid": list(args.grid), "answers": answers}, cache_file)
    return answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True, help="a finished run's results/<config>/<arch> folder")
    p.add_argument("--seed", type=int, default=None, help="replicate (default: the config's first seed)")
    p.add_argument("--config", type=Path, default=None,
                   help="the run's config (default: config.yaml beside --results, as the last run left it; name the "
                        "study's config, e.g. results/study/default.yaml, to read a seed that run did not list)")
    p.add_argument("--grid", type=float, nargs="+", default=PAPER_GRID)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense-cache", type=Path, default=None,
                   help="file of the dense per-image answers (default: racing-dense-seed<S>.pt in --results); "
                        "computed once, then read, so further settings cost only the races")
    p.add_argument("--settings", nargs="+", default=["keep=0.333,margin=2"], metavar="KEY=VALUE,...",
                   help="race settings to compare on the same dense results: keyword arguments of "
                        "qvlib.racing.race_lambda (keep, margin, tolerance, start)")
    args = p.parse_args()
    settings = list(args.settings)
    set_threads(args.threads)
    arch = args.results.name
    cfg = Config.load(args.config or args.results.parent / "config.yaml").with_seed(args.seed)
    run = RunStore(args.results, cfg)  # the run's models, vectors and cached splits in the store
    tasks = cfg.task_names
    cells = dense_forwards = floor_forwards = 0
    stats = {k: {"oracle": [], "calib": [], "forwards": 0, "test_forwards": 0} for k in settings}
    dense_test = 0
    cache_file = args.dense_cache or args.results / f"racing-dense-seed{cfg.seed}.pt"
    dense = dense_answers(cfg, arch, args, run, tasks, cache_file)
    for (receiver, donor, variant), (right, labels) in dense.items():
        test_full, calib_full = right[Split.TEST].sum(dim=1), right[Split.CALIB].sum(dim=1)
        n = right[Split.TEST].shape[1]
        dense_calib_pick = best(calib_full, args.grid)
        for key in settings:
            options = {k: int(v) if k == "start" else float(v) for k, v in (kv.split("=") for kv in key.split(","))}
            races = race_splits(lambda s, lam, idx: right[s][args.grid.index(lam), idx], args.grid, labels,
                                seed=cfg.seed, **options)
            oracle = args.grid.index(races[Split.TEST].best_lambda)
            calib = args.grid.index(races[Split.CALIB].best_lambda)
            stats[key]["oracle"].append(float(test_full.max() - test_full[oracle]) / n * 100)
            stats[key]["calib"].append(float(test_full[dense_calib_pick] - test_full[calib]) / n * 100)
            stats[key]["forwards"] += sum(r.forwards for r in races.values())
            stats[key]["test_forwards"] += races[Split.TEST].forwards
        cells += 1
        dense_forwards += len(args.grid) * sum(r.shape[1] for r in right.values())
        floor_forwards += 2 * n
        dense_test += len(args.grid) * n
    sizes = {s: r.shape[1] for s, r in right.items()}
    print(f"hardware: {platform.processor() or platform.machine()}, {args.threads} threads; torch {torch.__version__}")
    print(f"run {args.results} seed {cfg.seed}: {cells} cells (donor and one random direction per pair), "
          f"grid of {len(args.grid)} lambdas, test {sizes[Split.TEST]} + calib {sizes[Split.CALIB]} images "
          f"(last receiver); dense answers from {cache_file}")
    print(f"floor: lambda = 1 and one pick on the whole test split = {floor_forwards / dense_forwards:.3f} of the dense forwards")
    for key in settings:
        st = stats[key]
        within = sum(g <= 0.5 for g in st["oracle"])
        calib_within = sum(abs(g) <= 0.5 for g in st["calib"])
        print(f"{key}: oracle within 0.5 points of "
              f"the dense best {within}/{cells} = {within / cells:.3f} (goal >= 0.95), largest gap {max(st['oracle']):.2f}; "
              f"calib pick's test accuracy within 0.5 points of the dense calib pick's {calib_within}/{cells} = "
              f"{calib_within / cells:.3f}; image forwards race {st['forwards']:,} / dense {dense_forwards:,} = "
              f"{st['forwards'] / dense_forwards:.3f} (goal <= 0.35); test split alone (calib's pick finished there "
              f"included) {st['test_forwards'] / dense_test:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
