"""Data-free lambda criteria on toy cases whose right lambda is known."""

import pytest
import torch

from qvlib.data.base import ArrayDataset, Preprocess
from qvlib.datafree import (choose_lambda, folder_images, input_measures, noise_images, output_divergence, proxy_inputs,
                            proxy_tasks, score_lambdas, synthesized_images, task_images, weight_error)
from qvlib.models import build_vit
from qvlib.quant import QuantPolicy, QuantSpec, fake_quant

POLICY = QuantPolicy(pattern=r"^w$")


def test_weight_error_by_hand():
    # 2 bits (qmax 1): theta = [3, 1.4] quantizes to [3, 0] (error 1.96 / 10.96); with rho = [-1.6, 0]
    # lambda 0.5 gives [2.2, 1.4] -> scale 2.2 -> [2.2, 2.2] (error 1.28 / 10.96); lambda 1 gives
    # [1.4, 1.4] -> [1.4, 1.4] (error 2.56 / 10.96)
    theta, rho = {"w": torch.tensor([[3.0, 1.4]])}, {"w": torch.tensor([[-1.6, 0.0]])}
    scores = weight_error(theta, rho, QuantSpec(bits=2), [0.0, 0.5, 1.0], POLICY)
    assert scores == pytest.approx({0.0: 1.96 / 10.96, 0.5: 1.28 / 10.96, 1.0: 2.56 / 10.96})
    assert choose_lambda(scores) == 0.5


def test_choose_lambda_ties_prefer_one_then_smaller():
    assert choose_lambda({0.5: 1.0, 1.0: 1.0, 1.5: 1.0}) == 1.0
    assert choose_lambda({0.5: 2.0, 1.5: 2.0}) == 0.5
    with pytest.raises(ValueError, match="no lambda"):
        choose_lambda({})


def _on_grid_model(tiny_arch, spec, policy):
    """A tiny ViT whose quantized weights are moved onto their own grid: (model, its tensors, the quantized names)."""
    model = build_vit(tiny_arch, 5, seed=0).eval()
    names = policy.select_model(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.copy_(fake_quant(p, spec))
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}, names


def test_outputs_criterion_prefers_the_lambda_that_restores_the_receiver(tiny_arch):
    spec = QuantSpec(bits=2)
    policy = QuantPolicy()
    # a receiver whose quantized weights are its own weights (already on the grid), and a vector that
    # pushes them off it: lambda = 0 reproduces the receiver exactly, any other lambda does not
    model, receiver, names = _on_grid_model(tiny_arch, spec, policy)
    g = torch.Generator().manual_seed(1)
    rho = {n: 0.5 * torch.randn(receiver[n].shape, generator=g) * receiver[n].abs().max() for n in names}
    inputs = noise_images(16, 16, seed=0)
    scores = output_divergence(receiver, rho, spec, [0.0, 0.5, 1.0], policy, model=model, inputs=inputs)
    assert scores[0.0] == pytest.approx(0.0, abs=1e-6) and min(scores[0.5], scores[1.0]) > 1e-4
    assert choose_lambda(scores) == 0.0
    assert score_lambdas("weights", receiver, rho, spec, [0.0, 1.0], policy)[0.0] == pytest.approx(0.0, abs=1e-12)


def test_errors():
    theta = {"w": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="unknown data-free lambda criterion 'psychic'; known: weights, outputs, agreement, features"):
        score_lambdas("psychic", theta, theta, QuantSpec(bits=2), [1.0], POLICY)
    with pytest.raises(ValueError, match="needs the receiver's model"):
        score_lambdas("outputs", theta, theta, QuantSpec(bits=2), [1.0], POLICY)
    with pytest.raises(ValueError, match="no tensor that the policy quantizes"):
        weight_error(theta, {"b": torch.ones(2)}, QuantSpec(bits=2), [1.0], POLICY)


# ---------------------------------------------------------------- input-based criteria on proxy images
def _on_grid_receiver(tiny_arch, spec):
    """A tiny ViT whose quantized weights are already on their own 2-bit grid (values -s, 0, s per
    channel), and a vector that moves some zero weights by 0.8 s: lambda 0.25 moves them 0.2 s, which
    rounds back to the receiver exactly; lambda 1 and 2 land a whole step (or more) away."""
    policy = QuantPolicy()
    model, receiver, names = _on_grid_model(tiny_arch, spec, policy)
    g = torch.Generator().manual_seed(1)
    rho = {}
    for n in names:
        w = receiver[n]
        scale = w.abs().amax(dim=1, keepdim=True)
        zero = (w == 0) & (torch.rand(w.shape, generator=g) < 0.5)
        sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
        rho[n] = torch.where(zero, 0.8 * scale * sign, torch.zeros_like(w))
    return model, receiver, rho, policy


