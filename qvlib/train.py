"""One training run: fine-tuning (FT or QAT) of the block linear weights, or pretraining of the demo
backbone. Resumable from an atomic state file, deterministic on the CPU for a given seed.

Data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen; the state file holds the trained tensors, the optimizer and
scheduler state, the RNG state and the loss curve.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data.base import ArrayDataset, Preprocess
from .data.augment import AugmentedDataset, augmented
from .quant import QuantSpec, fake_quant_ste
# TrainConfig is torch-free (the workflow's DAG checks every job's settings without torch): it lives in
# qvlib.sections and is re-exported here.
from .sections import LAST_BATCH, LR_SCHEDULES, TrainConfig, micro_batches_per_epoch  # noqa: F401
from .fileio import atomic_write, write_json
from .vectors import WeightVector
from .precision import autocast_for
from .vocab import Mode

log = logging.getLogger("qvlib.train")


def batch_indices(n: int, batch_size: int, seed: int, step: int, keep_last: bool = False) -> torch.Tensor:
    """Example indices of micro-batch number ``step``: epochs are seeded permutations; an epoch's
    leftover examples are dropped, or (``keep_last``) form its last, smaller micro-batch."""
    size = min(batch_size, n)
    per_epoch = micro_batches_per_epoch(n, size, keep_last)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * size:(pos + 1) * size]


class PlannedBatches(Sampler[list]):
    """Batch sampler for a DataLoader that yields the planned batches from micro-step ``start`` on;
    ``keyed``: each item is ``(index, step)``, for datasets that draw per-step augmentation."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, keyed: bool = False,
                 keep_last: bool = False):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.keyed, self.keep_last = keyed, keep_last

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.stop):
            idx = batch_indices(self.n, self.batch_size, self.seed, step, self.keep_last).tolist()
            yield [(i, step) for i in idx] if self.keyed else idx

    def __len__(self) -> int:
        return self.stop - self.start


