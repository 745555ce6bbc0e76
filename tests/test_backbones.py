"""Pretrained backbones reused from a folder: the lookup digest, `qv pretrain`'s reuse, the shipped files."""

import hashlib
import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from helpers import REPO, mini_config, qv
from qvlib.backbones import pretrain_key, shipped_backbone, shipped_name
from qvlib.config import Config
from qvlib.train import metrics_path
from qvlib.vectors import WeightVector


def with_keys(path: Path, edit) -> Config:
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    return Config(raw, path)


def test_the_key_follows_what_pretraining_reads_and_nothing_else(tmp_path):
    path = mini_config(tmp_path / "c.yaml")
    base = pretrain_key(Config.load(path), "tiny")
    assert len(base) == 12 and int(base, 16) >= 0

    def same(edit):
        return pretrain_key(with_keys(path, edit), "tiny") == base

    # bookkeeping, defaults written out, the run's name, its tasks and fine-tuning: same backbone
    assert same(lambda r: r["pretrain"]["train"].update(checkpoint_every=7, log_every=3))
    assert same(lambda r: r["pretrain"]["train"].update(grad_accum=1, num_workers=0, weight_decay=0.0))
    assert same(lambda r: r.update(name="other", tasks={"shapes": {}, "dots": {}}, reuse_backbones="elsewhere"))
    assert same(lambda r: r["finetune"].update(lr=1.0))
    # anything that changes the weights: another backbone
    assert not same(lambda r: r["pretrain"]["train"].update(steps=11))
    assert not same(lambda r: r["pretrain"].update(n_per_task=201))
    assert not same(lambda r: r["pretrain"].update(tasks=["dots", "shapes"]))
    assert not same(lambda r: r["archs"]["tiny"]["overrides"].update(embed_dim=32))
    assert not same(lambda r: r.update(data_seed=1))


def test_the_file_name_carries_arch_seed_and_key_and_needs_a_folder(tmp_path):
    path = mini_config(tmp_path / "c.yaml", seeds=[0, 3], reuse_backbones=str(tmp_path / "bb"))
    cfg = Config.load(path).with_seed(3)
    key = pretrain_key(cfg, "tiny")
    assert shipped_name(cfg, "tiny") == f"tiny-seed3-{key}.safetensors"
    assert shipped_backbone(cfg, "tiny") == tmp_path / "bb" / f"tiny-seed3-{key}.safetensors"
    assert shipped_backbone(Config.load(mini_config(tmp_path / "n.yaml")), "tiny") is None


def test_qv_pretrain_reuses_a_kept_backbone_and_refuses_a_mislabelled_one(tmp_path):
    folder = tmp_path / "kept"
    cfg_path = mini_config(tmp_path / "c.yaml", seeds=[0, 1], reuse_backbones=str(folder))
    first = tmp_path / "first.safetensors"
    proc = qv("pretrain", "--config", cfg_path, "--arch", "tiny", "--threads", "1", "--no-progress", "-o", first)
    kept = folder / shipped_name(Config.load(cfg_path), "tiny")
    assert f"no backbone with these settings at {kept}: pretraining" in proc.stderr and "step 10/10" in proc.stderr

    folder.mkdir()
    kept.write_bytes(first.read_bytes())
    metrics_path(kept).write_text(metrics_path(first).read_text())
    again = tmp_path / "again.safetensors"
    proc = qv("pretrain", "--config", cfg_path, "--arch", "tiny", "--threads", "1", "--no-progress", "-o", again)
    assert f"reused {kept}" in proc.stderr and "step " not in proc.stderr
    assert again.read_bytes() == first.read_bytes()
    metrics = json.loads(metrics_path(again).read_text())
    assert metrics["reused_from"] == str(kept) and metrics["loss"] == json.loads(metrics_path(first).read_text())["loss"]

    forced = tmp_path / "forced.safetensors"
    proc = qv("pretrain", "--config", cfg_path, "--arch", "tiny", "--threads", "1", "--no-progress", "-o", forced, "--no-reuse")
    assert "reused" not in proc.stderr and "step 10/10" in proc.stderr
    trained, reference = WeightVector.load(forced), WeightVector.load(first)  # the CPU run is deterministic
    assert trained.metadata == reference.metadata and all(torch.equal(trained[k], reference[k]) for k in reference)

    # seed 0's backbone under seed 1's name is refused, and nothing is written
    wrong = folder / shipped_name(Config.load(cfg_path).with_seed(1), "tiny")
    wrong.write_bytes(first.read_bytes())
    out = tmp_path / "seed1.safetensors"
    proc = qv("pretrain", "--config", cfg_path, "--arch", "tiny", "--seed", "1", "--no-progress", "-o", out, check=False)
    assert proc.returncode == 2
    assert (f"qv pretrain: error: {wrong} is not a pretrained backbone of arch 'tiny' at seed 1: its metadata has "
            "{'seed': '0'}, expected {'mode': 'pretrain', 'arch': 'tiny', 'seed': '1'}") in proc.stderr
    assert not out.exists() and not metrics_path(out).exists()

    # a truncated file (a broken download, a git LFS pointer) is refused with the loader's description
    wrong.write_bytes(first.read_bytes()[:1000])
    proc = qv("pretrain", "--config", cfg_path, "--arch", "tiny", "--seed", "1", "--no-progress", "-o", out, check=False)
    assert proc.returncode == 2 and f"qv pretrain: error: {wrong} is not a readable safetensors file (truncated" in proc.stderr
    assert not out.exists()


def test_the_shipped_backbones_are_found_by_the_default_config():
    """A change to the default's pretraining settings (or to their defaults) would make every run
    pretrain again: 5-6 min more per seed. This says so, and keeps the folder free of stale files."""
    cfg = Config.load(REPO / "config" / "config.yaml")
    assert cfg.raw["reuse_backbones"] == "backbones"
    cfg.raw["seeds"] = list(range(6))
    expected = {shipped_name(cfg.with_seed(seed), "vit_demo"): seed for seed in range(6)}
    folder = REPO / "backbones"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(expected)
    for name, seed in expected.items():
        with safe_open(str(folder / name), "pt") as f:
            meta = f.metadata()
            assert f.get_tensor("cls_token").shape == (1, 1, 96)
        assert (meta["mode"], meta["arch"], meta["seed"]) == ("pretrain", "vit_demo", str(seed))
        assert json.loads(metrics_path(folder / name).read_text())["steps"] == 4000
    # the bytes the demo's figures were measured from (docs/demo-study.md)
    digest = hashlib.sha256((folder / f"vit_demo-seed0-{pretrain_key(cfg, 'vit_demo')}.safetensors").read_bytes())
    assert digest.hexdigest() == SEED0_SHA256


SEED0_SHA256 = "480bbec93190f31b1c4741db2808e614f1016f7bb94e7196ceca057fe744885b"