@pytest.mark.parametrize("criterion", ["outputs", "agreement", "features"])
def test_input_criteria_find_the_lambda_that_restores_the_receiver(tiny_arch, criterion):
    spec = QuantSpec(bits=2)
    model, receiver, rho, policy = _on_grid_receiver(tiny_arch, spec)
    inputs = noise_images(32, 16, seed=0)
    scores = score_lambdas(criterion, receiver, rho, spec, [0.25, 1.0, 2.0], policy, model=model, inputs=inputs)
    assert scores[0.25] == pytest.approx(0.0, abs=1e-6)
    assert scores[2.0] > 0  # two steps away: the quantized model differs on these inputs
    assert choose_lambda(scores) == 0.25
    # where every lambda restores it (a vector too small to move any weight a step), the tie goes to 1
    small = {n: 0.1 * t for n, t in rho.items()}
    tied = score_lambdas(criterion, receiver, small, spec, [0.5, 1.0, 1.5], policy, model=model, inputs=inputs)
    assert max(tied.values()) == pytest.approx(0.0, abs=1e-6) and choose_lambda(tied) == 1.0


def test_input_measures_by_hand(tiny_arch):
    """The three measures of one pass against a direct computation."""
    spec = QuantSpec(bits=2)
    model, receiver, rho, policy = _on_grid_receiver(tiny_arch, spec)
    x = noise_images(8, 16, seed=3)
    got = input_measures(receiver, rho, spec, [1.0], policy, model=model, inputs=x, batch_size=3)[1.0]
    with torch.no_grad():
        ref_f = model.forward_head(model.forward_features(x), pre_logits=True)
        ref = model(x).log_softmax(1)
        state = dict(model.state_dict())
        for n in policy.select(rho):
            model.get_parameter(n).copy_(fake_quant(receiver[n] + rho[n], spec))
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        logp = model(x).log_softmax(1)
        model.load_state_dict(state)
    assert got["outputs"] == pytest.approx(float((ref.exp() * (ref - logp)).sum(1).mean()), rel=1e-4, abs=1e-7)
    assert got["agreement"] == pytest.approx(float((ref.argmax(1) != logp.argmax(1)).float().mean()))
    assert got["features"] == pytest.approx(float((f - ref_f).pow(2).sum() / ref_f.pow(2).sum()), rel=1e-4)


# ---------------------------------------------------------------- no image of the receiver's task
def test_proxy_tasks_never_name_the_receiver():
    tasks = ["shapes", "glyphs", "dots"]
    assert proxy_tasks("donor", "shapes", ["glyphs"], tasks) == ["glyphs"]
    assert proxy_tasks("others", "shapes", ["glyphs"], tasks) == ["glyphs", "dots"]
    assert proxy_tasks("donor", "shapes", ["glyphs", "shapes", "dots"], tasks) == ["glyphs", "dots"]  # a merged donor's tasks
    assert proxy_tasks("noise", "shapes", [], tasks) == []
    with pytest.raises(ValueError, match="no task other than the receiver's"):
        proxy_tasks("donor", "shapes", ["shapes"], tasks)  # the self control has no proxy images
    with pytest.raises(ValueError, match="unknown image source"):
        proxy_tasks("test", "shapes", [], tasks)


class _Recorder:
    """Training splits of fake tasks whose images are filled with the task's index; the receiver's
    split raises if it is ever read."""

    def __init__(self, tasks, receiver):
        self.tasks, self.receiver, self.read = tasks, receiver, []

    def __call__(self, task):
        if task == self.receiver:
            raise AssertionError("the receiver's images were read")
        self.read.append(task)
        k = self.tasks.index(task)
        return ArrayDataset(torch.full((20, 3, 16, 16), k, dtype=torch.uint8), torch.zeros(20, dtype=torch.long))


