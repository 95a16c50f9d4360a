#!/usr/bin/env bash
# cppcheck over the C core and bindings (host/), with the checks and the
# suppressions this project commits to (scripts/cppcheck.supp). Exits
# non-zero on any finding. One configuration is checked, the fullest: MPI,
# CUDA and fault injection on, as the preprocessor branches of a CI build.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cppcheck >/dev/null || { echo "cppcheck not installed (apt-get install cppcheck)"; exit 1; }
cppcheck --std=c11 --enable=warning,style,performance,portability \
    --error-exitcode=1 --inline-suppr --quiet \
    --suppressions-list=scripts/cppcheck.supp \
    -D__GNUC__ -D_GNU_SOURCE -DWS_HAVE_MPI=1 -DWS_HAVE_CUDA=1 -DWS_FAULT_INJECTION=1 \
    -DWSHOST_VERSION='"0"' -I host \
    -D'Py_RETURN_NONE=return Py_None' -D'Py_RETURN_FALSE=return Py_False' \
    -D'Py_BEGIN_ALLOW_THREADS={' -D'Py_END_ALLOW_THREADS=}' \
    --template='{file}:{line}: {severity} ({id}): {message}' \
    host/
echo "cppcheck: host/ clean"
