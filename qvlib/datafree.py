"""Choosing lambda with no data of the receiver: criteria computed from its weights alone, or from
inputs a user has without it: proxy images (the donor's own training images, other tasks' images, a
folder of any images) or noise. Each criterion scores every candidate lambda, lower is better; the
chosen lambda is the lowest score's (ties: the lambda nearest 1, then the smaller).

The input-based criteria compare the patched, quantized receiver with the full-precision receiver
on the same inputs (``outputs``: KL of the class probabilities, ``agreement``: top-1 disagreement,
``features``: relative error of the pre-logit features); which inputs they see is the caller's
choice, and :func:`proxy_tasks` / :func:`task_images` never hand over the receiver's own task.
docs/zero-shot-lambda.md measures which rule comes closest to the lambda chosen on labelled calib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .quant import DEFAULT_POLICY, QuantPolicy, QuantSpec, fake_quant, quantized_patch
from .registry import Registry
from .sections import Preprocess, source_parts, split_rule

LAMBDA_CRITERIA: Registry = Registry("data-free lambda criterion")


@LAMBDA_CRITERIA.register("weights")
def weight_error(receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], spec: QuantSpec,
                 lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY, **_) -> dict[float, float]:
    """Mean over the quantized layers of ``||Q(theta + lam * rho) - theta||^2 / ||theta||^2``: how far
    the patched, quantized weights land from the receiver's own full-precision weights. It rewards a
    vector that moves the weights onto the quantization grid without moving them elsewhere."""
    names = policy.select(vector)
    if not names:
        raise ValueError(f"the vector holds no tensor that the policy quantizes (pattern {policy.pattern!r})")
    scores = {}
    for lam in lambdas:
        errors = []
        for n in names:
            w = receiver[n].double()
            q = fake_quant((w + lam * vector[n].double()).float(), spec).double()
            errors.append(float((q - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30)))
        scores[float(lam)] = sum(errors) / len(errors)
    return scores


def noise_images(n: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal images in the model's normalised input space: inputs with no data behind them."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of noise images must be a positive integer, got {n!r}")
    return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


class _PreLogits(torch.nn.Module):
    """The model's pre-logit features and logits in one pass (timm ViT: forward_features, forward_head)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x):
        feats = self.m.forward_head(self.m.forward_features(x), pre_logits=True)
        return feats, self.m.get_classifier()(feats)


INPUT_MEASURES = ("outputs", "agreement", "features")


@torch.inference_mode()
def input_measures(receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], spec: QuantSpec,
                   lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY, *,
                   model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> dict[float, dict[str, float]]:
    """Per lambda, how far the patched, quantized receiver ``Q(theta + lam * rho)`` lands from the
    full-precision receiver on ``inputs`` (normalised images, no labels), in one forward pass each:
    ``outputs`` mean KL(full precision || patched) of the class probabilities, ``agreement`` the
    share of inputs whose top-1 class differs, ``features`` ``||f_q - f||^2 / ||f||^2`` of the
    pre-logit features pooled over the inputs. Tensors the vector carries but the policy does not
    quantize (scope all) are patched unquantized."""
    names = policy.select(vector)
    device = next(model.parameters()).device
    wrapped = _PreLogits(model)
    base = {n: receiver[n].to(device) for n in vector}
    rho = {n: t.to(device) for n, t in vector.items()}

    def run(params):
        feats, logps = [], []
        for i in range(0, len(inputs), batch_size):
            x = inputs[i:i + batch_size].to(device)
            f, logits = torch.func.functional_call(wrapped, {f"m.{n}": t for n, t in params.items()}, (x,), strict=False)
            feats.append(f.float())
            logps.append(logits.float().log_softmax(dim=1))
        return torch.cat(feats), torch.cat(logps)

    ref_f, ref_p = run(base)
    ref_top = ref_p.argmax(dim=1)
    out = {}
    for lam in lambdas:
        f, logp = run(quantized_patch(base, names, spec, rho, lam))
        out[float(lam)] = {
            "outputs": float(torch.nn.functional.kl_div(logp, ref_p, log_target=True, reduction="batchmean")),
            "agreement": float((logp.argmax(dim=1) != ref_top).float().mean()),
            "features": float((f - ref_f).pow(2).sum() / ref_f.pow(2).sum().clamp(min=1e-30)),
        }
    return out


def _input_criterion(measure: str, doc: str) -> Callable:
    def criterion(receiver, vector, spec, lambdas, policy=DEFAULT_POLICY, *, model, inputs, **_):
        return {lam: m[measure] for lam, m in input_measures(receiver, vector, spec, lambdas, policy, model=model,
                                                             inputs=inputs).items()}

    criterion.__name__, criterion.__doc__ = f"{measure}_criterion", doc
    return LAMBDA_CRITERIA.register(measure)(criterion)


output_divergence = _input_criterion(
    "outputs", "Mean KL divergence from the full-precision receiver's class probabilities to the patched, quantized "
    "receiver's on ``inputs`` (no labels): the lambda whose quantized model behaves most like the model the user fine-tuned.")
