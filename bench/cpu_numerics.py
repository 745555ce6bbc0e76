"""Why the same config and seed give other numbers on another CPU: the demo ViT trained a few hundred
steps under each kernel path this machine can take, compared with its own native path.

    .venv/bin/python bench/cpu_numerics.py                 # 300 steps on generated shapes, random init
    .venv/bin/python bench/cpu_numerics.py --backbone backbones/vit_demo-seed0-e2e3d7305f22.safetensors --steps 600
    # (the default's seed-0 backbone, which make run copies into its store folder; or a run's own:
    #  results/store/backbone/vit_demo/seed0/<key>/backbone.safetensors, its key in results/<name>/store.json)

torch picks its CPU kernels by instruction set (ATen: AVX512 / AVX2 / a generic build; oneDNN and MKL
likewise), and kernels of different width sum in a different order. Each variant runs in a fresh
process with the environment variables that cap those paths (what a CPU without AVX-512 would run,
or the slow portable paths), trains the same seeded model on the same seeded batches, and reports
against the native run: the largest weight difference, the share of 2-bit per-channel codes of the
block linear weights that differ (what PTQ and the transfer cells see), whether the final loss agrees
to 6 digits, and its wall time as a ratio of the native run's (measured in the same invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BITS = 2  # the demo's bit-width: QAT fake-quantizes to it, and codes are compared at it
# name -> environment that caps the kernel paths (read once, when torch, MKL and oneDNN start)
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
VARIANTS = {
    "native": {},
    "avx2": AVX2,  # what a CPU without AVX-512 runs
    "portable": PORTABLE,
    "portable+avx2": {**AVX2, **PORTABLE},  # the portable paths must not care about the cap
}


def child(steps: int, mode: str, backbone: Path | None, out: Path) -> None:
    """Train and save; runs inside a variant's environment. ``ft``: the block linears, lr 1e-4; ``qat``: the
    same with 2-bit per-channel fake quantization (straight-through); ``pretrain``: every parameter, lr 1e-3."""
    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from qvlib.data.synthetic import generate
    from qvlib.models import ArchSpec, build_vit, freeze_except, load_backbone
    from qvlib.quant import QuantSpec
    from qvlib.train import quantized_forward

    torch.set_num_threads(1)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    arch = ArchSpec.from_config("vit_demo", cfg["archs"]["vit_demo"])
    images, labels = generate("shapes", 4000, seed=0)
    images = images.float() / 127.5 - 1.0
    model = build_vit(arch, num_classes=int(labels.max()) + 1, seed=0)
    if backbone:
        load_backbone(model, load_file(str(backbone)), arch.name)
    trained = freeze_except(model)
    if mode == "pretrain":
        for p in model.parameters():
            p.requires_grad_(True)
    lr = 1e-3 if mode == "pretrain" else 1e-4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    spec = QuantSpec(bits=BITS)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=gen)
        x, y = images[idx], labels[idx]
        logits = quantized_forward(model, trained, spec, x) if mode == "qat" else model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if n in trained}
    save_file(state, str(out), metadata={"loss": f"{loss.item():.6f}", "wall_s": str(wall),
                                          "kernels": torch.backends.cpu.get_cpu_capability()})


def compare(native: Path, other: Path) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from qvlib.quant import QuantSpec, quantize

    spec = QuantSpec(bits=BITS, granularity="channel")
    a, b = load_file(str(native)), load_file(str(other))
    max_diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    flips = sum(int((quantize(a[n], spec)[0] != quantize(b[n], spec)[0]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    with safe_open(str(other), "pt") as f:
        meta = f.metadata()
    return {"max_abs_diff": max_diff, "codes_differ": flips / total, "loss": meta["loss"],
            "wall_s": float(meta["wall_s"]), "kernels": meta["kernels"],
            "identical": all(torch.equal(a[n], b[n]) for n in a)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backbone", type=Path, help="start from this pretrained backbone (default: a seeded random init)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="kernel paths to run (native always runs: the others are compared with it)")
    parser.add_argument("--modes", nargs="+", default=["ft", "qat"], choices=["ft", "qat", "pretrain"])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ft", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.mode, args.backbone, args.child)
        return 0
    from qvlib.provenance import machine_line

    start = args.backbone or "a seeded random init"
    print(f"machine: {machine_line()}; load average at start {os.getloadavg()[0]:.2f}; {args.steps} steps of the demo "
          f"ViT from {start} on seeded batches of 4,000 generated shapes, batch 64, 1 thread; ft/qat train the block linears "
          "(lr 1e-4), pretrain every parameter (lr 1e-3); weights and codes compared over the block linears")
    print("| mode | kernels | ATen path | identical to native | max abs weight diff | 2-bit codes that differ | final loss | time / native |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            extra = ["--backbone", str(args.backbone)] if args.backbone else []
            for name in ["native", *[v for v in args.variants if v != "native"]]:
                env = VARIANTS[name]
                files[name] = Path(tmp) / f"{len(files)}.safetensors"
                subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--mode", mode, *extra,
                                "--child", str(files[name])], env={**os.environ, **env}, check=True)
            rows = {name: compare(files["native"], path) for name, path in files.items()}
            same = (compare(files["portable"], files["portable+avx2"])["identical"]
                    if {"portable", "portable+avx2"} <= set(files) else None)
        base = rows["native"]["wall_s"]
        for name, r in rows.items():
            print(f"| {mode} | {name} | {r['kernels']} | {'yes' if r['identical'] else 'no'} | {r['max_abs_diff']:.2e} | "
                  f"{100 * r['codes_differ']:.3f}% | {r['loss']} | {r['wall_s'] / base:.2f} |")
        results[mode] = {"variants": rows, "portable_runs_identical": same}
    for mode, r in results.items():
        if r["portable_runs_identical"] is not None:
            print(f"{mode}: the two portable runs are bit-identical: {'yes' if r['portable_runs_identical'] else 'no'}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
