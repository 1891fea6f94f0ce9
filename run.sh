#!/usr/bin/env bash
# normlab's two entry points, runnable on a fresh machine (no venv, no torch needed beforehand):
#   ./run.sh lab     the main job: `normlab lab --quick`, the classic normalization experiments
#                    on bundled data, written as an HTML report to normlab-lab/index.html
#   ./run.sh test    the test suite (what CI runs)
# The first run installs what is missing into the current Python: torch (the CPU build
# torch==2.13.0 when no torch is present; an existing torch, e.g. a CUDA build, is kept) and
# normlab itself in editable mode with its lab and test extras (matplotlib, scikit-learn, rich;
# pytest, pytest-xdist, hypothesis, and triton on Linux x86_64 for its CPU interpreter).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
    if ! "$PY" -c "import normlab, pytest, xdist, hypothesis, matplotlib, sklearn, rich, platform
if platform.system() == 'Linux' and platform.machine() == 'x86_64': import triton" 2>/dev/null \
        || [ "$("$PY" -c 'import normlab, os; print(os.path.dirname(os.path.dirname(os.path.abspath(normlab.__file__))))')" != "$PWD" ]; then
        "$PY" -m pip install -q --disable-pip-version-check -e ".[test,lab]"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    lab) install; exec "$PY" -m normlab lab --quick "$@" ;;
    demo) install; exec "$PY" -m normlab demo "$@" ;;
    # tests/ and the doctests of normlab (testpaths, --doctest-modules: pyproject.toml), one
    # pytest worker per core (pytest-xdist): 4-5 minutes on 2 cores instead of 10+
    test) install; exec "$PY" -m pytest -n auto "$@" ;;
    *) echo "usage: ./run.sh lab [normlab lab args] | test [pytest args] | demo" >&2; exit 2 ;;
esac
