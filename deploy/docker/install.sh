#!/bin/sh
# The images' install steps, in one place: both Dockerfiles' build stages run them, and so does
# tests/e2e/test_image_install.py in a fresh venv (CI has no Docker engine). `pip` and
# `python` are the target venv's (first on PATH).
#
#   install.sh torch VERSION [INDEX_URL]
#       torch first and exactly; INDEX_URL: the CPU-only or a CUDA wheel index (empty: pip's own)
#   install.sh package SRC cpu|cuda REQUIRE_DEMO_WEIGHTS
#       the server extra from the sources in SRC, non-editable (no development, media or test
#       packages), then the build-time check: demo weights baked in, torch the build wanted
set -eu

step=${1:-}
[ $# -gt 0 ] && shift
case "$step" in
torch)
    [ $# -ge 1 ] || { echo "usage: install.sh torch VERSION [INDEX_URL]" >&2; exit 2; }
    if [ -n "${2:-}" ]; then
        pip install --index-url "$2" "torch==$1"
    else
        pip install "torch==$1"
    fi
    ;;
package)
    [ $# -eq 3 ] || { echo "usage: install.sh package SRC cpu|cuda REQUIRE_DEMO_WEIGHTS" >&2; exit 2; }
    pip install "$1[server]"
    python "$1/deploy/docker/check_weights.py" --require "$3" --torch "$2"
    ;;
*)
    echo "usage: install.sh torch VERSION [INDEX_URL] | install.sh package SRC cpu|cuda REQUIRE_DEMO_WEIGHTS" >&2
    exit 2
    ;;
esac
