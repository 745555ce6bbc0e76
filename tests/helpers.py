"""Shared test helpers: a miniature config and running `qv` / snakemake from the venv."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def env():
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e["HF_HUB_OFFLINE"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    return e


def mini_config(path: Path, name="mini", tasks=("shapes", "dots", "blur"), pretrain=True, **extra) -> Path:
    """A whole grid that runs in about a minute on one CPU core."""
    cfg = {
        "name": name,
        "seeds": [0],
        "data_root": str(path.parent / "data"),
        "quant": {"bits": 2, "granularity": "channel"},
        "archs": {"tiny": {
            "timm_name": "vit_tiny_patch16_224",
            "overrides": {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2},
            "backbone": {"source": "pretrain"} if pretrain else {"source": "random", "seed": 0},
        }},
        "pretrain": {"tasks": ["shapes", "dots"], "n_per_task": 200,
                     "train": {"steps": 10, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 5, "log_every": 5}},
        "task_defaults": {"n_train": 200, "n_test": 60},
        "tasks": {t: {} for t in tasks},
        "finetune": {"steps": 12, "batch_size": 32, "lr": 5e-3, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 4},
        "lambdas": [0.0, 1.0, 2.0],
        "oracle_search": True,
        "evaluate": {"batch_size": 64},
        "resources": {k: {"threads": 1, "mem_mb": 1000, "runtime": 5} for k in ("pretrain", "finetune", "cache", "evaluate")},
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def qv(*args, check=True, cwd=None):
    proc = subprocess.run([str(BIN / "qv"), *map(str, args)], capture_output=True, text=True, env=env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"qv {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def snakemake(workdir: Path, configfile: Path, *args, check=True):
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
