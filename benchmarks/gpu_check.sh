#!/usr/bin/env bash
# msae GPU check (≤ 8 minutes on one H200): a random-init LLaVA-NeXT-8B in bf16 — extraction vs the
# reference approach, OOM back-off, SAE training at 131,072 latents / k=256, latent stats.
# Writes benchmarks/results_gpu.json (and copies it to $OUT when that is set). Nothing is downloaded.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --cpu-smoke     # anywhere: the same script shrunk to CPU size
#   benchmarks/gpu_check.sh --fetch-wheels  # HERE, with PyPI reachable: put wheels of the packages a
#                                           # bare GPU image lacks (zarr, polars, pydantic, ...) in .whl/
#
# Which Python: the first of python3, .venv/bin/python, python whose torch sees CUDA (with
# --cpu-smoke: that imports torch). Packages it lacks are installed from .whl/ (offline) into
# /tmp/msae-site when that folder exists; the repository itself is put on PYTHONPATH (or installed
# with `pip install -e . --no-deps` if that does not make it importable).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
NEEDED="zarr polars pydantic yaml transformers safetensors PIL tqdm fsspec pyarrow numpy"
# Wheels for a bare CUDA image (Python 3.12, x86-64); versions as in this project's .venv.
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 polars==2.1.0 \
polars-runtime-32==2.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5"

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  py=$(command -v python3 || echo .venv/bin/python)
  for w in $WHEELS; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_24_x86_64 --platform any -d .whl "$w" || echo "could not fetch $w" >&2
  done
  ls -la .whl
  exit 0
fi

CPU_SMOKE=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && CPU_SMOKE=1; done
if [ $CPU_SMOKE = 1 ]; then PROBE='import torch'; else PROBE='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; fi

PY=""
for cand in python3 "$ROOT/.venv/bin/python" python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$PROBE" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch$([ $CPU_SMOKE = 1 ] || echo ' + CUDA') found; trying pip install torch==2.13.0" >&2
  python3 -m pip install -q torch==2.13.0 && PY=$(command -v python3)
  if [ -z "$PY" ] || ! "$PY" -c "$PROBE" >/dev/null 2>&1; then
    echo "gpu_check: cannot get torch$([ $CPU_SMOKE = 1 ] || echo ' with CUDA') here; giving up" >&2
    exit 2
  fi
fi
echo "gpu_check: python $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'))"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing() { for m in $NEEDED; do "$PY" -c "import $m" >/dev/null 2>&1 || printf '%s ' "$m"; done; }
MISSING=$(missing)
if [ -n "$MISSING" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check: installing from .whl/ for: $MISSING"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/msae-site "$ROOT"/.whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/msae-site"
  MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
  echo "gpu_check: missing Python packages: $MISSING" >&2
  echo "  carry wheels: run 'benchmarks/gpu_check.sh --fetch-wheels' where PyPI is reachable, then carry .whl" >&2
  exit 2
fi
if ! "$PY" -c 'import msae.extract, msae.sae.train' >/dev/null 2>&1; then
  "$PY" -m pip install -q -e . --no-deps || true
fi

# 8 minutes in all: the script budgets 420 s for its sections; this is the hard stop behind it.
timeout 470 "$PY" benchmarks/gpu_check.py "$@"
rc=$?
RESULTS=benchmarks/results_gpu.json
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [ -f "$RESULTS" ] && [ $CPU_SMOKE = 0 ]; then cp "$RESULTS" "$OUT/"; fi
exit $rc
