#!/usr/bin/env bash
# Fetch, on this machine, the wheels that bench/device/gpu_check.sh installs on a GPU machine, which
# cannot reach a package index. Each package in packages.txt at the version .venv has (so the GPU figures
# come from the code the tests ran), built for the GPU image's Python 3.12 on x86-64, into .whl/ (in
# .gitignore; the device tool carries it with `carry: [".whl"]`).
#
#   bash bench/device/fetch_wheels.sh [--nvimgcodec]
#
# --nvimgcodec also fetches NVIDIA's nvImageCodec and its JPEG 2000 extension's library (nvjpeg2k), about 30 MB,
# for bench/gpu_decode.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv here: run 'bash .ci/setup' first" >&2; exit 1; }
rm -rf .whl && mkdir .whl
specs=()
while read -r name; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
    || { echo "$name is not installed in .venv: run 'bash .ci/setup'" >&2; exit 1; }
  specs+=("$name==$version")
done < bench/device/packages.txt
[ "${1:-}" = "--nvimgcodec" ] && specs+=("nvidia-nvimgcodec-cu13" "nvidia-nvjpeg2k-cu13")
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
ls .whl | wc -l | xargs echo "wheels in .whl:"
du -sh .whl | cut -f1 | xargs echo "size (the working tree and carried paths may be 64 MiB in all):"
