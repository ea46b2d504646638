#!/usr/bin/env bash
# The one prepared check for the GPU test machine (../shared/docs/GPU.md): install the wheels
# brought along, build the CUDA kernels, run `pytest -m gpu`, then measure kernels, decoders,
# ViT-B/32 decode+score and a whole `fastlaion run` (bench/gpu_bench.py); one table last.
#
#   bench/gpu_check.sh         on the GPU machine, from the repository root, with .whl/ brought
#                              along (../shared/tools/gpu-wheels, plus PyTurboJPEG and
#                              libturbojpeg.so.0 under .whl/lib/) and optionally .dali/part*
#   bench/gpu_check.sh --cpu   the dry run: the same steps on the CPU with small sizes and the
#                              project's .venv (CI runs it: tests/test_gpu_check.py)
#
# Logs and results.json go to $OUT (the device tool's output folder) or bench/_work/gpu_check.
# Finishes in about 5 minutes on an H100; each step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[[ ${1:-} == --cpu ]] && mode=cpu
out=${OUT:-bench/_work/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export FASTLAION_KERNEL_CACHE=${FASTLAION_KERNEL_CACHE:-/tmp/fastlaion-kernels}
failed=()
step() { echo; echo "### $* ($(date -u +%H:%M:%S))"; }

if [[ $mode == gpu ]]; then
  py=${PYTHON:-python3}
else
  py=${PYTHON:-.venv/bin/python}
  [[ -x $py ]] || py=python3
fi

{
step "1. environment ($mode)"
if [[ $mode == gpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || failed+=(nvidia-smi)
fi
$py -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
echo "cores: $(nproc)"
# the compiled tokenizer (and extract's reader) are built with it on first use; without one, Python runs them
echo "C compiler: $(command -v cc || command -v gcc || echo 'none (the tokenizer runs in Python)')"

step "2. install what was brought along"
if [[ $mode == gpu ]]; then
  site=/tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || failed+=(wheels)
  fi
  if ! ldconfig -p | grep -q 'libturbojpeg\.so\.0' && [[ -f .whl/lib/libturbojpeg.so.0 ]]; then
    cp .whl/lib/libturbojpeg.so.0 /usr/local/lib/ && ldconfig || failed+=(libturbojpeg)
  fi
  # DALI's wheels, and wheels an earlier call of the same session left on the machine (what the
  # 64 MiB a call carries cannot hold with .whl: nvImageCodec alone, say). One pip call for all:
  # they share the top-level nvidia/ folder, which `pip --target` moves whole, so a second call
  # would skip it (or, with --upgrade, replace it). A project DALI brings is not added twice.
  nvidia_wheels=()
  dali_dir=
  if compgen -G ".dali/part*/chunk.*" >/dev/null; then
    # the parts in their numbers' order (a glob would put part10 before part2)
    if mkdir -p /tmp/dali && for ((i = 1; ; i++)); do [[ -d .dali/part$i ]] || break; cat .dali/part$i/chunk.*; done \
        | tar -C /tmp/dali -xf -; then
      nvidia_wheels+=(/tmp/dali/*.whl)
      dali_dir=/tmp/dali
    else
      failed+=(dali)
    fi
  else
    echo "no .dali/ brought along: the DALI decoder is not measured"
  fi
  for wheel in /tmp/fastlaion-extra-wheels/*.whl; do
    [[ -e $wheel ]] || continue
    project=$(basename "$wheel"); project=${project%%-*}
    [[ -n $dali_dir ]] && compgen -G "$dali_dir/${project}-*.whl" >/dev/null && continue
    nvidia_wheels+=("$wheel")
  done
  if (( ${#nvidia_wheels[@]} )); then
    echo "installing: ${nvidia_wheels[*]##*/}"
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${nvidia_wheels[@]}" || failed+=(nvidia-wheels)
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "dry run: using $py and what its environment has"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$py - <<'EOF' || failed+=(imports)
import importlib
for name in ("fastlaion", "open_clip", "polars", "turbojpeg", "torchvision", "nvidia.dali"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '')}")
    except Exception as exc:
        print(f"  {name}: MISSING ({type(exc).__name__}: {exc})")
from fastlaion.decode import shared_turbojpeg
shared_turbojpeg()
print("  libturbojpeg loads")
# what the run path imports: a package missing here (orjson, in session 10) fails this step by name
# and costs every later section; bring its wheel in .whl/ (tests/test_gpu_check.py guards the list)
for name in ("fastlaion.cli", "fastlaion.pipeline", "fastlaion.dataset.search"):
    importlib.import_module(name)
print("  fastlaion's run path imports")
EOF

step "3. build the CUDA kernels"
if [[ $mode == gpu ]]; then
  timeout 200 $py -c 'import time; t = time.time(); from fastlaion import ops; ops._ops(); print(f"built and loaded in {time.time() - t:.0f} s")' \
    || failed+=(kernel-build)
else
  echo "no GPU: the compile check of step 5 (a) compiles them with nvcc instead"
fi

step "4. pytest -m gpu"
timeout 170 $py -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_gpu_decode.py tests/test_score.py tests/test_semantic.py tests/test_search.py 2>&1 \
  | tee "$out/pytest_gpu.txt" | tail -25
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=(pytest-gpu)

step "5. measure"
cpu_flag=()
[[ $mode == cpu ]] && cpu_flag=(--cpu)
limit=()
[[ $mode == gpu ]] && limit=(--time-limit 320)  # the step's own limit, less the start-up
timeout 330 $py bench/gpu_bench.py --out "$out" "${limit[@]}" "${cpu_flag[@]}" || failed+=(measure)

step "done"
echo "pytest -m gpu: $(tail -1 "$out/pytest_gpu.txt" 2>/dev/null)"
if (( ${#failed[@]} )); then echo "FAILED steps: ${failed[*]}"; else echo "all steps passed"; fi
echo "${#failed[@]}" > "$out/failed_steps"
} 2>&1 | tee "$out/gpu_check.log"
exit "$(cat "$out/failed_steps")"
