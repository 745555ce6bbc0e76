"""The miniature workflow through `snakemake --profile profiles/slurm` on a real single-node Slurm
stood up on localhost (tests/slurm/cluster.sh; needs root and Debian's Slurm packages, which
.ci/run installs). The cluster is torn down by its pid files whatever the outcome."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from helpers import BIN, REPO, env, mini_config

pytestmark = pytest.mark.slow
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
TIMEOUT = 900


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd"
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(t)]
    if missing:
        return f"Slurm not installed ({', '.join(missing)}); .ci/run installs it"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm not installed"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm-state")
    e = {**env(), "QV_SLURM_STATE": str(state)}
    subprocess.run([str(CLUSTER), "start"], check=True, env=e, timeout=120)
    try:
        yield e
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=e, timeout=120)


def run_slurm(workdir: Path, configfile: Path, e: dict):
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--profile", str(REPO / "profiles" / "slurm"),
           # no accounting daemon on the test cluster: ask squeue, not sacct, and do it soon
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5",
           "--retries", "0", "--jobs", "4"]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=TIMEOUT)


def test_workflow_on_slurm_produces_the_same_outputs(cluster, tmp_path):
    cfg = mini_config(tmp_path / "mini.yaml", name="slurm", tasks=("shapes", "dots"), pretrain=False,
                      lambdas=[0.0, 1.0], oracle_search=False)
    proc = run_slurm(tmp_path, cfg, cluster)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = tmp_path / "results" / "slurm" / "tiny"
    for name in ("baselines.parquet", "transfer.parquet", "summary_donor.parquet", "summary_receiver.parquet",
                 "diagnostics.parquet", "cosine.parquet", "quantizers.md", "w2-channel/summary.md", "w2-channel/heatmap_gain.png",
                 "w2-channel/heatmap_cosine.png"):
        assert (out / name).stat().st_size > 0, name
    transfer = pl.read_parquet(out / "transfer.parquet")
    zero = transfer.filter(pl.col("lambda") == 0.0)
    assert len(zero) > 0 and (zero["gain"] == 0).all()
    text = proc.stdout + proc.stderr
    # GPU rules asked Slurm's gpu partition for a GPU (fake GPUs on the test node); CPU rules for none
    assert "slurm_partition=gpu, runtime=5, gpu=1" in text and "slurm_partition=cpu, runtime=5, gpu=0" in text
    # each receiver's row of cells went to Slurm as one group job, never as single cells
    submitted = re.findall(r"has been submitted with SLURM jobid \S+ \(log: (\S+)\)", text)
    rows = [log for log in submitted if "/group_row-" in log]
    assert sorted(re.search(r"group_(row-[^/]+?)_transfer_cell", log).group(1) for log in rows) == \
        ["row-tiny-seed0-w2-channel-dots", "row-tiny-seed0-w2-channel-shapes"], submitted
    assert not [log for log in submitted if "rule_transfer_cell" in log]
    cells = pl.read_parquet(out / "transfer.parquet").select("receiver", "donor").unique()
    assert len(cells) > len(rows)  # several cells per submission


def test_failing_rule_is_reported_as_failed(cluster, tmp_path):
    cfg = mini_config(tmp_path / "broken.yaml", name="broken", tasks=("shapes", "fashion_mnist"), pretrain=False,
                      lambdas=[1.0], oracle_search=False)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["tasks"]["fashion_mnist"] = {"source": {"kind": "idx_gz", "path": str(tmp_path / "nowhere")}}
    cfg.write_text(yaml.safe_dump(data))
    proc = run_slurm(tmp_path, cfg, cluster)
    assert proc.returncode != 0
    assert "Error in rule" in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "broken" / "tiny" / "w2-channel" / "summary.md").exists()
