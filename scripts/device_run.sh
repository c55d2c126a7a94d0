#!/usr/bin/env bash
# One call on the GPU machine (see README "GPU machine"): build, test, benchmark, short table last.
#
#   [BENCH="gdn decode fused_ops conv moe cross_entropy e2e"] [SANITIZE=1 [SANITIZE_K=expr]]
#   [PYTEST_K="cuda and not moe"] bash scripts/device_run.sh [gdn shapes...]
#       (default shapes: the three DESIGN.md GDN shapes)
#
# Installs wheels carried in .whl/ (e.g. fla-core for the FLA column) into /tmp/site, builds
# flashdelta for sm_90a without build isolation (the machine has no network), runs the C++ and
# Python tests (and, with SANITIZE=1, compute-sanitizer memcheck and racecheck over the tests
# that SANITIZE_K selects, a pytest -k expression; default: the names holding "cuda_forward"),
# then `python -m flashdelta.bench gdn --device cuda` at each shape in bf16 and
# `python -m flashdelta.bench NAME` for every other NAME in BENCH (default: gdn decode fused_ops
# conv moe cross_entropy; add e2e for bench/e2e.py).
# Logs and JSON go to $OUT when set (the device tool brings that folder back), else to /tmp.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/flashdelta-device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"

# Carried wheels (FLA) go on the path of the benchmarks only: with FLA importable, transformers'
# kernel-hub wrapper picks FLA for every call, CPU tensors included (which FLA cannot run), so
# the tests' unpatched CPU models would fail for reasons that are not ours.
BENCH_PATH="${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && BENCH_PATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"

start=$SECONDS
FLASHDELTA_BUILD_TESTS=ON FLASHDELTA_CUDA_ARCHS="${FLASHDELTA_CUDA_ARCHS:-90a}" \
  SKBUILD_BUILD_DIR=build/device python3 -m pip install -q --no-build-isolation --no-deps . \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
python3 -c "import flashdelta; print('build_info', flashdelta.build_info())"

ctest --test-dir build/device --no-tests=error -j8 > "$OUT/ctest.log" 2>&1
echo "ctest: $(tail -n 3 "$OUT/ctest.log" | grep -E 'tests passed|tests failed' || echo 'see ctest.log')"
# PYTEST_K: a pytest -k expression (one argument, spaces allowed) selecting the tests to run.
python3 -m pytest tests/python -q -rs -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} \
  > "$OUT/pytest.log" 2>&1
echo "pytest: $(tail -n 1 "$OUT/pytest.log")"

if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest tests/python \
      -q -p no:cacheprovider -k "${SANITIZE_K:-cuda_forward}" > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize_$tool.log" | tr '\n' ' '))"
  done
fi

BENCH="${BENCH:-gdn decode fused_ops conv moe cross_entropy}"
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=("1,32768,16,32,128,128" "8,4096,16,32,128,128" "1,8192,16,32,128,128")
if [[ " $BENCH " == *" gdn "* ]]; then
  for shape in "${shapes[@]}"; do
    tag=$(echo "$shape" | tr ',' 'x')
    PYTHONPATH="$BENCH_PATH" timeout 300 python3 -m flashdelta.bench gdn --device cuda --dtype bf16 --shape "$shape" \
      --fla-unsafe-bwd --json "$OUT/gdn_$tag.json" > "$OUT/gdn_$tag.log" 2>&1
    echo "bench gdn $shape: exit $?"
  done
fi
if [[ " $BENCH " == *" e2e "* ]]; then
  # E2E_VARIANTS: bench/e2e.py --variants (e.g. "fla,flashdelta:gdn,flashdelta")
  PYTHONPATH="$BENCH_PATH" timeout 480 python3 bench/e2e.py --fla-unsafe-bwd --no-progress \
    ${E2E_VARIANTS:+--variants "$E2E_VARIANTS"} --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
  echo "bench e2e: exit $?"
fi
# Every other benchmark named in BENCH: `python -m flashdelta.bench NAME`, its table last.
others=()
for name in $BENCH; do
  case "$name" in gdn|e2e) ;; *) others+=("$name") ;; esac
done
for name in "${others[@]}"; do
  PYTHONPATH="$BENCH_PATH" timeout 300 python3 -m flashdelta.bench "$name" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  echo "bench $name: exit $?"
done
echo
if [[ " $BENCH " == *" gdn "* ]]; then
  for shape in "${shapes[@]}"; do
    sed -n '/^gdn: /,$p' "$OUT/gdn_$(echo "$shape" | tr ',' 'x').log"
    echo
  done
fi
for name in "${others[@]}"; do
  sed -n "/^$name: /,\$p" "$OUT/$name.log"
  echo
done
if [[ " $BENCH " == *" e2e "* ]]; then tail -n 40 "$OUT/e2e.log"; fi
