"""What a config's evaluation grid costs: image forwards (dense sweep vs racing, controls included),
cache bytes, and GPU-hours per arch from a throughput.

    .venv/bin/python bench/paper_cost.py --config config/paper.yaml
    .venv/bin/python bench/paper_cost.py --config config/paper.yaml --throughput vit_base=10800 --racing-ratio 0.25

Counted per arch and seed, as the workflow runs it (qvlib.pipeline): baselines (4 models on test
and calib per task); every (receiver, donor) cell, the receiver's own vector ('self', no controls)
and each merged donor, each with ``random_controls`` random directions; per vector the lambda sweep
on test and calib, the golden-section oracle search (``oracle_search``, at most 9 test passes, donors
only) and the ``outputs`` data-free criterion (noise images, one pass per lambda plus the reference).
Racing replaces the sweep's forwards on test and calib by ``--racing-ratio`` of them: the share
bench/racing_lambda.py measures on real cells for the races the workflow runs (test, calib, calib's
pick finished on test); a data-free pick outside the test race's finalists costs one more partial
test pass, not counted. With racing on, the golden-section search is redundant: the racing column
leaves it out.

Split sizes: the paper's 22 sources as qvlib loads them (below), or ``--size task=TRAIN:TEST``;
calib is min(10% of train, 5,000) images carved from train (qvlib.data.base). Throughput defaults:
img/s per (donor, lambda) cell measured on one NVIDIA H100 80GB by bench/arch_throughput.py (torch
2.11, 224 px, the README's figures), for the config's evaluation precision.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qvlib.config import Config  # noqa: E402
from qvlib.data.base import CALIB_FRACTION, CALIB_MAX  # noqa: E402
from qvlib.pipeline import arch_pixels  # noqa: E402
from qvlib.vocab import Precision  # noqa: E402

# (images in the training source before calib is carved, test images) of the paper's tasks, in the
# splits config/paper.yaml reads (the authors' Hugging Face copies, by their dataset cards; not
# re-counted here, no download on this machine).
PAPER_SPLITS = {
    "eurosat": (21_600, 2_700), "dtd": (3_760, 1_880), "stanford_cars": (8_144, 8_041),
    "sun397": (19_850, 19_850),  # tanganke/sun397: a fixed split, not torchvision's 108,754 images
    "svhn": (73_257, 26_032), "resisc45": (18_900, 6_300), "mnist": (60_000, 10_000), "gtsrb": (26_640, 12_630),
    "fer2013": (28_709, 7_178),  # clip-benchmark/wds_fer2013: public and private test images
    "pcam": (262_144, 32_768), "cifar100": (50_000, 10_000), "flowers102": (1_020, 6_149),
    "oxford_pet": (3_680, 3_669), "stl10": (5_000, 8_000), "kmnist": (60_000, 10_000), "emnist": (124_800, 20_800),
    "rendered_sst2": (6_920, 1_821), "fashion_mnist": (60_000, 10_000), "food101": (75_750, 25_250),
    "cifar10": (50_000, 10_000), "imagenet": (1_281_167, 50_000), "tiny_imagenet": (100_000, 10_000),
}
# img/s per cell on one H100 (bench/arch_throughput.py, README), by timm name and precision.
H100_THROUGHPUT = {
    Precision.BF16: {"vit_tiny_patch16_224": 28_046, "vit_small_patch16_224": 16_683,
                     "vit_base_patch16_224": 8_069, "vit_large_patch16_224": 2_951},
    Precision.FP32: {"vit_tiny_patch16_224": 10_173, "vit_small_patch16_224": 3_989,
                     "vit_base_patch16_224": 1_216, "vit_large_patch16_224": 358},
}
GOLDEN_PASSES = 9  # qvlib.evaluate.search_lambda on its 21-point grid (tests/test_evaluate.py bounds it)
RACING_RATIO = 0.55  # the default race (keep 1/3, margin 2) on the demo's 1,000-image splits (bench/racing_lambda.py: 0.546)


def split_sizes(tasks: list[str], given: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Task -> (test, calib) images."""
    out = {}
    for task in tasks:
        if task not in given and task not in PAPER_SPLITS:
            raise SystemExit(f"no split sizes for task {task!r}: pass --size {task}=TRAIN:TEST")
        train, test = given.get(task) or PAPER_SPLITS[task]
        out[task] = (test, min(int(train * CALIB_FRACTION), CALIB_MAX))
    return out


