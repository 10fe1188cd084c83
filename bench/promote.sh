#!/usr/bin/env bash
# Promotion benchmark (issue 6): `ferry promote` of a fleet vs `skopeo copy` of each image,
# in the same run, against the same warm registries. See bench/README.md, "Promotion".
#
#   bench/promote.sh [IMAGES] [LAYER_MB]      (default 24 images, 2 MB own layer each)
#
# Builds a fleet with ferry (FROM scratch; one 4 MB base layer shared by every image and one
# layer of its own), publishes it into a "staging" namespace of a local registry with skopeo,
# warms both tools up once (untimed), then repeats, each time into new namespaces:
#   1. ferry promote --from staging --to prodN     (one process, every image and tag)
#   2. skopeo copy staging -> skopeoN, once per image and destination tag
# in alternating order; then `ferry promote` again (nothing to do); then the same copies
# across two registry processes (bytes streamed). Prints medians, every run, and the ratios,
# then counts each tool's requests in one more run against a registry that logs them.
#
# Both tools do the same work: every image of the fleet lands in another repository of the
# same registry, with its blobs mounted (skopeo mounts too), under the same tags. skopeo has
# no way to put two tags in one run, so its second tag is a second copy from the first tag
# (the cheapest way: every blob is found in place, only the manifest is written).
#
# Knobs (environment):
#   BENCH_REPS=N            timed repetitions (default 5)
#   BENCH_TAGS=1|2          destination tags per image: {version} (1) or {version} and
#                           latest (2, default)
#   BENCH_STORAGE=disk|tmpfs  where the registries keep their data: under $TMPDIR (default)
#                           or /dev/shm. Both tools use the same registries either way.
#   FERRY=PATH              the ferry binary; default: `cargo build --release`, then
#                           target/release/ferry
#   FERRY_BASELINE=PATH     another ferry binary (e.g. an older build) timed in the same runs,
#                           into namespaces of its own
#   BENCH_KEEP=1            keep the work directory
# Needs: docker-registry (CNCF distribution), skopeo, python3, cargo (unless FERRY is set).
set -euo pipefail
shopt -s inherit_errexit