top1_disagreement = _input_criterion(
    "agreement", "Share of ``inputs`` whose top-1 class under the patched, quantized receiver differs from the "
    "full-precision receiver's.")
feature_error = _input_criterion(
    "features", "Relative squared error of the patched, quantized receiver's pre-logit features against the "
    "full-precision receiver's on ``inputs``: independent of the (task-specific) head.")

# where the input-based criteria may draw their images from, with no image of the receiver's task
IMAGE_SOURCES = {
    "noise": "standard-normal images in the model's input space (no data at all)",
    "donor": "the donor's own training images (a merged donor: its tasks'), which whoever made the vector has",
    "others": "training images of every task except the receiver's",
    "synth": "images synthesized from the receiver alone (class-conditional inversion of its model)",
}


def proxy_tasks(source: str, receiver: str, donor_tasks: Sequence[str], all_tasks: Sequence[str]) -> list[str]:
    """The tasks whose training images stand in for the receiver's data under ``source`` (empty for
    noise): the donor's own tasks, or every task but the receiver's. The receiver's task is never
    among them: a donor made from it (the self control) has no proxy images, a ValueError."""
    if source not in IMAGE_SOURCES:
        raise ValueError(f"unknown image source {source!r}; known: {', '.join(IMAGE_SOURCES)}")
    if source in ("noise", "synth"):
        return []
    tasks = list(donor_tasks) if source == "donor" else [t for t in all_tasks if t != receiver]
    tasks = [t for t in dict.fromkeys(tasks) if t != receiver]
    if not tasks:
        raise ValueError(f"no task other than the receiver's ({receiver!r}) to draw proxy images from (source {source!r})")
    return tasks


def task_images(tasks: Sequence[str], n: int, train_split: Callable[[str], torch.utils.data.Dataset], *,
                receiver: str, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 training images (fewer where a task holds fewer) drawn evenly (seeded) from ``tasks`` through ``train_split`` (task
    name -> its training Dataset of (image, label)); labels are dropped. ``receiver`` names the task
    whose images a data-free criterion must never see: asking for it is a ValueError, before any
    image is read."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of proxy images must be a positive integer, got {n!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no task to draw proxy images from")
    if receiver in tasks:
        raise ValueError(f"task {receiver!r} is the receiver's: a data-free criterion never sees the receiver's images")
    per = [n // len(tasks) + (i < n % len(tasks)) for i in range(len(tasks))]
    images = []
    for k, (task, m) in enumerate(zip(tasks, per)):
        if m == 0:
            continue
        ds = train_split(task)
        if len(ds) == 0:
            raise ValueError(f"task {task!r} has no training images")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed * 1000 + k))[:m].tolist()
        images += [ds[i][0] for i in idx]
    return torch.stack(images)


def proxy_inputs(source: str, n: int, preprocess: Preprocess, *, receiver: str, donor_tasks: Sequence[str] = (),
                 all_tasks: Sequence[str] = (), train_split: Callable[[str], torch.utils.data.Dataset] | None = None,
                 seed: int = 0, model: torch.nn.Module | None = None) -> torch.Tensor:
    """The model inputs (on the CPU) an input-based criterion sees for one (receiver, donor) under
    ``source`` (:data:`IMAGE_SOURCES`, or several joined by ``+``: ``n`` images of each, together):
    noise, images synthesized from the receiver's ``model`` (:func:`synthesized_images`), or training
    images of :func:`proxy_tasks` read through ``train_split`` (task name -> its training Dataset), each
    brought to the model by the arch's ``preprocess`` (resize, then normalise). The one door through
    which the workflow and the bench hand images to a criterion: the receiver's task is never read."""
    parts = source_parts(source)
    if len(parts) > 1:
        for part in parts:  # every part's tasks checked before any image is read (the self control has no donor images)
            proxy_tasks(part, receiver, donor_tasks, all_tasks)
        return torch.cat([proxy_inputs(part, n, preprocess, receiver=receiver, donor_tasks=donor_tasks, all_tasks=all_tasks,
                                       train_split=train_split, seed=seed, model=model) for part in parts])
    if source == "noise":
        return noise_images(n, preprocess.img_size, seed=seed)
    if source == "synth":
        if model is None:
            raise ValueError("image source 'synth' needs the receiver's model")
        return synthesized_images(model, n, preprocess.img_size, to_model=preprocess.normalize, seed=seed).cpu()
    tasks = proxy_tasks(source, receiver, donor_tasks, all_tasks)
    if train_split is None:
        raise ValueError(f"image source {source!r} needs the tasks' training images (train_split)")
    return preprocess.normalize(preprocess.resize_batch(task_images(tasks, n, train_split, receiver=receiver, seed=seed)))


