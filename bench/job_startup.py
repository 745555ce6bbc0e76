"""What a workflow job pays before it does any work: the seconds a fresh Python process takes to import
what each kind of `qv` job loads, measured in one run.

    python bench/job_startup.py            # 5 fresh processes per kind, median

Every Snakemake job is a new process. Model jobs (training, caches, evaluation) need timm, which
imports torchvision, which imports torch._dynamo; the light jobs (qv extract, merge, tables, figures)
import only what they use (qvlib's public API loads lazily). Prints each kind's median and its ratio
to the model jobs' import (the baseline), on the machine named in the last line.
"""

import argparse
import statistics
import subprocess
import sys
import time

# What each kind of job imports before its first line of work (the modules its `qv` subcommand reaches).
KINDS = {
    "model job (finetune, cache-splits, evaluate-*)": "import qvlib.cli, qvlib.pipeline",
    "qv extract / merge": "import qvlib.cli, qvlib.checkpoints",
    "qv tables / figures": "import qvlib.cli, qvlib.report",
    "bare python": "pass",
}
BASELINE = next(iter(KINDS))


def startup_seconds(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    startup_seconds(KINDS[BASELINE], 1)  # warm the file cache
    measured = {kind: startup_seconds(code, args.repeats) for kind, code in KINDS.items()}
    for kind, seconds in measured.items():
        print(f"{kind:48s} {seconds:6.2f} s   x{seconds / measured[BASELINE]:.2f} of a model job's")
    from qvlib.provenance import machine_line

    print(machine_line())


if __name__ == "__main__":
    main()
