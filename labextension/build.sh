#!/usr/bin/env bash
# Build the widgets' front-end: type-check labextension/src and bundle it with esbuild into
# nb_offload/widgets/static/ (widget.js, widget.css), which the Python widgets load.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x node_modules/.bin/esbuild ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
fi
npm run --silent build
