#!/usr/bin/env bash
# Browser test of nb_offload's widgets: JupyterLab (and Notebook 7, for the saved notebook reopened
# there) on localhost, driven by headless Chromium (Debian's, through playwright-core). CPU only.
# Exit status: 0 when every check passed.
#
#   tests/browser/run.sh            # uses .venv (or $VENV); screenshots in tests/browser/out/
#
# Sets itself up: the Python packages the widgets, JupyterLab and Notebook 7 need (into the venv),
# the front-end bundle if missing, playwright-core (npm ci), and Chromium (apt, when root).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
OUT="${OUT:-$HERE/out}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

say() { echo "[browser-test] $*"; }

# -- set up ---------------------------------------------------------------------------------
if ! "$PY" -c "import jupyterlab, notebook, anywidget, ipywidgets, nbformat, plotly, ipykernel" 2>/dev/null; then
    say "installing JupyterLab, Notebook 7, the widget packages and plotly into $VENV"
    "$PY" -m pip install -q "jupyterlab>=4" "notebook>=7" "anywidget>=0.9" "ipywidgets>=8" "plotly>=5.20" ipykernel
fi
# the settings make lab gives this venv's JupyterLab: widget state saved with the notebook (Notebook 7
# reads the same folder: its app_settings_dir is JupyterLab's app dir's settings/)
SETTINGS="$("$PY" -c "import sys; print(sys.prefix)")/share/jupyter/lab/settings"
mkdir -p "$SETTINGS"
[ -f "$SETTINGS/overrides.json" ] || cp "$ROOT/jupyter/overrides.json" "$SETTINGS/"
if [ ! -f "$ROOT/nb_offload/widgets/static/widget.js" ]; then
    "$ROOT/labextension/build.sh"
fi
if [ -z "$CHROMIUM" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Chromium (apt)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        CHROMIUM="$(command -v chromium)"
    else
        say "no Chromium found: install it (apt-get install chromium) or set CHROMIUM=/path/to/chromium"
        exit 2
    fi
fi
if [ ! -d "$HERE/node_modules/playwright-core" ]; then
    (cd "$HERE" && npm ci --no-audit --no-fund --silent)
fi

# -- fixtures and server --------------------------------------------------------------------
WORK="$(mktemp -d)"
SERVER_PID="" NB_SERVER_PID=""
stop() {
    if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
        kill "$1" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$1" 2>/dev/null || true
    fi
}
cleanup() {
    stop "$SERVER_PID"
    stop "$NB_SERVER_PID"
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

mkdir -p "$OUT" "$WORK/nb"
rm -f "$OUT"/*.png
# the teaching notebooks, with the benchmark runs they read (../benchmarks/runs from notebooks/)
mkdir -p "$WORK/nb/notebooks" "$WORK/nb/benchmarks"
cp "$ROOT"/notebooks/*.ipynb "$WORK/nb/notebooks/"
cp -r "$ROOT/benchmarks/runs" "$WORK/nb/benchmarks/"
say "making the tiny model and the notebook"
BUSY_SECONDS="$(PYTHONPATH="$ROOT" "$PY" "$HERE/make_notebook.py" "$WORK/nb" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['busy_seconds'])")"

free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
PORT="$(free_port)"
NB_PORT="$(free_port)"
while [ "$NB_PORT" = "$PORT" ]; do NB_PORT="$(free_port)"; done
TOKEN="$("$PY" -c "import secrets; print(secrets.token_hex(16))")"
# A private Jupyter home: no user settings, workspaces or kernels leak in or out.
export JUPYTER_CONFIG_DIR="$WORK/config" JUPYTER_RUNTIME_DIR="$WORK/runtime" IPYTHONDIR="$WORK/ipython"
export JUPYTERLAB_SETTINGS_DIR="$WORK/settings" JUPYTERLAB_WORKSPACES_DIR="$WORK/workspaces"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# No "get notified about Jupyter news?" toast over the page.
mkdir -p "$JUPYTERLAB_SETTINGS_DIR/@jupyterlab/apputils-extension"
echo '{"fetchNews": "false", "checkForUpdates": false}' \
    >"$JUPYTERLAB_SETTINGS_DIR/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
ROOT_FLAG=""
[ "$(id -u)" = 0 ] && ROOT_FLAG="--allow-root"     # CI containers run as root
say "starting JupyterLab on 127.0.0.1:$PORT"
# shellcheck disable=SC2086
"$PY" -m jupyter lab $ROOT_FLAG --no-browser --ip=127.0.0.1 --port="$PORT" --ServerApp.port_retries=0 \
    --IdentityProvider.token="$TOKEN" --ServerApp.root_dir="$WORK/nb" \
    --LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate \
    --LabApp.extension_manager=readonly --LabApp.expose_app_in_browser=True \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
# Notebook 7 on the same folder, for the saved notebook reopened there: its kernels are its own, so
# none of them ever held the dashboards' widget models.
say "starting Notebook 7 on 127.0.0.1:$NB_PORT"
# shellcheck disable=SC2086
"$PY" -m jupyter notebook $ROOT_FLAG --no-browser --ip=127.0.0.1 --port="$NB_PORT" --ServerApp.port_retries=0 \
    --IdentityProvider.token="$TOKEN" --ServerApp.root_dir="$WORK/nb" \
    --JupyterNotebookApp.expose_app_in_browser=True \
    >"$WORK/notebook-server.log" 2>&1 &
NB_SERVER_PID=$!
wait_up() {   # port, pid, log, name
    for _ in $(seq 120); do
        if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/api/status?token=$TOKEN', timeout=2)" 2>/dev/null; then
            return 0
        fi
        kill -0 "$2" 2>/dev/null || { cat "$3"; say "$4 did not start"; exit 1; }
        sleep 0.5
    done
    cat "$3"; say "$4 did not answer"; exit 1
}
wait_up "$PORT" "$SERVER_PID" "$WORK/server.log" JupyterLab
wait_up "$NB_PORT" "$NB_SERVER_PID" "$WORK/notebook-server.log" "Notebook 7"

# -- the test ---------------------------------------------------------------------------------
status=0
LAB_URL="http://127.0.0.1:$PORT" NB_URL="http://127.0.0.1:$NB_PORT" LAB_TOKEN="$TOKEN" CHROMIUM="$CHROMIUM" OUT="$OUT" BUSY_SECONDS="$BUSY_SECONDS" \
    node "$HERE/test.mjs" || status=$?
if [ "$status" = 0 ]; then
    "$PY" "$HERE/check_saved.py" "$WORK/nb" || status=$?
fi
if [ "$status" != 0 ]; then
    say "JupyterLab server log (last 40 lines):"
    tail -n 40 "$WORK/server.log"
    say "Notebook 7 server log (last 40 lines):"
    tail -n 40 "$WORK/notebook-server.log"
fi
say "screenshots in $OUT"
exit "$status"
