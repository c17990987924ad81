#!/usr/bin/env bash
# Create a separate virtual environment with circuit-tracer 0.5.0 for bench/compare.py.
#
#   bash bench/circuit_tracer_env.sh [VENV_DIR]        (default: bench/.ct-venv, git-ignored)
#
# circuit-tracer 0.5.0 needs TransformerLens 2 (HookedTransformer), which the project's own
# environment (TransformerLens 4) cannot hold, so it lives in its own venv and bench/ct_runner.py
# runs there as a subprocess. torch is installed first (CPU build, the same release as ours)
# so that pip never resolves a CUDA build. The other pins are the versions found to work:
#   transformer-lens 2.18.0  (circuit-tracer 0.5.0 uses HookedTransformer)
#   transformers 4.57.3      (a release TransformerLens 2.18 accepts)
#   nnsight 0.8.1            (circuit-tracer imports it)
#   numpy 1.26.4             (TransformerLens 2 refuses numpy 2)
#   pyarrow 21.0.0           (newer pyarrow wheels need numpy 2)
# The resolved versions (pip freeze) are written to bench/circuit_tracer_requirements.txt.
# pip's notes about unreadable local index entries are filtered from the output.
# Reuses an existing venv when it already imports circuit_tracer 0.5.0 (pass --force to rebuild).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FORCE=0
VENV=""
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) VENV="$arg" ;;
    esac
done
VENV="${VENV:-$HERE/.ct-venv}"
PYTHON="${PYTHON:-python3}"
REQ="$HERE/circuit_tracer_requirements.txt"

if [[ $FORCE -eq 0 && -x "$VENV/bin/python" ]] && \
   "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("circuit-tracer") != "0.5.0")' 2>/dev/null; then
    echo "[ct-env] $VENV already has circuit-tracer 0.5.0"
else
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo '*' > "$VENV/.gitignore"   # the venv ignores itself (git never sees it)
    pip_install() {
        "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    }
    pip_install --upgrade pip
    pip_install "torch==2.13.0"
    pip_install \
        "circuit-tracer==0.5.0" \
        "transformer-lens==2.18.0" \
        "transformers==4.57.3" \
        "nnsight==0.8.1" \
        "numpy==1.26.4" \
        "pyarrow==21.0.0" \
        "torch==2.13.0"
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
import circuit_tracer, transformer_lens, torch  # noqa: F401  (fails loudly if broken)
for name in ("circuit-tracer", "torch", "transformer-lens", "transformers", "nnsight", "numpy", "pyarrow"):
    print(f"[ct-env] {name}=={m.version(name)}")
EOF

{
    echo "# Resolved by bench/circuit_tracer_env.sh (pip freeze of the circuit-tracer venv)."
    echo "# Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')."
    echo "# Install torch==2.13.0 first, then: pip install -r bench/circuit_tracer_requirements.txt"
    "$VENV/bin/python" -m pip freeze --exclude-editable | LC_ALL=C sort
} > "$REQ"
echo "[ct-env] wrote $REQ"
echo "$VENV"
