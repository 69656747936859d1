"""`benchmarks/gpu_check.py` runs its checks and reports them, on CPU with the tiny size."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_passes_every_check_on_cpu_with_the_tiny_size():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--sizes", "tiny", "--steps", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = {(line["check"], line["stage"]) for line in lines}
    for stage in (1, 2, 3):
        assert {("loss_falls", stage), ("weights_changed", stage), ("dtypes", stage)} <= checks
    assert ("router_fp32", 3) in checks and ("text_logits_equal_base", 3) in checks
    assert all(line["ok"] for line in lines)
