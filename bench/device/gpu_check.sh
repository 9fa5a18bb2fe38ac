#!/usr/bin/env bash
# Issue 8's GPU figures in one run on a lent GPU machine (no package index there, Python 3.12 with torch).
# Here first:   bash bench/device/fetch_wheels.sh --nvimgcodec
# Then the device tool's run, with carry [".whl"] and timeout_s 600:
#               bash bench/device/gpu_check.sh
# Each bench's output goes to $OUT (the device tool brings it back) and to stdout. The time limits below
# add up to about 9 minutes; on an H100 the whole run took about 4 (2026-12-05). The last two bursts are the
# same JPEG 2000 burst with the CPU decoders and with run.gpu_decode: whether GPU-side decode pays off.
# QUICK=1: small sizes, to try the wiring on a machine without a GPU (every bench then runs on CPU).
# ONLY="name ...": only those benches (names as in the run lines below), for a rerun that fits what is
# left of the device time; diagnostics at the end run only when named there.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
SITE=${SITE:-/tmp/ainode-site}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "$(date -u +%FT%TZ) $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' \
  | tee -a "$OUT/summary.txt"
ls .whl/*.whl > /dev/null 2>&1 || { log "no wheels in .whl: run bench/device/fetch_wheels.sh here and carry .whl"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { log "installing the carried wheels failed"; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The node finds its plugins by entry point (group ainode.plugins), which a source tree on PYTHONPATH lacks:
# a metadata-only dist-info in $SITE declares pyproject.toml's entry points for the code in $PWD.
"$PY" - "$SITE" <<'PYEOF' || { log "declaring the plugins' entry points failed"; exit 2; }
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"ainode-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ainode\nVersion: {project['version']}\n")
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n"
    for group, points in project.get("entry-points", {}).items()))
PYEOF
# nvImageCodec loads its extensions' libraries (nvjpeg2k) and CUDA's runtime by name: the wheels' folders.
libs=$(find "$SITE/nvidia" "$("$PY" -c 'import site; print(site.getsitepackages()[0])')/nvidia" \
  -maxdepth 3 -type d -name lib 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ "${QUICK:-0}" = 1 ]; then
  decode=(--slices 40 --repeat 1); nodule=(--slices 64 --runs 1); burst=(--slices 64 --studies 2 --workers 1)
  j2k=(--slices 64 --studies 2 --workers 1 --transfer-syntax JPEG2000Lossless)
else
  decode=(--repeat 3); nodule=(--runs 3); burst=(--studies 20 --workers 2)
  j2k=(--studies 10 --workers 2 --transfer-syntax JPEG2000Lossless)
fi
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return 0
  log "$name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  log "$name: exit $rc$([ "$rc" = 124 ] && echo " (stopped at its $limit s limit)")"
}
run gpu_decode 80 "$PY" bench/gpu_decode.py "${decode[@]}"
run nodule_throughput 70 "$PY" bench/nodule_throughput.py "${nodule[@]}"
run gpu_burst 80 "$PY" bench/gpu_burst.py "${burst[@]}"
# How busy 1 and 4 slots keep the GPU (the node's run.gpu.slots_per_gpu: auto gives a 16-core host with one GPU 4).
run gpu_burst_1slot 80 "$PY" bench/gpu_burst.py "${burst[@]}" --workers 1
run gpu_burst_4slots 80 "$PY" bench/gpu_burst.py "${burst[@]}" --workers 4
run gpu_burst_j2k_cpu 80 "$PY" bench/gpu_burst.py "${j2k[@]}"
run gpu_burst_j2k_gpu 80 "$PY" bench/gpu_burst.py "${j2k[@]}" --gpu-decode
# Diagnostics, run only when ONLY names them: the CPU-decode burst with one torch thread per slot;
# whether 8 slots (two cores each on a 16-core host) keep the GPU 80% busy with uncompressed studies; and
# the 4-slot burst with torch's own thread count (one per core in every slot, as before the node gave each
# worker its share, node/cpus.py), to compare with gpu_burst_4slots on the same machine; and the 4-slot
# burst without the prefetch, whose stage medians show what reading the next series costs the running job
# there (on the 2-core VM: postprocess 0.02 -> 0.09 s, build 0.18 -> 0.24 s).
[ -n "${ONLY:-}" ] && run gpu_burst_j2k_cpu_1thread 80 env OMP_NUM_THREADS=1 "$PY" bench/gpu_burst.py "${j2k[@]}"
[ -n "${ONLY:-}" ] && run gpu_burst_8slots 90 "$PY" bench/gpu_burst.py "${burst[@]}" --workers 8
[ -n "${ONLY:-}" ] && run gpu_burst_4slots_all_threads 80 env OMP_NUM_THREADS="$(nproc)" "$PY" bench/gpu_burst.py \
  "${burst[@]}" --workers 4
[ -n "${ONLY:-}" ] && run gpu_burst_4slots_no_prefetch 80 "$PY" bench/gpu_burst.py "${burst[@]}" --workers 4 --no-prefetch
log "$(date -u +%FT%TZ) done"