def synthesized_images(model: torch.nn.Module, n: int, img_size: int, *, to_model: Callable[[torch.Tensor], torch.Tensor],
                       steps: int = 100, lr: float = 0.1, smoothness: float = 0.05, seed: int = 0) -> torch.Tensor:
    """``n`` images made from the classifier alone, with no data (model inversion, class-conditional):
    image ``i`` starts as seeded noise and is optimised for ``steps`` Adam steps towards class
    ``i mod C`` (cross-entropy of ``model``), plus ``smoothness`` x its total variation so that it
    stays image-like. Pixels are a sigmoid of free parameters (values in [0, 255], mapped to the
    model's input by ``to_model``, e.g. ``Preprocess.normalize``), so they never leave the range a
    real image has. The model's weights are not changed; returns the model inputs, detached."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of synthesized images must be a positive integer, got {n!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"the number of synthesis steps must be an integer >= 0, got {steps!r}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, img_size, img_size, generator=gen).mul_(0.5).to(device).requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        frozen = {k: v.detach() for k, v in model.named_parameters()}
        target = None  # image i's class, i mod C: C read off the first step's logits
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            pixels = torch.sigmoid(z)
            logits = torch.func.functional_call(model, frozen, (to_model(255 * pixels),))
            if target is None:
                target = (torch.arange(n) % logits.shape[1]).to(device)
            tv = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean() + (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean()
            loss = torch.nn.functional.cross_entropy(logits.float(), target) + smoothness * tv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return to_model(255 * torch.sigmoid(z)).detach()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def folder_images(folder: str | Path, n: int, transform: Callable, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` images of a folder (searched recursively, seeded choice), each through ``transform``
    (PIL image -> uint8 tensor, e.g. ``Preprocess.pil_transform()``)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    out = []
    for i in sorted(pick):
        try:
            with Image.open(files[i]) as im:
                out.append(transform(im))
        except OSError as err:
            raise ValueError(f"{files[i]} is not a readable image: {err}") from None
    return torch.stack(out)


def choose_lambda(scores: Mapping[float, float], tolerance: float = 0.0) -> float:
    """The lambda of the lowest score; ties go to the lambda nearest 1, then to the smaller. With
    ``tolerance`` t, every lambda whose score is within (1 + t) x the lowest counts as tied (a
    score's noise should not move lambda away from 1). A non-finite score (a criterion that failed
    at that lambda) never wins; all of them non-finite is an error, as is a non-finite lambda."""
    if not scores:
        raise ValueError("no lambda was scored")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"the tolerance must be a finite number >= 0, got {tolerance!r}")
    bad = [lam for lam in scores if not math.isfinite(lam)]
    if bad:
        raise ValueError(f"lambda {bad[0]!r} is not a finite number")
    finite = [lam for lam, score in scores.items() if math.isfinite(score)]
    if not finite:
        raise ValueError(f"every lambda scored a non-finite value ({', '.join(f'{lam:g}' for lam in scores)}): nothing to choose")
    best = min(scores[lam] for lam in finite)
    near = [lam for lam in finite if scores[lam] <= best + tolerance * abs(best)] if tolerance else \
        [lam for lam in finite if scores[lam] == best]
    return min(near, key=lambda lam: (abs(lam - 1.0), lam))


@dataclass(frozen=True)
class Rule:
    """A data-free lambda rule as the config and the tables name it: ``criterion[@source][~tolerance]``,
    e.g. ``weights``, ``outputs`` (on noise, the old rule), ``features@donor`` or ``outputs@others~0.1``."""

    criterion: str
    source: str = "noise"
    tolerance: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Rule":
        LAMBDA_CRITERIA.lookup(str(text).partition("~")[0].partition("@")[0])  # the registry's own message first
        return cls(*split_rule(text))

    @property
    def needs_images(self) -> bool:
        return self.criterion in INPUT_MEASURES

    @property
    def name(self) -> str:
        out = self.criterion + (f"@{self.source}" if self.needs_images and self.source != "noise" else "")
        return out + (f"~{self.tolerance:g}" if self.tolerance else "")


def check_fits(receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of the vector must be in the receiver with the same shape (a ValueError naming it)."""
    for name, t in vector.items():
        if name not in receiver:
            raise ValueError(f"the vector holds tensor {name!r}, which the receiver does not have: "
                             "the vector was made for another model")
        if tuple(receiver[name].shape) != tuple(t.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)} in the vector but {tuple(receiver[name].shape)} "
                             "in the receiver: the vector was made for another model")


def score_lambdas(criterion: str, receiver: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                  spec: QuantSpec, lambdas: Sequence[float], policy: QuantPolicy = DEFAULT_POLICY, **inputs) -> dict[float, float]:
    """Scores of ``lambdas`` (finite numbers) under the named criterion (the input-based ones,
    :data:`INPUT_MEASURES`, also need ``model`` and ``inputs``, at least one normalised image); the
    vector must fit the receiver."""
    fn = LAMBDA_CRITERIA.lookup(criterion)
    if criterion in INPUT_MEASURES and not {"model", "inputs"} <= set(inputs):
        raise ValueError(f"the {criterion} criterion needs the receiver's model and input images")
    if criterion in INPUT_MEASURES and len(inputs["inputs"]) == 0:
        raise ValueError(f"the {criterion} criterion needs at least one input image")
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas:
        raise ValueError("no lambda to score")
    bad = [lam for lam in lambdas if not math.isfinite(lam)]
    if bad:
        raise ValueError(f"lambda {bad[0]!r} is not a finite number")
    check_fits(receiver, vector)
    return fn(receiver, vector, spec, lambdas, policy, **inputs)
