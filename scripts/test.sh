#!/usr/bin/env bash
# The README's test command: `bash scripts/test.sh`.
#
# From a fresh machine of the project's kind (Debian, root, Python 3 with pip, a C++ compiler,
# CMake, optionally a CUDA toolkit) it installs what is missing, builds flashdelta with its C++
# tests (the CUDA backend too when nvcc is there, so CUDA code that stops compiling fails here),
# installs the package with its test extras, then runs every C++ test (CTest) and every Python
# test (pytest). Exits non-zero if anything fails, including a test run that collects no test.
#
# Environment: PYTHON (default python3), CMAKE_BUILD_PARALLEL_LEVEL (default 2), and the build
# switches FLASHDELTA_WITH_CUDA / FLASHDELTA_CUDA_ARCHS / FLASHDELTA_CPU_NATIVE (see README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
# The build tree of this script: the C++ tests run from here after the install.
BUILD_DIR="build/tests"

section() { printf '\n== %s\n' "$*"; }

# ---- system packages -------------------------------------------------------------------------
if ! dpkg -s libgtest-dev >/dev/null 2>&1; then
  section "installing libgtest-dev (GoogleTest)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y libgtest-dev
fi

# ---- build and install -----------------------------------------------------------------------
section "building and installing flashdelta with its C++ tests (into $BUILD_DIR)"
start=$SECONDS
FLASHDELTA_BUILD_TESTS=ON SKBUILD_BUILD_DIR="$BUILD_DIR" \
  "$PYTHON" -m pip install --disable-pip-version-check ".[test]"
echo "build and install took $((SECONDS - start)) s"
"$PYTHON" -c "import flashdelta._C as c; print('flashdelta._C build_info:', c.build_info())"

# ---- tests -----------------------------------------------------------------------------------
cpp_status=0
python_status=0

section "C++ tests (ctest)"
ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error -j2 || cpp_status=$?

section "Python tests (pytest)"
# pytest exits 5 when it collects no test: that counts as a failure here, like any non-zero code.
"$PYTHON" -m pytest tests/python -q -rs || python_status=$?

section "summary"
echo "C++ tests (ctest):     $([ $cpp_status -eq 0 ] && echo passed || echo "FAILED (exit $cpp_status)")"
echo "Python tests (pytest): $([ $python_status -eq 0 ] && echo passed || echo "FAILED (exit $python_status)")"
if [ $cpp_status -ne 0 ] || [ $python_status -ne 0 ]; then
  exit 1
fi
