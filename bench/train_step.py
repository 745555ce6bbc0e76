"""Images/s of an FT training step and a QAT training step of the same model, measured in one run.

    python bench/train_step.py                                  # the demo ViT on the CPU
    python bench/train_step.py --timm vit_base_patch16_224 --img 224 --batch 128 --device cuda

Prints both rates and QAT/FT (goal >= 0.9). QAT fake-quantizes every block linear weight once per
step (straight-through) and swaps them in with torch.func.functional_call.
"""

import argparse
import platform
import time

import torch

from qvlib.models import ArchSpec, build_vit, freeze_except
from qvlib.quant import DEFAULT_POLICY, QuantSpec
from qvlib.train import quantized_forward


def rate(model, names, spec, x, y, qat: bool, steps: int, warmup: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else torch.autocast("cpu", enabled=False)
    for i in range(warmup + steps):
        if i == warmup:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast:
            logits = quantized_forward(model, names, spec, x) if qat else model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return steps * len(y) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", default="vit_tiny_patch16_224")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=None)
    p.add_argument("--embed", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {"img_size": args.img}
    demo = args.timm == "vit_tiny_patch16_224" and args.img == 32
    defaults = {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3} if demo else {}
    for key, value in (("patch_size", args.patch), ("embed_dim", args.embed), ("depth", args.depth), ("num_heads", args.heads)):
        if value is not None:
            defaults[key] = value
    overrides.update(defaults)
    model = build_vit(ArchSpec("bench", args.timm, overrides), num_classes=10).to(args.device)
    names = freeze_except(model, DEFAULT_POLICY)
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    spec = QuantSpec(bits=args.bits)
    ft = rate(model, names, spec, x, y, False, args.steps, args.warmup)
    qat = rate(model, names, spec, x, y, True, args.steps, args.warmup)
    ft2 = rate(model, names, spec, x, y, False, args.steps, args.warmup)  # FT again: drift check
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"hardware: {hw}; torch {torch.__version__}")
    print(f"model: {args.timm} {overrides}, batch {args.batch}, {args.bits}-bit QAT")
    print(f"FT  step: {max(ft, ft2):9.1f} img/s  (two runs: {ft:.1f}, {ft2:.1f})")
    print(f"QAT step: {qat:9.1f} img/s")
    print(f"ratio QAT/FT: {qat / max(ft, ft2):.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
