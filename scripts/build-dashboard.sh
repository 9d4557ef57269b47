#!/usr/bin/env bash
# Builds the dashboard (dashboard/ -> dashboard/build/, served by the control plane at /) with
# Debian's node and npm and packages from the npm registry only (dashboard/package-lock.json).
# Idempotent and fast when nothing changed: the build is stamped with a hash of its sources and
# node_modules with a hash of the lockfile; a matching stamp skips the step. npm runs with
# --ignore-scripts (no package's install script runs, so none can phone home; esbuild finds
# its platform binary without its own). The new build is swapped in whole, so a running
# control plane never serves a half-written one.
set -euo pipefail
cd "$(dirname "$0")/../dashboard"

sources() { { find src -type f; printf '%s\n' index.html vite.config.js package.json package-lock.json .npmrc; } | LC_ALL=C sort; }
hash=$(sources | xargs sha256sum | sha256sum | cut -c1-16)
if [ -f build/index.html ] && [ "$(cat build/.nestbox-stamp 2>/dev/null)" = "$hash" ]; then
  exit 0
fi

if ! command -v npm >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    bash ../scripts/install-system-deps.sh
  else
    echo "npm is missing: run 'make system-deps' as root (Debian's nodejs and npm)" >&2
    exit 1
  fi
fi

export SCARF_ANALYTICS=false npm_config_update_notifier=false
lock=$(sha256sum package-lock.json | cut -c1-16)
if [ "$(cat node_modules/.nestbox-lock 2>/dev/null)" != "$lock" ]; then
  echo "dashboard: npm ci"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$lock" > node_modules/.nestbox-lock
fi

echo "dashboard: vite build"
rm -rf build.new build.old
node node_modules/vite/bin/vite.js build --outDir build.new --logLevel warn
echo "$hash" > build.new/.nestbox-stamp
if [ -d build ]; then mv build build.old; fi
mv build.new build
rm -rf build.old
