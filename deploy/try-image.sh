#!/usr/bin/env bash
# Build the worker image without any container registry and run it as Kubernetes would, against
# a local stack: read-only root filesystem, every capability dropped, no new privileges, user
# 10001, a tmpfs as its state directory. Passes when /readyz says ready, a user created from the
# host is synced by the containerised worker, and `podman stop` (SIGTERM) ends it with exit 0.
#
#   sudo apt-get install -y podman debootstrap   # buildah comes with podman
#   deploy/try-image.sh
#
# No base image can be pulled offline: the script makes one with debootstrap (Debian bookworm,
# minbase) from the machine's Debian mirror and imports it as localhost/debian:bookworm-minbase.
# Environment:
#   DEBIAN_MIRROR   where debootstrap fetches from (default http://deb.debian.org/debian)
#   CA_BUNDLE       a CA bundle to trust for PyPI inside the build (default: the host's bundle,
#                   for machines that reach PyPI through a TLS-intercepting proxy; empty: none)
#   PODMAN_GLOBAL   flags before podman's command, e.g. "--runtime runc" where crun cannot run
#                   (cgroup v1/v2 hybrid hosts)
#   PODMAN_LIMITS   flags for build/run, e.g. "--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
#                   where the sandbox refuses podman's default rlimits
#   IMAGE           the tag to build (default localhost/spicesync:dev)
#   WORKER_ENV      the container's SPICESYNC_ENV (default production, which runs here only with
#                   its loud plaintext opt-out: the local stack's SpiceDB and PostgreSQL links
#                   are plaintext on loopback)
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/debian:bookworm-minbase
IMAGE=${IMAGE:-localhost/spicesync:dev}
WORKER_ENV=${WORKER_ENV:-production}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
read -r -a GLOBAL <<< "${PODMAN_GLOBAL:-}"
read -r -a LIMITS <<< "${PODMAN_LIMITS:-}"
podman() { command podman "${GLOBAL[@]}" "$@"; }

work=$(mktemp -d /tmp/spicesync-image.XXXXXX)
state="$work/state"
container=""
forwarder=""
cleanup() {
    [[ -n "$forwarder" ]] && kill "$forwarder" 2> /dev/null || true
    [[ -n "$container" ]] && podman rm -f "$container" > /dev/null 2>&1 || true
    SPICESYNC_STATE_DIR="$state" .venv/bin/spicesync stack down > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { .venv/bin/python -c 'from spicesync.stack.processes import free_port; print(free_port())'; }

if ! podman image exists "$BASE"; then
    echo "== making $BASE with debootstrap from $MIRROR"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" > "$work/debootstrap.log"
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | podman import - "$BASE" > /dev/null
    rm -rf "$work/rootfs"
fi

echo "== hadolint"
.venv/bin/hadolint Dockerfile

echo "== building $IMAGE"
build=(build "${LIMITS[@]}" --format docker --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE")
if [[ -n "$CA_BUNDLE" ]]; then
    build+=(-v "$CA_BUNDLE:/run/ca.crt:ro" --build-arg CA_BUNDLE=/run/ca.crt)
fi
podman "${build[@]}" . > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
podman image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}} {{.Size}}'

echo "== local stack (free ports, state in $state)"
export SPICESYNC_STATE_DIR="$state"
export SPICESYNC_TEMPORAL_PORT=$(free_port) SPICESYNC_TEMPORAL_UI_PORT=$(free_port)
export SPICESYNC_SPICEDB_PORT=$(free_port) SPICESYNC_CODEC_PORT=$(free_port)
export SPICESYNC_TASK_QUEUE="image-$(basename "$work")"
.venv/bin/spicesync stack up > /dev/null
health="127.0.0.1:$(free_port)"
# The stack's PostgreSQL listens on a Unix socket in its state directory, which the container's
# user cannot reach: forward a TCP port to it for the container (the fault suite's proxy).
pg_port=$(free_port)
db_url=$(grep '^DATABASE_URL=' "$state/stack.env" | cut -d= -f2-)
.venv/bin/python - "$db_url" "$pg_port" > "$work/forwarder.log" 2>&1 <<'PY' &
import asyncio, sys
from chaos.proxy import FaultProxy, postgres_route

async def forward() -> None:
    target, _ = postgres_route(sys.argv[1])
    async with FaultProxy(target, listen_port=int(sys.argv[2])):
        await asyncio.Event().wait()

asyncio.run(forward())
PY
forwarder=$!
container_db_url=$(.venv/bin/python -c 'import sys; from chaos.proxy import postgres_route
print(postgres_route(sys.argv[1])[1](int(sys.argv[2])))' "$db_url" "$pg_port")

run_args=("${LIMITS[@]}" --network host --read-only --cap-drop ALL \
    --security-opt no-new-privileges --user 10001:10001 \
    --tmpfs /var/lib/spicesync:rw,size=16m,U --tmpfs /tmp:rw,size=16m \
    --env-file "$state/stack.env" -e "SPICESYNC_ENV=$WORKER_ENV" \
    -e SPICESYNC_ALLOW_PLAINTEXT_IN_PRODUCTION=i-understand \
    -e "DATABASE_URL=$container_db_url" -e SPICESYNC_TASK_QUEUE)

echo "== the Jobs' commands in the image: migrate, setup-namespace"
podman run --rm "${run_args[@]}" "$IMAGE" migrate 2>&1 | grep -v '^{' || true
podman run --rm "${run_args[@]}" "$IMAGE" setup-namespace > "$work/setup-namespace.log" 2>&1 \
    || { cat "$work/setup-namespace.log"; exit 1; }
tail -3 "$work/setup-namespace.log"

echo "== worker container (read-only root, no capabilities, user 10001)"
# The stack's settings as the deployment's environment: production mode, the image's defaults
# for everything else. Host networking only so the container reaches the stack on 127.0.0.1.
container=$(podman run -d "${run_args[@]}" \
    -e "SPICESYNC_HEALTH_ADDRESS=$health" -e SPICESYNC_METRICS_ADDRESS= "$IMAGE")

ready=""
for _ in $(seq 120); do
    if ready=$(.venv/bin/python -c "import urllib.request as u; print(u.urlopen('http://$health/readyz', timeout=5).read().decode())" 2> /dev/null); then
        break
    fi
    sleep 1
done
echo "/readyz: ${ready:-no answer}"
[[ "$ready" == *'"status": "ready"'* ]] || { podman logs "$container" | tail -20; exit 1; }

echo "== a user created from the host, synced by the container"
outcome=$(.venv/bin/spicesync users create --email "image-$RANDOM@example.com" --name Image \
    --org image-org --role admin)
echo "$outcome"
[[ "$outcome" == *'"status": "synced"'* ]] || { podman logs "$container" | tail -20; exit 1; }

echo "== podman stop (SIGTERM)"
podman stop --time 60 "$container" > /dev/null
code=$(podman inspect "$container" --format '{{.State.ExitCode}}')
podman logs "$container" 2>&1 | grep -E 'Beginning worker shutdown|worker stopped' || true
echo "exit code: $code"
[[ "$code" == 0 ]]
echo "== image OK"
