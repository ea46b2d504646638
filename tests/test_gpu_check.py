"""bench/gpu_check.sh --cpu: the GPU check's dry run walks every step here, so a GPU session
never fails on something the CPU could have caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_walks_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "FASTLAION_KERNEL_CACHE": str(tmp_path / "kernels"),
           "GPU_CHECK_SKIP_COMPILE": "1"}  # test_ops.py compiles the kernels in the same suite
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for step in ("1. environment (cpu)", "2. install", "3. build the CUDA kernels", "4. pytest -m gpu",
                 "5. measure", "all steps passed"):
        assert step in log, step
    results = json.loads((tmp_path / "results.json").read_text())
    figures = {what: figure for what, figure, _ in results["rows"]}
    # every section measured something on the CPU: the decoders that run here, decode+score, a run
    assert figures["decode cpu"].endswith("img/s")
    assert figures["decode nvjpeg"].endswith("img/s")
    assert any(" decode+score " in w for w in figures), figures
    assert any("decode+score, 2 processes" in w and f.endswith("samples/s") for w, f in figures.items()), figures
    assert any(w.startswith("fastlaion run") and f.endswith("samples/s") for w, f in figures.items()), figures
    # the decode+score run's host profile names the threads that worked and what they ran
    profile = {w: f for w, f in figures.items() if "host profile: " in w}
    assert any(w.endswith(": prepare") and "decode.py" in f for w, f in profile.items()), profile
    assert any(w.endswith(": score") and "score.py" in f for w, f in profile.items()), profile
    # (g): the host side alone, device work taken out, with and without the stored-image encode
    ceiling = {w: f for w, f in figures.items() if w.startswith("host ceiling, one process")}
    assert len(ceiling) == 2 and all(f.endswith("samples/s") for f in ceiling.values()), figures
    assert "FAILED" not in figures.values()
    # the table is the last thing printed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("all steps passed") or "| what | figure |" in proc.stdout
    assert (tmp_path / "gpu_check.log").exists()