# normalise to the pixel values themselves: a task image filled with k reaches the model as k
IDENTITY_PIXELS = Preprocess(img_size=16, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


@pytest.mark.parametrize("source", ["donor", "others", "noise", "synth"])
def test_proxy_inputs_cannot_see_the_receivers_task(source, tiny_arch):
    tasks = ["shapes", "glyphs", "dots", "mnist5k"]
    for receiver in tasks:
        for donor_tasks in ([t for t in tasks if t != receiver][:1], [t for t in tasks if t != receiver]):
            split = _Recorder(tasks, receiver)
            x = proxy_inputs(source, 12, IDENTITY_PIXELS, receiver=receiver, donor_tasks=donor_tasks, all_tasks=tasks,
                             train_split=split, seed=0, model=build_vit(tiny_arch, 4, seed=0).eval())
            assert len(x) == 12 and receiver not in split.read
            if source == "synth":  # made from the model alone: no task's images are read at all
                assert split.read == []
            elif source != "noise":
                assert set(x.unique().long().tolist()) <= {tasks.index(t) for t in tasks if t != receiver}
                assert set(split.read) == set(donor_tasks if source == "donor" else [t for t in tasks if t != receiver])


def test_joined_sources_are_each_source_in_turn_and_still_never_the_receiver():
    tasks = ["shapes", "glyphs", "dots", "mnist5k"]
    split = _Recorder(tasks, "shapes")
    x = proxy_inputs("others+donor", 6, IDENTITY_PIXELS, receiver="shapes", donor_tasks=["dots"], all_tasks=tasks,
                     train_split=split, seed=0)
    assert x.shape == (12, 3, 16, 16) and "shapes" not in split.read
    assert set(x[:6].unique().long().tolist()) == {1, 2, 3}  # others: every task but the receiver's, 2 images each
    assert x[6:].unique().long().tolist() == [2]  # then the donor's own task
    assert torch.equal(x[:6], proxy_inputs("others", 6, IDENTITY_PIXELS, receiver="shapes", all_tasks=tasks, train_split=split))
    with_noise = proxy_inputs("donor+noise", 4, IDENTITY_PIXELS, receiver="shapes", donor_tasks=["dots"], train_split=split, seed=3)
    assert torch.equal(with_noise[4:], noise_images(4, 16, seed=3))
    read = list(split.read)
    with pytest.raises(ValueError, match="no task other than the receiver's"):  # the self control has no donor images
        proxy_inputs("others+donor", 6, IDENTITY_PIXELS, receiver="shapes", donor_tasks=["shapes"], all_tasks=tasks, train_split=split)
    assert split.read == read  # refused before the others' images were read
    with pytest.raises(ValueError, match="unknown image source 'self'"):
        proxy_inputs("others+self", 6, IDENTITY_PIXELS, receiver="shapes", all_tasks=tasks, train_split=split)
    assert "shapes" not in split.read


def test_task_images_refuses_the_receivers_task_before_reading():
    split = _Recorder(["shapes", "glyphs"], "shapes")
    with pytest.raises(ValueError, match="'shapes' is the receiver's"):
        task_images(["glyphs", "shapes"], 4, split, receiver="shapes")
    assert split.read == []
    x = task_images(["glyphs"], 3, split, receiver="shapes")
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    with pytest.raises(ValueError, match="positive integer"):
        task_images(["glyphs"], 0, split, receiver="shapes")


def test_folder_images(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.new("RGB", (20, 24), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = folder_images(tmp_path, 3, Preprocess(img_size=16).pil_transform())
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    with pytest.raises(ValueError, match="holds no image"):
        folder_images(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None, 3, lambda im: im)
    with pytest.raises(ValueError, match="not a folder"):
        folder_images(tmp_path / "missing", 3, lambda im: im)


# ---------------------------------------------------------------- qv choose-lambda with proxy images
def test_choose_lambda_on_proxy_images_ranks_donors_and_refuses_the_receivers_task(tmp_path, tiny_arch, capsys):
    import json

    from PIL import Image

    from helpers import mini_config
    from qvlib import cli
    from qvlib.models import set_fixed_head
    from qvlib.vectors import WeightVector

    model = build_vit(tiny_arch, 3, seed=0)
    set_fixed_head(model, "shapes", 0)
    ft = model.state_dict()
    WeightVector(ft).save(tmp_path / "ft.safetensors", {"arch": "tiny", "task": "shapes", "seed": 0, "mode": "ft",
                                                        "quant": QuantSpec(bits=2).to_json()})
    names = QuantPolicy().select(ft)
    g = torch.Generator().manual_seed(0)
    for k, size in enumerate((0.01, 0.3)):
        rho = {n: size * ft[n].abs().mean() * torch.randn(ft[n].shape, generator=g) for n in names}
        WeightVector(rho).save(tmp_path / f"rho{k}.safetensors", {"arch": "tiny", "task": f"d{k}", "mode": "qv"})
    cfg = mini_config(tmp_path / "c.yaml", pretrain=False)
    base = ["choose-lambda", "--receiver", str(tmp_path / "ft.safetensors"), "--bits", "2", "--config", str(cfg),
            "--arch", "tiny", "--criterion", "features", "--lambdas", "0.5", "1", "2", "--n-images", "16"]
    # the receiver's own task is refused before any image is read
    assert cli.main([*base, "--vector", str(tmp_path / "rho0.safetensors"), "--task", "shapes"]) == 2
    assert "receiver's own task" in capsys.readouterr().err
    # another task's training images; two donors ranked, the chosen one named
    assert cli.main([*base, "--vector", str(tmp_path / "rho0.safetensors"), str(tmp_path / "rho1.safetensors"),
                     "--task", "glyphs", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["criterion"] == "features" and out["lower_is_better"] and "glyphs" in out["images"]
    assert len(out["donors"]) == 2 and out["vector"] in {d["vector"] for d in out["donors"]}
    best = min(out["donors"], key=lambda d: d["share_of_ptq"])
    assert out["vector"] == best["vector"] and out["lambda"] == best["lambda"]
    # a folder of images
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (i * 30, 100, 200 - i * 30)).save(tmp_path / "imgs" / f"{i}.png")
    assert cli.main([*base, "--vector", str(tmp_path / "rho0.safetensors"), "--images", str(tmp_path / "imgs")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("criterion features on 6 images of") and "lower is better" in text
    assert text.count("<- chosen") == 1 and "chosen: d0 at " in text  # the vector's task, not its file name
    assert cli.main([*base, "--vector", str(tmp_path / "rho0.safetensors"), "--task", "glyphs", "--tolerance", "1e9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lambda"] == 1.0  # every lambda within the tolerance: the one nearest 1
    assert cli.main([*base, "--vector", str(tmp_path / "rho0.safetensors"), "--tolerance", "-1"]) == 2
    assert "argument --tolerance: must be a number >= 0" in capsys.readouterr().err
    # the weights criterion reads no image
    assert cli.main(["choose-lambda", "--receiver", str(tmp_path / "ft.safetensors"), "--vector", str(tmp_path / "rho0.safetensors"),
                     "--bits", "2", "--task", "glyphs"]) == 2
    assert "reads no images" in capsys.readouterr().err


def test_rules_parse_and_tolerance():
    from qvlib.datafree import Rule

    assert Rule.parse("weights") == Rule("weights") and Rule.parse("outputs") == Rule("outputs", "noise")
    r = Rule.parse("features@donor~0.1")
    assert (r.criterion, r.source, r.tolerance, r.name) == ("features", "donor", 0.1, "features@donor~0.1")
    assert Rule.parse("outputs@noise").name == "outputs"
    for bad, msg in (("weights@donor", "takes no @source"), ("features@test", "unknown image source"),
                     ("features~x", "must be a number"), ("psychic", "unknown data-free"), ("outputs~-1", ">= 0")):
        with pytest.raises(ValueError, match=msg):
            Rule.parse(bad)
    scores = {0.5: 0.100, 1.0: 0.108, 2.0: 0.3}
    assert choose_lambda(scores) == 0.5 and choose_lambda(scores, tolerance=0.1) == 1.0
    assert choose_lambda(scores, tolerance=0.05) == 0.5


def test_the_workflow_hands_rules_only_other_tasks_images(tmp_path, tiny_arch):
    """qvlib.pipeline's data-free picks for a receiver read the donor's (or the other tasks') training
    images and never the receiver's; the self control gets no pick from a rule on the donor's images."""
    from helpers import mini_config
    from qvlib.config import Config
    from qvlib.pipeline import _datafree_picks

    cfg = Config.load(mini_config(tmp_path / "c.yaml", pretrain=False, tasks=["shapes", "dots", "blur"],
                                  datafree={"criteria": ["weights", "outputs", "features@donor", "agreement@others~0.1",
                                                         "outputs@others+donor~0.05"],
                                            "noise_images": 4, "proxy_images": 6}))
    spec = cfg.quant
    model, receiver, rho, policy = _on_grid_receiver(tiny_arch, spec)
    tasks = cfg.task_names
    for recv in tasks:
        split = _Recorder(tasks, recv)
        datafree = {"receiver": receiver, "model": model, "receiver_task": recv, "inputs": noise_images(4, 16),
                    "train_split": split, "n_proxy": 6, "proxies": {},
                    "preprocess": Preprocess(img_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))}
        for donor_tasks in ([t for t in tasks if t != recv][:1], [t for t in tasks if t != recv], [recv]):
            datafree["donor_tasks"] = donor_tasks
            picks = _datafree_picks(cfg, datafree, rho)
            with_donor = {"features@donor", "outputs@others+donor~0.05"} if donor_tasks != [recv] else set()
            assert set(picks) == {"weights", "outputs", "agreement@others~0.1"} | with_donor
            assert all(lam in cfg.lambdas for lam in picks.values())
        assert recv not in split.read and split.read


def _synth_inputs(model, n=8, steps=20, seed=0):
    return synthesized_images(model, n, 16, to_model=lambda p: (p / 255 - 0.5) / 0.5, steps=steps, seed=seed)


def test_synthesized_images_are_the_classes_the_model_was_asked_for(tiny_arch):
    model = build_vit(tiny_arch, 4, seed=0).eval()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    x = _synth_inputs(model, n=8, steps=30)
    assert x.shape == (8, 3, 16, 16) and not x.requires_grad
    assert x.min() >= -1.0 and x.max() <= 1.0  # sigmoid pixels: never outside a real image's range
    with torch.no_grad():
        top = model(x).argmax(dim=1)
    assert top.tolist() == [i % 4 for i in range(8)]  # image i is made for class i mod C
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the model is untouched
    assert torch.equal(x, _synth_inputs(model, n=8, steps=30))  # seeded: the same images twice
    assert not torch.equal(x, _synth_inputs(model, n=8, steps=30, seed=1))
    start = _synth_inputs(model, n=8, steps=0)  # no step: the seeded starting noise, mostly other classes
    with torch.no_grad():
        assert (model(start).argmax(dim=1) == top).float().mean() < 1.0


def test_synthesized_images_errors(tiny_arch):
    model = build_vit(tiny_arch, 4, seed=0).eval()
    with pytest.raises(ValueError, match="positive integer"):
        _synth_inputs(model, n=0)
    with pytest.raises(ValueError, match="integer >= 0"):
        _synth_inputs(model, steps=-1)
    with pytest.raises(ValueError, match="needs the receiver's model"):
        proxy_inputs("synth", 4, IDENTITY_PIXELS, receiver="shapes")


def test_outputs_on_synthesized_images_find_the_lambda_that_restores_the_receiver(tiny_arch):
    spec = QuantSpec(bits=2)
    model, receiver, rho, policy = _on_grid_receiver(tiny_arch, spec)
    inputs = _synth_inputs(model, n=16, steps=10)
    scores = score_lambdas("outputs", receiver, rho, spec, [0.25, 1.0, 2.0], policy, model=model, inputs=inputs)
    assert scores[0.25] == pytest.approx(0.0, abs=1e-6) and scores[2.0] > 0
    assert choose_lambda(scores) == 0.25


def test_outputs_on_a_joined_source_find_the_lambda_that_restores_the_receiver(tiny_arch):
    spec = QuantSpec(bits=2)
    model, receiver, rho, policy = _on_grid_receiver(tiny_arch, spec)
    tasks = ["shapes", "glyphs", "dots"]
    inputs = proxy_inputs("others+donor", 8, Preprocess(img_size=16), receiver="shapes", donor_tasks=["dots"], all_tasks=tasks,
                          train_split=_Recorder(tasks, "shapes"))
    assert inputs.shape == (16, 3, 16, 16)
    scores = score_lambdas("outputs", receiver, rho, spec, [0.25, 1.0, 2.0], policy, model=model, inputs=inputs)
    assert scores[0.25] == pytest.approx(0.0, abs=1e-6) and scores[2.0] > 0
    assert choose_lambda(scores) == 0.25