def batches(ds: Dataset, cfg: TrainConfig, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    keep_last = cfg.last_batch == "keep"
    if isinstance(ds, ArrayDataset):  # in memory: index directly, no workers
        for step in range(start, stop):
            idx = batch_indices(len(ds), cfg.batch_size, cfg.seed, step, keep_last)
            yield ds.images[idx], ds.labels[idx]
        return
    keyed = isinstance(ds, AugmentedDataset)
    loader = DataLoader(ds, batch_sampler=PlannedBatches(len(ds), cfg.batch_size, cfg.seed, start, stop, keyed, keep_last),
                        num_workers=cfg.num_workers, persistent_workers=False)
    for x, y in loader:
        yield x, torch.as_tensor(y)


def warmup_cosine(warmup: int, total: int, lagged: bool = False):
    """The lr factor of optimizer step ``step``: linear warm-up over ``warmup`` steps, then a cosine to 0
    at ``total``. ``lagged``: the schedule advances after each step (the authors' code), so step 0
    runs at the peak lr (factor 1) and step k at the aligned factor of step k - 1."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if lagged:
        return lambda step: 1.0 if step == 0 else factor(step - 1)
    return factor


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantized_forward(model: torch.nn.Module, names: list[str], spec: QuantSpec, x: torch.Tensor) -> torch.Tensor:
    """Forward pass with every named weight replaced by its STE fake-quantized version."""
    params = dict(model.named_parameters())
    replaced = {n: fake_quant_ste(params[n], spec) for n in names}
    return torch.func.functional_call(model, replaced, (x,), strict=False)


@dataclass
class RunResult:
    steps: int
    losses: list[float]
    wall_s: float
    images_per_s: float
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


def train(
    model: torch.nn.Module,
    train_ds: Dataset,
    preprocess: Preprocess,
    cfg: TrainConfig,
    mode: str,
    output: str | Path,
    metadata: Mapping[str, object],
    spec: QuantSpec | None = None,
    state_path: str | Path | None = None,
    device: str | None = None,
    state_fn: Callable[[torch.nn.Module], Mapping[str, torch.Tensor]] | None = None,
    progress: bool = True,
    quantized: list[str] | None = None,
) -> RunResult:
    """Train the parameters of ``model`` that require grad; write the final weights to ``output``.

    ``mode`` 'qat' fake-quantizes the ``quantized`` parameters (default: every trained one) in the
    forward pass (straight-through gradient); with scope all the trained set is larger than the
    quantized one. Writes ``output`` (safetensors: ``model.state_dict()``, or ``state_fn(model)``) and ``output``'s metrics JSON only at the end; ``state_path`` holds the
    resumable state meanwhile and is removed on success.
    """
    if mode not in set(Mode):
        raise ValueError(f"mode must be one of {', '.join(Mode)}, got {mode!r}")
    mode = Mode(mode)
    if mode == Mode.QAT and spec is None:
        raise ValueError("mode 'qat' needs a QuantSpec")
    from tqdm.auto import tqdm

    if cfg.augment:
        train_ds = augmented(train_ds, preprocess, cfg.seed)
    dev = pick_device(device)
    model.to(dev)
    model.train()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError("no parameter requires grad: nothing to train")
    quantized = trained if quantized is None else list(quantized)
    frozen = [n for n in quantized if n not in trained]
    if mode == Mode.QAT and frozen:
        raise ValueError(f"QAT would fake-quantize {frozen[0]!r}, which does not train")
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.total_steps(len(train_ds))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, total, cfg.lr_schedule == "lagged"))
    losses: list[float] = []
    start = 0
    torch.manual_seed(cfg.seed)
    state_path = Path(state_path) if state_path else Path(str(output) + ".state.pt")
    if state_path.exists():
        start, losses = _load_state(state_path, model, opt, sched, trained)
        log.info("resuming %s from step %d of %d (%s)", output, start, total, state_path)

    autocast = autocast_for(dev, cfg.precision)
    accum = cfg.grad_accum
    t0 = time.perf_counter()
    seen = 0
    bar = tqdm(total=total, initial=start, desc=f"{metadata.get('task', '?')}/{mode}", disable=not progress, unit="step")
    micro = batches(train_ds, cfg, start * accum, total * accum)
    try:
        for step in range(start, total):
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(accum):
                x, y = next(micro)
                x = preprocess.normalize(x.to(dev, non_blocking=True))
                y = y.to(dev, non_blocking=True)
                with autocast:
                    logits = quantized_forward(model, quantized, spec, x) if mode == Mode.QAT else model(x)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y) / accum
                loss.backward()
                step_loss += float(loss.detach())
                seen += len(y)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"non-finite loss ({step_loss}) at step {step + 1} of {total}; nothing was written")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(step_loss)
            done = step + 1
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:.0f}")
            if done % cfg.log_every == 0 or done == total:
                log.info("%s/%s step %d/%d loss %.4f lr %.3g %.0f img/s", metadata.get("task", "?"), mode, done, total,
                         step_loss, sched.get_last_lr()[0], rate)
            if done % cfg.checkpoint_every == 0 and done < total:
                _save_state(state_path, done, model, opt, sched, trained, losses)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    result = RunResult(steps=total, losses=losses, wall_s=wall, images_per_s=seen / max(wall, 1e-9), resumed_from=start)
    model.eval()
    state = state_fn(model) if state_fn is not None else model.state_dict()
    meta = {**metadata, "mode": str(mode), "train": asdict(cfg), "quant": spec.to_json() if spec else ""}
    WeightVector({k: v.detach().float().cpu() for k, v in state.items()}).save(output, meta)
    write_json(metrics_path(output), {"mode": str(mode), "steps": total, "resumed_from": start, "loss": losses,
                                      "final_loss": losses[-1] if losses else None, "images_per_s": result.images_per_s,
                                      "wall_s": wall, "device": str(dev), "threads": torch.get_num_threads(), **metadata})
    if state_path.exists():
        state_path.unlink()
    return result


def metrics_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + ".metrics.json")


def _save_state(path: Path, step: int, model, opt, sched, trained, losses) -> None:
    params = dict(model.named_parameters())
    blob = {
        "step": step,
        "params": {n: params[n].detach().cpu() for n in trained},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _load_state(path: Path, model, opt, sched, trained) -> tuple[int, list[float]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file: torch raises many error types here
        raise ValueError(f"resume state {path} is unreadable ({type(err).__name__}); delete it to start over") from None
    if sorted(blob["params"]) != sorted(trained):
        raise ValueError(f"resume state {path} trains other tensors than this run; delete it to start over")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in trained:
            params[n].copy_(blob["params"][n])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"])
    return int(blob["step"]), blob["losses"].tolist()
