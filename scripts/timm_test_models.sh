#!/usr/bin/env bash
# timm's own tests/test_models.py, from the sdist of the installed timm, on every smallvit model (make timm-tests).
# The sdist is downloaded once into the cache; without a reachable package index the run is skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath -s "${PYTHON:-.venv/bin/python}")
REPO=$PWD
VERSION=$("$PY" -c 'import timm; print(timm.__version__)')
CACHE=${SMALLVIT_CACHE:-$HOME/.cache/timm_smallvit}/timm-sdist
SRC="$CACHE/timm-$VERSION"
if [ ! -f "$SRC/tests/test_models.py" ]; then
    mkdir -p "$CACHE"
    if ! "$PY" -m pip download --quiet --no-deps --no-binary :all: "timm==$VERSION" -d "$CACHE" 2>/dev/null; then
        echo "timm-tests: skipped: the timm $VERSION sdist could not be downloaded (no package index reachable)"
        exit 0
    fi
    tar -xzf "$CACHE/timm-$VERSION.tar.gz" -C "$CACHE"
fi
# run from the sdist's folder for its pytest config, with the installed timm (not the sdist's copy) first on the path
cd "$SRC"
exec env PYTHONPATH="$REPO/scripts" "$PY" -P -m pytest -p timm_test_models_plugin -q -p no:cacheprovider \
    tests/test_models.py -k "smallvit or depth2_vit_oracle" "$@"
