"""The evaluation engine's speed on the paper's architectures: bf16 autocast (what the engine uses on
CUDA) against fp32 (the baseline, measured in the same run), per ViT size, at 224 px.

    python bench/arch_throughput.py                          # ViT-T/S/B/L on the GPU
    python bench/arch_throughput.py --archs vit_base_patch16_224 --n 2048 --device cpu

Each (donor, lambda) cell is what the grid pays for: fake-quantize the patched block weights once,
then one forward pass over the receiver's resident split. Images are random uint8 (accuracy is not
the point); weights are timm's architecture with random initialisation (no download). Prints img/s
per cell pass and the bf16/fp32 ratio; feed the bf16 figure to `bench/paper_cost.py --throughput`.
"""

from __future__ import annotations

import argparse
import time

import torch

from qvlib.data.base import Preprocess
from qvlib.evaluate import Engine, load_split
from qvlib.models import ArchSpec, build_vit
from qvlib.quant import DEFAULT_POLICY, QuantSpec

PAPER_ARCHS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cell_rate(engine: Engine, names: list[str], spec: QuantSpec, vector: dict, split, cells: int) -> float:
    """Images per second over ``cells`` (quantize + full pass) after one warm-up cell."""
    engine.correct(engine.quantized(names, spec, vector, 1.0), split)
    sync(engine.device)
    t0 = time.perf_counter()
    for i in range(cells):
        engine.correct(engine.quantized(names, spec, vector, 0.5 + 0.25 * i), split)
    sync(engine.device)
    return len(split) * cells / (time.perf_counter() - t0)


def measure(timm_name: str, n: int, batch: int, cells: int, device: torch.device) -> dict:
    model = build_vit(ArchSpec(timm_name, timm_name, {}), 100, seed=0)
    pre = Preprocess.from_model(model)
    names = DEFAULT_POLICY.select_model(model)
    gen = torch.Generator().manual_seed(0)
    split = load_split(torch.randint(0, 256, (n, 3, pre.img_size, pre.img_size), dtype=torch.uint8, generator=gen),
                       torch.randint(0, 100, (n,), generator=gen), device)
    engine = Engine(model, pre, device, batch)
    vector = {k: 0.01 * torch.randn_like(engine.base[k]) for k in names}
    spec = QuantSpec(bits=3)
    bf16 = cell_rate(engine, names, spec, vector, split, cells)
    engine.precision = "fp32"  # the fp32 baseline: same engine, no autocast
    fp32 = cell_rate(engine, names, spec, vector, split, cells)
    return {"arch": timm_name, "bf16": bf16, "fp32": fp32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=PAPER_ARCHS)
    p.add_argument("--n", type=int, default=8192, help="images in the resident split")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cells", type=int, default=3, help="timed cells per precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"hardware: {hw}; torch {torch.__version__}; {args.n} random 224-px images, batch {args.batch}, "
          f"{args.cells} cells per precision, 3-bit per-channel fake quantization per cell")
    print(f"{'arch':28s} {'bf16 img/s':>12s} {'fp32 img/s':>12s} {'bf16/fp32':>10s}")
    for name in args.archs:
        r = measure(name, args.n, args.batch, args.cells, device)
        print(f"{r['arch']:28s} {r['bf16']:12.0f} {r['fp32']:12.0f} {r['bf16'] / r['fp32']:10.2f}")
        del r
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
