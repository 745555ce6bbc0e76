"""bench/gpu_acceptance.py, the check for a rented GPU, run on the CPU at a cut-down size: every part
runs (train steps, engine cells, the smoke protocol in fp32 and bf16) and its report has the
figures a user reads, finite."""

import json
import math
import subprocess
import sys

from helpers import REPO, env

CUT = ["--device", "cpu", "--archs", "vit_tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
       "--eval-images", "4", "--eval-batch", "4", "--eval-cells", "1", "--overrides", "depth=2",
       "--smoke-arch", "vit_tiny", "--smoke-steps", "2", "--smoke-batch", "4", "--smoke-train", "20",
       "--smoke-test", "10", "--lambdas", "1.0", "--workers", "0"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_gpu_acceptance_runs_cut_down_on_the_cpu_and_reports_every_figure(tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_acceptance.py"), *CUT, "--json", str(report_path),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("hardware: device cpu, torch ")
    report = json.loads(report_path.read_text())
    assert report["hardware"]["device"] == "cpu" and report["settings"]["overrides"] == {"depth": 2}

    train = report["throughput"]["train"]
    assert {(r["mode"], r["precision"]) for r in train} == {(m, p) for m in ("ft", "qat") for p in ("fp32", "bf16")}
    for r in train:
        assert finite(r["img_per_s"]) and r["img_per_s"] > 0 and r["fits"] and r["grad_accum"] == 1
        assert r["batch"] == 2 and r["peak_memory_gib"] is None  # no GPU memory on the CPU
    evals = report["throughput"]["eval"]
    assert {r["precision"] for r in evals} == {"fp32", "bf16"}
    for r in evals:
        assert finite(r["img_per_s"]) and r["paper_cost_img_per_s"] > 0
        assert r["ratio_to_paper_cost"] == r["img_per_s"] / r["paper_cost_img_per_s"]
    hours = report["throughput"]["paper_train_gpu_hours"]["vit_tiny"]
    assert set(hours) == {"fp32", "bf16"} and all(finite(h) and h > 0 for h in hours.values())

    smoke = report["smoke"]
    assert set(smoke["ft_test_accuracy"]) == {"eurosat", "fer2013", "cifar10"}
    assert all(0 <= a <= 100 for a in smoke["ft_test_accuracy"].values())
    # 3 receivers x (self + 2 donors + 2 random controls) x 1 lambda x (test, calib), + 2 data-free rows each
    assert smoke["rows_compared"] == 3 * 5 * (2 + 2) and smoke["rows_unmatched"] == 0
    assert smoke["max_top1_diff_points"] == 0.0  # the CPU computes bf16 in fp32
    assert smoke["cells_compared"] == 3 * 5 * 2 and smoke["best_lambda_changes"] == 0
    assert set(smoke["train_seconds"]) == {f"{t}.{m}" for t in ("eurosat", "fer2013", "cifar10") for m in ("ft", "qat")}
    assert {b["model"] for b in smoke["baselines"]} == {"ft", "ptq", "qat", "qat_ptq"}
