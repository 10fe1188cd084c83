#!/usr/bin/env bash
# Promotion benchmark: `ferry promote` of a fleet vs `skopeo copy` of each image.
#
#   bench/promote.sh [IMAGES] [LAYER_MB]      (default 24 images, 2 MB own layer each)
#
# Builds a fleet with ferry (FROM scratch; one base layer shared by every image and one
# layer of its own), publishes it into a "staging" environment of a local registry with
# skopeo, then times, on the same registry:
#   1. ferry promote --from staging --to prod           (one process, every image)
#   2. skopeo copy staging -> another namespace, once per image
#   3. a second `ferry promote` (nothing to do)
# and the same two copies across two registry processes. Prints the times and ratios.
# Needs: docker-registry (CNCF distribution), skopeo, python3, and a ferry binary
# ($FERRY, default target/release/ferry).
set -euo pipefail

IMAGES=${1:-24}
LAYER_MB=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FERRY=${FERRY:-$ROOT/target/release/ferry}
[ -x "$FERRY" ] || { echo "no ferry binary at $FERRY; run cargo build --release" >&2; exit 2; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_registry() { # name -> prints host
    local name=$1 port
    port=$(free_port)
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/$name/data
http:
  addr: 127.0.0.1:$port
EOF
    docker-registry serve "$WORK/$name/config.yml" >"$WORK/$name/log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.05
    done
    REGISTRY_HOST="127.0.0.1:$port"
}

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.3f}')"; }

start_registry one
ONE=$REGISTRY_HOST
start_registry two
TWO=$REGISTRY_HOST

# The fleet.
FLEET=$WORK/fleet
mkdir -p "$FLEET"
head -c $((4 * 1024 * 1024)) /dev/urandom >"$WORK/base.bin"
{
    echo '[project]'
    echo 'name = "bench"'
    echo
    for i in $(seq -w 0 $((IMAGES - 1))); do
        echo "[images.img$i]"
        echo "context = \"img$i\""
        echo 'version = "1.0.0"'
        echo
    done
    cat <<EOF
[environments.staging]
registry = "$ONE/staging"
tags = ["{version}-rc"]

[environments.prod]
registry = "$ONE/prod"
tags = ["{version}", "latest"]
promote_from = "staging"

[environments.remote]
registry = "$TWO/prod"
tags = ["{version}", "latest"]
EOF
} >"$FLEET/images.toml"
for i in $(seq -w 0 $((IMAGES - 1))); do
    mkdir -p "$FLEET/img$i"
    cp "$WORK/base.bin" "$FLEET/img$i/base.bin"
    head -c $((LAYER_MB * 1024 * 1024)) /dev/urandom >"$FLEET/img$i/own.bin"
    printf 'FROM scratch\nCOPY base.bin /base.bin\nCOPY own.bin /own.bin\n' >"$FLEET/img$i/Dockerfile"
done
STORE=$WORK/store
"$FERRY" -q -C "$FLEET" --store "$STORE" build >/dev/null

# Publish into staging with skopeo (the store is an OCI layout).
for i in $(seq -w 0 $((IMAGES - 1))); do
    skopeo --insecure-policy copy -q --dest-tls-verify=false \
        "oci:$STORE:img$i" "docker://$ONE/staging/bench/img$i:1.0.0-rc"
done

# skopeo gets a fresh home, as in a CI job (no blob-location cache from earlier runs).
export HOME=$WORK/home XDG_DATA_HOME=$WORK/home/.local/share
mkdir -p "$HOME"
skopeo_each() { # destination registry and namespace
    for i in $(seq -w 0 $((IMAGES - 1))); do
        skopeo --insecure-policy copy -q --src-tls-verify=false --dest-tls-verify=false \
            "docker://$ONE/staging/bench/img$i:1.0.0-rc" "docker://$1/bench/img$i:1.0.0"
    done
}

t0=$(now); "$FERRY" -q -C "$FLEET" --store "$STORE" ${FERRY_ARGS:-} promote --from staging --to prod >/dev/null 2>"$WORK/promote.log"; t1=$(now)
FERRY_ONE=$(elapsed "$t0" "$t1")
t0=$(now); skopeo_each "$ONE/skopeo"; t1=$(now)
SKOPEO_ONE=$(elapsed "$t0" "$t1")
t0=$(now); "$FERRY" -q -C "$FLEET" --store "$STORE" ${FERRY_ARGS:-} promote --from staging --to prod >/dev/null; t1=$(now)
FERRY_NOOP=$(elapsed "$t0" "$t1")
t0=$(now); "$FERRY" -q -C "$FLEET" --store "$STORE" ${FERRY_ARGS:-} promote --from staging --to remote >/dev/null; t1=$(now)
FERRY_TWO=$(elapsed "$t0" "$t1")
t0=$(now); skopeo_each "$TWO/skopeo"; t1=$(now)
SKOPEO_TWO=$(elapsed "$t0" "$t1")

# Same digests in prod as in staging, as skopeo reads them.
for i in 00 $(printf '%02d' $((IMAGES - 1))); do
    a=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$ONE/staging/bench/img$i:1.0.0-rc")
    b=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$ONE/prod/bench/img$i:1.0.0")
    c=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$TWO/prod/bench/img$i:latest")
    [ "$a" = "$b" ] && [ "$a" = "$c" ] || { echo "digest mismatch for img$i: $a $b $c" >&2; exit 1; }
done

MB=$((4 + LAYER_MB))
echo "fleet: $IMAGES images, ${MB} MB each (4 MB base layer shared), $(nproc) cores"
printf '%-44s %8ss\n' "one registry:  ferry promote" "$FERRY_ONE"
printf '%-44s %8ss\n' "one registry:  skopeo copy of each image" "$SKOPEO_ONE"
printf '%-44s %8s\n'  "one registry:  ratio ferry / skopeo (target <= 0.1)" "$(ratio "$FERRY_ONE" "$SKOPEO_ONE")"
printf '%-44s %8ss\n' "one registry:  ferry promote again (no-op)" "$FERRY_NOOP"
printf '%-44s %8ss\n' "two registries: ferry promote" "$FERRY_TWO"
printf '%-44s %8ss\n' "two registries: skopeo copy of each image" "$SKOPEO_TWO"
printf '%-44s %8s\n'  "two registries: ratio ferry / skopeo" "$(ratio "$FERRY_TWO" "$SKOPEO_TWO")"
