#!/usr/bin/env bash
# normlab's two entry points, runnable on a fresh machine (no venv, no torch needed beforehand):
#   ./run.sh demo    the main job (for now: each norm on the classic 3x3 example vs torch.nn)
#   ./run.sh test    the test suite (what CI runs)
# The first run installs what is missing into the current Python: torch (the CPU build
# torch==2.13.0 when no torch is present; an existing torch, e.g. a CUDA build, is kept) and
# normlab itself in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
    if ! "$PY" -c "import normlab, pytest, hypothesis" 2>/dev/null \
        || [ "$("$PY" -c 'import normlab, os; print(os.path.dirname(os.path.dirname(os.path.abspath(normlab.__file__))))')" != "$PWD" ]; then
        "$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) install; exec "$PY" -m normlab demo "$@" ;;
    test) install; exec "$PY" -m pytest --doctest-modules normlab tests "$@" ;;
    *) echo "usage: ./run.sh demo | test [pytest args]" >&2; exit 2 ;;
esac
