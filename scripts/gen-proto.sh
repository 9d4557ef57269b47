#!/usr/bin/env bash
# Regenerates the protobuf-py messages and Connect stubs from proto/ into src/nestbox/protocol/gen.
# The output is committed, so a fresh machine has working stubs without running this.
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/nestbox/protocol/gen
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
protos=$(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)
(cd proto && PATH="$PWD/../.venv/bin:$PATH" ../.venv/bin/python -m grpc_tools.protoc -I. \
  --py_out="$tmp" --connectrpc_out="$tmp" $protos)
rm -rf "$out"
mkdir -p "$out"
cp -r "$tmp"/. "$out"/
echo '"""Generated from proto/ by scripts/gen-proto.sh. Do not edit."""' > "$out/__init__.py"
