#!/usr/bin/env bash
# Installs the two peer toolkits, each in its own virtual environment under bench/peers/.venvs/:
#   .venvs/joey  Joey NMT 2.3.0   (+ importlib_metadata, which it imports without declaring it)
#   .venvs/onmt  OpenNMT-py 3.5.1 (--no-deps: it pins torch<2.3; its other dependencies by hand)
# both on CPU torch 2.13.0. Also makes sure /usr/bin/time exists (peak RSS).
# Idempotent: a toolkit whose environment already works is left alone.
# Usage: bash bench/peers/install.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
# OpenNMT-py 3.5.1's declared dependencies without torch (it imports spacy and fasttext at start-up).
ONMT_DEPS=(configargparse "ctranslate2>=4,<5" "tensorboard>=2.3" flask waitress "pyonmttok>=1.37,<2" pyyaml
           sacrebleu rapidfuzz pyahocorasick fasttext-wheel spacy six)

log() { printf '[install] %s\n' "$*"; }

make_venv() {  # make_venv DIR
    if [[ ! -x "$1/bin/python" ]]; then
        log "creating $1"
        "$PYTHON" -m venv "$1"
        "$1/bin/pip" install -q --upgrade pip wheel
    fi
}

joey_ok() {
    [[ -x "$VENVS/joey/bin/python" ]] &&
        "$VENVS/joey/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.metadata as m, torch, joeynmt.training, joeynmt.prediction  # noqa: F401
assert m.version("joeynmt") == "2.3.0" and torch.__version__.startswith("2.13.0")
PY
}

onmt_ok() {
    [[ -x "$VENVS/onmt/bin/onmt_train" ]] &&
        "$VENVS/onmt/bin/onmt_train" -h >/dev/null 2>&1 &&
        "$VENVS/onmt/bin/onmt_translate" -h >/dev/null 2>&1 &&
        "$VENVS/onmt/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0")' >/dev/null 2>&1
}

if [[ ! -x /usr/bin/time ]]; then
    log "installing GNU time (/usr/bin/time) for peak RSS"
    apt-get update -qq && apt-get install -y -qq time
fi

mkdir -p "$VENVS"

if joey_ok; then
    log "Joey NMT 2.3.0 already installed in $VENVS/joey"
else
    make_venv "$VENVS/joey"
    log "installing Joey NMT 2.3.0 on $TORCH"
    "$VENVS/joey/bin/pip" install -q "$TORCH"
    "$VENVS/joey/bin/pip" install -q "$TORCH" "joeynmt==2.3.0" importlib_metadata
    joey_ok || { echo "Joey NMT does not import; see the pip output above" >&2; exit 1; }
fi

if onmt_ok; then
    log "OpenNMT-py 3.5.1 already installed in $VENVS/onmt"
else
    make_venv "$VENVS/onmt"
    log "installing OpenNMT-py 3.5.1 (--no-deps) on $TORCH, then its other dependencies"
    "$VENVS/onmt/bin/pip" install -q "$TORCH"
    "$VENVS/onmt/bin/pip" install -q --no-deps "OpenNMT-py==3.5.1"
    "$VENVS/onmt/bin/pip" install -q "$TORCH" "${ONMT_DEPS[@]}"
    if ! onmt_ok; then
        echo "onmt_train -h still fails:" >&2
        "$VENVS/onmt/bin/onmt_train" -h 2>&1 | tail -5 >&2
        exit 1
    fi
fi

log "checks:"
"$VENVS/joey/bin/python" -m joeynmt --help 2>/dev/null | sed -n 1p
"$VENVS/onmt/bin/onmt_train" -h 2>/dev/null | sed -n 1p
log "done: Joey NMT in $VENVS/joey, OpenNMT-py in $VENVS/onmt"