IMAGES=${1:-24}
LAYER_MB=${2:-2}
REPS=${BENCH_REPS:-5}
TAGS=${BENCH_TAGS:-2}
STORAGE=${BENCH_STORAGE:-disk}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
case $TAGS in 1 | 2) ;; *) echo "BENCH_TAGS must be 1 or 2" >&2; exit 2 ;; esac
case $STORAGE in disk | tmpfs) ;; *) echo "BENCH_STORAGE must be disk or tmpfs" >&2; exit 2 ;; esac
if [ -z "${FERRY:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet --bin ferry)
    FERRY=$ROOT/target/release/ferry
fi
[ -x "$FERRY" ] || { echo "no ferry binary at $FERRY" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-promote-bench.XXXXXX")
if [ "$STORAGE" = tmpfs ]; then
    DATA=$(mktemp -d /dev/shm/ferry-promote-bench.XXXXXX)
else
    DATA=$WORK/data
fi
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [ -z "${BENCH_KEEP:-}" ]; then
        rm -rf "$WORK" "$DATA"
    else
        echo "kept $WORK and $DATA" >&2
    fi
}
trap cleanup EXIT

# Image numbers, two digits at least (img00 …), whatever the fleet's size.
ids() { seq -f '%02g' 0 $((IMAGES - 1)); }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry NAME [ROOTDIR] [access]: a registry on a free port (REGISTRY_HOST, REGISTRY_PID).
# Requests are logged only when asked: logging costs the registry CPU on every request.
start_registry() {
    local name=$1 root=${2:-$DATA/$1} accesslog=true port
    [ "${3:-}" = access ] && accesslog=false
    port=$(free_port)
    mkdir -p "$WORK/$name" "$root"
    cat >"$WORK/$name/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: $accesslog
storage:
  filesystem:
    rootdirectory: $root
http:
  addr: 127.0.0.1:$port
EOF
    docker-registry serve "$WORK/$name/config.yml" >"$WORK/$name/log" 2>&1 &
    REGISTRY_PID=$!
    PIDS+=("$REGISTRY_PID")
    for _ in $(seq 100); do
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.05
    done
    REGISTRY_HOST="127.0.0.1:$port"
}

now() { date +%s.%N; }
seconds() { python3 -c "print(f'{$2 - $1:.3f}')"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }
ratio() { python3 -c "print(f'{$1 / $2:.3f}')"; }

start_registry one
ONE=$REGISTRY_HOST
start_registry two
TWO=$REGISTRY_HOST

# The fleet.
FLEET=$WORK/fleet
mkdir -p "$FLEET"
head -c $((4 * 1024 * 1024)) /dev/urandom >"$WORK/base.bin"
if [ "$TAGS" = 2 ]; then DST_TAGS='["{version}", "latest"]'; else DST_TAGS='["{version}"]'; fi
{
    echo '[project]'
    echo 'name = "bench"'
    echo
    for i in $(ids); do
        echo "[images.img$i]"
        echo "context = \"img$i\""
        echo 'version = "1.0.0"'
        echo
    done
    echo '[environments.staging]'
    echo "registry = \"$ONE/staging\""
    echo 'tags = ["{version}-rc"]'
    echo
    # One destination per run: every timed promotion copies the whole fleet.
    for n in warm count $(seq "$REPS") $(seq -f 'base%g' "$REPS"); do
        echo "[environments.prod$n]"
        echo "registry = \"$ONE/prod$n\""
        echo "tags = $DST_TAGS"
        echo 'promote_from = "staging"'
        echo
        echo "[environments.remote$n]"
        echo "registry = \"$TWO/prod$n\""
        echo "tags = $DST_TAGS"
        echo
    done
} >"$FLEET/images.toml"
for i in $(ids); do
    mkdir -p "$FLEET/img$i"
    cp "$WORK/base.bin" "$FLEET/img$i/base.bin"
    head -c $((LAYER_MB * 1024 * 1024)) /dev/urandom >"$FLEET/img$i/own.bin"
    printf 'FROM scratch\nCOPY base.bin /base.bin\nCOPY own.bin /own.bin\n' >"$FLEET/img$i/Dockerfile"
done
STORE=$WORK/store
"$FERRY" -q -C "$FLEET" --store "$STORE" build >/dev/null

# Publish into staging with skopeo (the store is an OCI layout).
for i in $(ids); do
    skopeo --insecure-policy copy -q --dest-tls-verify=false \
        "oci:$STORE:img$i" "docker://$ONE/staging/bench/img$i:1.0.0-rc"
done

ferry_promote() { # destination environment [binary]
    "${2:-$FERRY}" -q -C "$FLEET" --store "$STORE" ${FERRY_ARGS:-} promote --from staging --to "$1" >/dev/null
}
# skopeo_each SOURCE DESTINATION NAMESPACE: every image from SOURCE/staging into
# DESTINATION/NAMESPACE under the same tags as ferry's. skopeo gets a fresh home per pass, as
# in a CI job (no blob-location cache from an earlier pass; within the pass it learns where
# blobs are, as it would).
skopeo_each() {
    export HOME=$WORK/home/$2-$3 XDG_DATA_HOME=$WORK/home/$2-$3/.local/share
    mkdir -p "$HOME"
    local i dst
    for i in $(ids); do
        dst=docker://$2/$3/bench/img$i
        skopeo --insecure-policy copy -q --src-tls-verify=false --dest-tls-verify=false \
            "docker://$1/staging/bench/img$i:1.0.0-rc" "$dst:1.0.0"
        if [ "$TAGS" = 2 ]; then
            skopeo --insecure-policy copy -q --src-tls-verify=false --dest-tls-verify=false \
                "$dst:1.0.0" "$dst:latest"
        fi
    done
}
timed() { # command... -> prints seconds
    local t0 t1
    t0=$(now)
    "$@"
    t1=$(now)
    seconds "$t0" "$t1"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# Warm up both tools and the registry (page cache, binaries, the registry's first
# requests) into namespaces that are not timed.
ferry_promote prodwarm
skopeo_each "$ONE" "$ONE" skopeowarm

# pair RUN FERRY_ENV SKOPEO_DEST: one timed run of each tool (f and s, in seconds), into
# fresh namespaces; who goes first alternates with RUN, so neither always runs right
# after the other.
pair() {
    if [ $(($1 % 2)) = 1 ]; then
        f=$(timed ferry_promote "$2")
        s=$(timed skopeo_each "$ONE" "$3" "skopeo$1")
    else
        s=$(timed skopeo_each "$ONE" "$3" "skopeo$1")
        f=$(timed ferry_promote "$2")
    fi
}

F1=() S1=() R1=() NOOP=() F2=() S2=() R2=() B1=() RB1=()
for r in $(seq "$REPS"); do
    pair "$r" "prod$r" "$ONE"
    F1+=("$f") S1+=("$s") R1+=("$(ratio "$f" "$s")")
    if [ -n "${FERRY_BASELINE:-}" ]; then
        b=$(timed ferry_promote "prodbase$r" "$FERRY_BASELINE")
        B1+=("$b") RB1+=("$(ratio "$b" "$s")")
    fi
done
for r in $(seq "$REPS"); do
    NOOP+=("$(timed ferry_promote "prod$REPS")")
done
for r in $(seq "$REPS"); do
    pair "$r" "remote$r" "$TWO"
    F2+=("$f") S2+=("$s") R2+=("$(ratio "$f" "$s")")
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# Same digests under every tag, as skopeo reads them.
digest() { skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$1"; }
for i in $(ids | sed -n '1p;$p'); do
    want=$(digest "$ONE/staging/bench/img$i:1.0.0-rc")
    for ref in "$ONE/prod1/bench/img$i:1.0.0" "$ONE/skopeo1/bench/img$i:1.0.0" \
        "$TWO/prod1/bench/img$i:1.0.0" "$TWO/skopeo1/bench/img$i:1.0.0"; do
        got=$(digest "$ref")
        [ "$got" = "$want" ] || { echo "digest mismatch: $ref is $got, staging has $want" >&2; exit 1; }
        if [ "$TAGS" = 2 ]; then
            got=$(digest "${ref%:1.0.0}:latest")
            [ "$got" = "$want" ] || { echo "digest mismatch: ${ref%:1.0.0}:latest" >&2; exit 1; }
        fi
    done
done

# Requests: one more run of each tool, untimed, through a second registry process that
# serves the same storage and logs every request.
start_registry count "$DATA/one" access
COUNT=$REGISTRY_HOST
mkdir -p "$WORK/countfleet"
sed -e "s#$ONE/#$COUNT/#g" "$FLEET/images.toml" >"$WORK/countfleet/images.toml"
requests() { grep -c '"[A-Z]* /v2/' "$WORK/count/log" || true; }
writes() { grep -c -E '"(PUT|POST|PATCH|DELETE) /v2/' "$WORK/count/log" || true; }
"$FERRY" -q -C "$WORK/countfleet" --store "$STORE" promote --from staging --to prodcount >/dev/null
FERRY_REQ=$(requests) FERRY_WR=$(writes)
skopeo_each "$COUNT" "$COUNT" skopeocount
SKOPEO_REQ=$(($(requests) - FERRY_REQ)) SKOPEO_WR=$(($(writes) - FERRY_WR))

FS=$( (findmnt -n -o FSTYPE -T "$DATA" 2>/dev/null || stat -f -c %T "$DATA") | head -1)
echo "fleet: $IMAGES images of $((4 + LAYER_MB)) MB (a 4 MB base layer shared), $TAGS destination tag(s) each"
echo "registries: CNCF distribution $(docker-registry --version | awk '{print $3}'), storage on $STORAGE ($FS); skopeo $(skopeo --version | awk '{print $3}')"
echo "machine: $(nproc) cores, load average $LOAD_BEFORE before, $LOAD_AFTER after; $REPS runs each"
row() { printf '%-46s %9s   %s\n' "$1" "$2" "$3"; }
row "" "median" "each run"
row "one registry:   ferry promote (s)" "$(median "${F1[@]}")" "${F1[*]}"
row "one registry:   skopeo copy, each image (s)" "$(median "${S1[@]}")" "${S1[*]}"
row "one registry:   ferry / skopeo (target <= 0.1)" "$(median "${R1[@]}")" "${R1[*]}"
if [ -n "${FERRY_BASELINE:-}" ]; then
    row "one registry:   baseline ferry promote (s)" "$(median "${B1[@]}")" "${B1[*]}"
    row "one registry:   baseline / skopeo" "$(median "${RB1[@]}")" "${RB1[*]}"
fi
row "one registry:   ferry promote again, no-op (s)" "$(median "${NOOP[@]}")" "${NOOP[*]}"
row "two registries: ferry promote (s)" "$(median "${F2[@]}")" "${F2[*]}"
row "two registries: skopeo copy, each image (s)" "$(median "${S2[@]}")" "${S2[*]}"
row "two registries: ferry / skopeo" "$(median "${R2[@]}")" "${R2[*]}"
echo "requests, one registry, one run: ferry $FERRY_REQ ($FERRY_WR writes), skopeo $SKOPEO_REQ ($SKOPEO_WR writes)"
