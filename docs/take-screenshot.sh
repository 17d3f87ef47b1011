#!/usr/bin/env bash
# Reproduce docs/stuck-sync-ui.png: a sync held by a frozen SpiceDB, found in the Temporal UI by
# its search attribute. Needs Debian's chromium (apt-get install chromium) and a running stack
# (`spicesync stack up`) with a worker (`spicesync worker &`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
pid=$($bin/spicesync stack status | grep '^# spicedb' | grep -o 'pid=[0-9]*' | cut -d= -f2)
kill -STOP "$pid"                      # SpiceDB stops answering: calls hit their deadline
trap 'kill -CONT "$pid"' EXIT
$bin/spicesync users create --email stuck.demo@example.com --name "Stuck Demo" --org acme --wait start
sleep 8                                # a couple of retries
$bin/spicesync stuck --older-than 3s
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$(mktemp -d)" --window-size=1500,700 --virtual-time-budget=15000 \
  --screenshot=docs/stuck-sync-ui.png \
  "http://127.0.0.1:8233/namespaces/default/workflows?query=SpicesyncStage%3D%22writing_permissions%22"