def grid_forwards(cfg: Config, sizes: dict[str, tuple[int, int]], racing_ratio: float) -> dict[str, int]:
    """Image forwards of one arch at one seed: baselines, the dense grid and the raced grid."""
    tasks, lambdas, controls = cfg.task_names, len(cfg.lambdas), cfg.random_controls
    golden = GOLDEN_PASSES if cfg.oracle_search else 0
    noise = (lambdas + 1) * cfg.datafree_images if "outputs" in cfg.datafree_criteria else 0
    out = {"baselines": sum(4 * (t + c) for t, c in sizes.values()), "dense": 0, "racing": 0, "vectors": 0}
    for receiver in tasks:
        test, calib = sizes[receiver]
        donors = len(tasks) - 1 + len(cfg.merged_donors)  # single donors other than the receiver, merged donors
        vectors = 1 + donors * (1 + controls)  # self, then each donor with its random directions
        searched = 1 + donors  # the golden-section search runs for self and donors, not for random directions
        sweep = vectors * lambdas * (test + calib)
        out["vectors"] += vectors
        out["dense"] += sweep + searched * golden * test + vectors * noise
        out["racing"] += round(racing_ratio * sweep) + vectors * noise
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "config" / "paper.yaml")
    p.add_argument("--throughput", nargs="*", default=[], metavar="ARCH=IMG_PER_S",
                   help="img/s per cell for an arch of the config (default: the H100 figures above)")
    p.add_argument("--precision", choices=[str(p) for p in Precision], default=None,
                   help="which H100 figures to default to (default: the config's evaluate.precision)")
    p.add_argument("--racing-ratio", type=float, default=RACING_RATIO,
                   help=f"share of the sweep's forwards a race spends (default {RACING_RATIO})")
    p.add_argument("--size", nargs="*", default=[], metavar="TASK=TRAIN:TEST", help="split sizes of other tasks")
    args = p.parse_args()
    cfg = Config.load(args.config)
    given = {k: tuple(int(x) for x in v.split(":")) for k, v in (s.split("=") for s in args.size)}
    sizes = split_sizes(cfg.task_names, given)
    precision = Precision(args.precision or cfg.eval_precision())
    throughput = {k: float(v) for k, v in (t.split("=") for t in args.throughput)}
    seeds = len(cfg.seeds)
    forwards = grid_forwards(cfg, sizes, args.racing_ratio)
    method = cfg.lambda_search["method"]

    print(f"config {args.config.name}: {len(cfg.task_names)} tasks, {len(cfg.lambdas)} lambdas, "
          f"{cfg.random_controls} random control(s) per donor, merged donors {cfg.merged_donors or 'none'}, "
          f"oracle search {'on' if cfg.oracle_search else 'off'}, {seeds} seed(s), "
          f"lambda_search {method}")
    print(f"images: {sum(t for t, _ in sizes.values()):,} test + {sum(c for _, c in sizes.values()):,} calib; "
          f"{forwards['vectors']:,} vectors evaluated per arch and seed")
    by_pixels = defaultdict(list)
    for arch in cfg.arch_names:
        by_pixels[arch_pixels(cfg, arch)].append(arch)
    cache_bytes = 0
    for pixels, archs in by_pixels.items():
        side = int(pixels.split("px")[0])
        group = sum(t + c for t, c in sizes.values()) * 3 * side * side
        cache_bytes += group
        print(f"cache {pixels} (archs {', '.join(archs)}): {len(sizes)} test + {len(sizes)} calib files, {group / 1e9:.1f} GB")
    print(f"cache in all: {cache_bytes / 1e9:.1f} GB (one cache per arch would be "
          f"{cache_bytes / 1e9 * len(cfg.arch_names) / len(by_pixels):.1f} GB)")
    print(f"\nper arch, all seeds, evaluation precision {precision}, racing ratio {args.racing_ratio}:")
    print("| arch | img/s | forwards dense | forwards racing | racing/dense | GPU-hours dense | GPU-hours racing |")
    print("|---|---|---|---|---|---|---|")
    for arch in cfg.arch_names:
        rate = throughput.get(arch) or H100_THROUGHPUT[precision].get(cfg.arch(arch).timm_name)
        dense = seeds * (forwards["baselines"] + forwards["dense"])
        raced = seeds * (forwards["baselines"] + forwards["racing"])
        hours = (f"{dense / rate / 3600:.2f} | {raced / rate / 3600:.2f}" if rate else "(pass --throughput) | ")
        print(f"| {arch} | {rate or '?':,} | {dense:,} | {raced:,} | {raced / dense:.3f} | {hours} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
