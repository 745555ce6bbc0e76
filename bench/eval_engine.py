"""The evaluation engine against a naive loop and against the model's pure forward, in one run.

    python bench/eval_engine.py                       # the demo ViT on the CPU, random weights
    python bench/eval_engine.py --timm vit_base_patch16_224 --img 224 --n 2048 --batch 256 --device cuda
    python bench/eval_engine.py --results results/default/vit_demo    # + adaptive lambda search vs dense grid

Three ways over the same (donor, lambda) cells:
1. naive: per cell, load the receiver and the vector from files, patch, fake-quantize, build the
   model, and run a DataLoader over PIL images with per-image transforms, fp32;
2. engine: resident preprocessed uint8 split, patched weights computed on the device, one
   fake-quant pass per cell, large batches, inference_mode (bf16 autocast on CUDA);
3. ceiling: the model's pure forward on resident random tensors of the same shape.
Prints images/s of each and the ratios (goals: engine >= 3 x naive, engine >= 0.9 x ceiling).
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from qvlib.data.base import Preprocess
from qvlib.evaluate import Engine, dense_grid, load_split, search_lambda
from qvlib.models import ArchSpec, build_vit
from qvlib.quant import DEFAULT_POLICY, QuantSpec, fake_quant_state
from qvlib.vectors import WeightVector, patch


class PilImages(Dataset):
    def __init__(self, images, labels, transform, pre):
        self.images, self.labels, self.transform, self.pre = images, labels, transform, pre

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        pil = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        return self.pre.normalize(self.transform(pil)[None])[0], int(self.labels[i])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive(arch, num_classes, ckpt_path, vec_path, cells, images, labels, pre, spec, device, batch):
    transform = pre.pil_transform()
    correct = 0
    for lam in cells:
        state = patch(WeightVector.load(ckpt_path), [(lam, WeightVector.load(vec_path))])
        model = build_vit(arch, num_classes)
        model.load_state_dict(fake_quant_state(state, spec))
        model.to(device).eval()
        loader = DataLoader(PilImages(images, labels, transform, pre), batch_size=batch)
        with torch.no_grad():
            for x, y in loader:
                correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", default="vit_tiny_patch16_224")
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--n", type=int, default=1000, help="images per pass")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--cells", type=int, default=4, help="lambdas evaluated per way")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", type=Path, default=None, help="a finished run's results/<config>/<arch> folder")
    p.add_argument("--pairs", type=int, default=12, help="how many (receiver, donor) pairs the search comparison uses")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {"img_size": args.img}
    if args.timm == "vit_tiny_patch16_224" and args.img == 32:
        overrides.update(patch_size=8, embed_dim=96, depth=4, num_heads=3)
    arch = ArchSpec("bench", args.timm, overrides)
    model = build_vit(arch, 10, seed=0)
    pre = Preprocess.from_model(model)
    spec = QuantSpec(bits=args.bits)
    names = DEFAULT_POLICY.select_model(model)
    gen = torch.Generator().manual_seed(0)
    rho = WeightVector({n: 0.01 * torch.randn(model.state_dict()[n].shape, generator=gen) for n in names})
    images = torch.randint(0, 256, (args.n, 3, args.img, args.img), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (args.n,), generator=gen)
    lambdas = [0.5 * (i + 1) for i in range(args.cells)]
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"hardware: {hw}; torch {torch.__version__}; model {args.timm} {overrides}; {args.n} images x {args.cells} cells")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path, vec_path = Path(tmp) / "ft.safetensors", Path(tmp) / "rho.safetensors"
        WeightVector(model.state_dict()).save(ckpt_path)
        rho.save(vec_path)
        sync(device)
        t0 = time.perf_counter()
        naive(arch, 10, ckpt_path, vec_path, lambdas, images, labels, pre, spec, device, min(args.batch, 64))
        sync(device)
        naive_rate = args.n * len(lambdas) / (time.perf_counter() - t0)

    engine = Engine(model, pre, device, args.batch)
    split = load_split(images, labels, device)
    vec = {n: t.to(device) for n, t in rho.items()}
    engine.correct(engine.quantized(names, spec, vec, 1.0), split)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for lam in lambdas:
        engine.correct(engine.quantized(names, spec, vec, lam), split)
    sync(device)
    engine_rate = args.n * len(lambdas) / (time.perf_counter() - t0)

    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    autocast = engine.autocast()
    with torch.inference_mode(), autocast:
        model(x)
        sync(device)
        t0 = time.perf_counter()
        done = 0
        for _ in lambdas:
            for i in range(0, args.n, args.batch):
                model(x[: min(args.batch, args.n - i)])
                done += min(args.batch, args.n - i)
        sync(device)
    ceiling = done / (time.perf_counter() - t0)
    print(f"naive   {naive_rate:10.1f} img/s")
    print(f"engine  {engine_rate:10.1f} img/s   engine/naive = {engine_rate / naive_rate:.2f} (goal >= 3)")
    print(f"ceiling {ceiling:10.1f} img/s   engine/ceiling = {engine_rate / ceiling:.2f} (goal >= 0.9)")
    if args.results:
        search_report(args.results, device, args.pairs)


def search_report(folder: Path, device, max_pairs: int):
    """Adaptive search against the dense 21-point grid on ``max_pairs`` real pairs of a run, spread
    evenly over the grid."""
    from qvlib.config import Config
    from qvlib.data.cache import read_split_cache
    from qvlib.pipeline import load_engine
    from run_store import RunStore

    cfg = Config.load(folder.parent / "config.yaml")  # the run's effective config
    arch = folder.name
    run = RunStore(folder, cfg)  # its models, vectors and cached splits in the store; cfg.seed: the first replicate
    tasks = cfg.task_names
    worst, passes, pairs = 0.0, [], 0
    every = [(r, d) for r in tasks for d in tasks if r != d]
    todo = every[:: max(1, len(every) // max_pairs)][:max_pairs]
    for receiver in sorted({r for r, _ in todo}):
        engine, _ = load_engine(cfg, arch, run.ft(receiver, cfg.seed), str(device))
        images, labels, _ = read_split_cache(run.split(receiver, "test"))
        split = load_split(images, labels, engine.device)
        names = cfg.policy.select_model(engine.model)
        for donor in [d for r, d in todo if r == receiver]:
            vec = {n: t.to(engine.device) for n, t in WeightVector.load(run.vector(donor, cfg.seed, cfg.quant.tag)).items()}
            score = lambda lam: engine.correct(engine.quantized(names, cfg.quant, vec, lam), split)
            dense = {lam: score(lam) for lam in dense_grid()}
            found = search_lambda(score)
            gap = 100.0 * (max(dense.values()) - dense[found.best_lambda]) / len(split)
            worst = max(worst, gap)
            passes.append(len(found.evaluated))
            pairs += 1
    print(f"adaptive lambda search over {pairs} pairs: mean {sum(passes) / len(passes):.1f} passes (max {max(passes)}) "
          f"vs 21 for the dense grid = {sum(passes) / len(passes) / 21:.2f}; largest accuracy shortfall {worst:.2f} points "
          f"(goals: <= 1/3 of the passes, within 0.1 points)")


if __name__ == "__main__":
    main()
