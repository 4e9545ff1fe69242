#!/usr/bin/env bash
# Builds pgnear's container image with podman and smoke-tests it in front
# of a throwaway PostgreSQL 15 primary and streaming replica:
#
#   1. a Debian bookworm rootfs (mmdebstrap, cached) imported as the base;
#   2. the Dockerfile's host target (the host's release binary) with BASE
#      set to it, the image's size printed;
#   3. the image run as the Kubernetes example runs it (host network,
#      read-only root, no capabilities, the config mounted, passwords in
#      the environment), and through it: writes on the primary, reads on
#      the replica, /health, /ready, /metrics, the non-root uid;
#   4. pgbench through it, and its peak RSS (VmHWM);
#   5. a Prometheus scraping it with deploy/prometheus/pgnear-rules.yml:
#      every metric the rules and the dashboard use is in the scrape, every
#      dashboard query returns series, no alert is active while all is well,
#      PgnearNodeDown goes pending when the replica stops and
#      PgnearNoVerifiedPrimary when the primary does, while /health still
#      answers 200 (the liveness probe would not fail);
#   6. SIGTERM (podman stop) with a transaction open: new clients are
#      refused, the open session finishes, the container exits 0.
#
#   bash tests/container/run.sh          # builds pgnear --release if needed
#   PGNEAR_BIN=target/release/pgnear bash tests/container/run.sh
#
# Environment:
#   PGNEAR_BIN            the binary to put in the image (default: cargo
#                         build --release --locked --bin pgnear)
#   PGNEAR_PG_BIN         PostgreSQL binaries (/usr/lib/postgresql/15/bin)
#   PGNEAR_DEPLOY_CACHE   the base rootfs and the Python venv
#                         (~/.cache/pgnear-deploy); the rootfs is made again
#                         when older than 7 days
#   PGNEAR_CONTAINER_LOGS where logs are copied on failure
#                         (/tmp/pgnear-container-logs)
#   KEEP=1                leave the temp dir (everything is still stopped)
#
# Runs as root (podman, and the servers as the postgres OS user). Podman's
# storage and state live in the temp dir and go with it.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PG_BIN="${PGNEAR_PG_BIN:-/usr/lib/postgresql/15/bin}"
LOGS="${PGNEAR_CONTAINER_LOGS:-${TMPDIR:-/tmp}/pgnear-container-logs}"
IMAGE=localhost/pgnear:ci
BASE_IMAGE=localhost/pgnear-base:bookworm
NAME="pgnear-ci-$$"
START_TS=$(date +%s)
PHASE_TS=$START_TS

say() { printf '==> %s\n' "$*"; }
die() { printf 'tests/container/run.sh: FAILED: %s\n' "$*" >&2; exit 1; }
ok() { printf '    ok: %s\n' "$*"; }
# Seconds since the last call, for the timings at the end.
TIMINGS=()
lap() {
    local now
    now=$(date +%s)
    TIMINGS+=("$1: $((now - PHASE_TS))s")
    PHASE_TS=$now
}

[ "$(id -u)" = 0 ] || die "run as root (podman, PostgreSQL through runuser)"
[ -x "$PG_BIN/initdb" ] || die "no PostgreSQL 15 in $PG_BIN (apt-get install postgresql-15)"
id postgres >/dev/null 2>&1 || die "the postgres OS user is missing"
command -v promtool >/dev/null && command -v prometheus >/dev/null \
    || die "prometheus and promtool are required (apt-get install --no-install-recommends prometheus)"

# ---------------------------------------------------------------- installs
need_apt=()
for tool in podman buildah runc mmdebstrap curl; do
    command -v "$tool" >/dev/null || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    say "installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# shellcheck source=tests/deploy/venv.sh
. "$ROOT/tests/deploy/venv.sh"
deploy_venv
lap "installs"

# ---------------------------------------------------------------- binary
if [ -n "${PGNEAR_BIN:-}" ]; then
    PGNEAR="$(cd "$(dirname "$PGNEAR_BIN")" && pwd)/$(basename "$PGNEAR_BIN")"
    [ -x "$PGNEAR" ] || die "PGNEAR_BIN=$PGNEAR_BIN is not executable"
else
    say "cargo build --release --locked --bin pgnear"
    (cd "$ROOT" && cargo build --release --locked --quiet --bin pgnear)
    PGNEAR="$ROOT/target/release/pgnear"
fi
# The image gets the binary without its line tables, as the Dockerfile's
# build stage makes it (17 MB rather than 50).
mkdir -p "$ROOT/target/image"
objcopy --strip-debug "$PGNEAR" "$ROOT/target/image/pgnear"
lap "release binary"

# ---------------------------------------------------------------- temp dir, cleanup
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pgnear-container.XXXXXX")"
chmod 755 "$WORK"
PODMAN_DIR="$WORK/podman"
mkdir -p "$PODMAN_DIR/tmp"
cat >"$PODMAN_DIR/containers.conf" <<EOF
[containers]
# The default rlimits are refused on these machines.
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
# crun fails on this kernel's hybrid cgroups; runc works with cgroupfs.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$PODMAN_DIR/tmp"
EOF
cat >"$PODMAN_DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$PODMAN_DIR/storage"
runroot = "$PODMAN_DIR/run"
EOF
pm() {
    CONTAINERS_CONF="$PODMAN_DIR/containers.conf" CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf" \
        TMPDIR="$PODMAN_DIR/tmp" podman "$@"
}

PROM_PID=""
HOLD_PID=""
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    local rc=$?
    set +e
    exec 7>&- 2>/dev/null
    [ -n "$HOLD_PID" ] && kill "$HOLD_PID" 2>/dev/null
    [ -n "$PROM_PID" ] && { kill "$PROM_PID" 2>/dev/null; wait "$PROM_PID" 2>/dev/null; }
    if [ -d "$PODMAN_DIR/storage" ]; then
        pm container exists "$NAME" && pm logs "$NAME" >"$WORK/pgnear.log" 2>&1
        pm rm -f -t 0 "$NAME" >/dev/null 2>&1
        pm rmi -a -f >/dev/null 2>&1
    fi
    for node in replica primary; do
        [ -f "$WORK/$node/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/$node" -m immediate -w stop >/dev/null 2>&1
    done
    # The overlay driver leaves its storage bind-mounted: unmount what is
    # under the temp dir, deepest first, before removing it.
    findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | while read -r mnt; do umount -l "$mnt"; done
    if [ $rc -ne 0 ]; then
        mkdir -p "$LOGS" && rm -f "$LOGS"/*.log
        cp "$WORK"/*.log "$LOGS"/ 2>/dev/null
        echo "logs (pgnear.log, primary.log, replica.log, prometheus.log, build.log) are in $LOGS"
        [ -s "$WORK/pgnear.log" ] && { echo "pgnear's last log lines:"; tail -20 "$WORK/pgnear.log"; }
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- base image
BASE_TAR="$DEPLOY_CACHE/bookworm-minbase.tar"
if [ -z "$(find "$BASE_TAR" -mtime -7 2>/dev/null)" ]; then
    say "mmdebstrap: a bookworm minbase rootfs with ca-certificates into $BASE_TAR"
    mkdir -p "$DEPLOY_CACHE"
    # As debian:bookworm-slim is made: no docs, man pages or locales; a
    # merged /usr without the usrmerge package (and the perl it pulls in).
    mmdebstrap --variant=minbase --format=tar --include=ca-certificates \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        bookworm "$BASE_TAR.new" >"$WORK/mmdebstrap.log" 2>&1 \
        || { rm -rf "$BASE_TAR.new"; tail -20 "$WORK/mmdebstrap.log"; die "mmdebstrap failed"; }
    mv "$BASE_TAR.new" "$BASE_TAR"
fi
say "podman import $BASE_IMAGE"
pm import --quiet "$BASE_TAR" "$BASE_IMAGE" >/dev/null
lap "base image"

# ---------------------------------------------------------------- image
say "podman build --target host $IMAGE (BASE=$BASE_IMAGE)"
pm build --quiet --pull=never --target host \
    --build-arg BASE="$BASE_IMAGE" --build-arg PGNEAR_BINARY=target/image/pgnear \
    -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; die "podman build failed"; }
image_bytes=$(pm image inspect --format '{{.Size}}' "$IMAGE")
base_bytes=$(pm image inspect --format '{{.Size}}' "$BASE_IMAGE")
binary_bytes=$(stat -c %s "$ROOT/target/image/pgnear")
IMAGE_MB=$(awk "BEGIN { printf \"%.1f\", $image_bytes / 1e6 }")
echo "    image $IMAGE: $IMAGE_MB MB ($(awk "BEGIN { printf \"%.1f\", $base_bytes / 1e6 }") MB base," \
    "$(awk "BEGIN { printf \"%.1f\", $binary_bytes / 1e6 }") MB pgnear)"
[ "$(pm image inspect --format '{{.Config.User}}' "$IMAGE")" = "10001:10001" ] || die "the image's USER is not 10001:10001"
pm run --rm --network none --entrypoint sleep "$IMAGE" 0 || die "the image has no sleep for the preStop hook"
ok "the image's user is 10001:10001, and it has sleep for the preStop hook"
lap "image build"

# ---------------------------------------------------------------- PostgreSQL
read -r PRIMARY_PORT REPLICA_PORT PROXY_PORT ADMIN_PORT PROM_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(5):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)
mkdir -p "$WORK/sock" "$WORK/primary" "$WORK/replica"
chmod 700 "$WORK/primary" "$WORK/replica"
chown postgres: "$WORK/sock" "$WORK/primary" "$WORK/replica"
touch "$WORK/primary.log" "$WORK/replica.log"
chown postgres: "$WORK/primary.log" "$WORK/replica.log"

say "primary on 127.0.0.1:$PRIMARY_PORT, replica on 127.0.0.1:$REPLICA_PORT"
as_pg "$PG_BIN/initdb" -D "$WORK/primary" -A trust -U postgres -E UTF8 --locale=C \
    --no-sync --no-instructions >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log"; die "initdb failed"; }
cat >>"$WORK/primary/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK/sock'
wal_level = replica
max_wal_senders = 5
hot_standby = on
hot_standby_feedback = on
fsync = off
shared_buffers = '32MB'
password_encryption = 'scram-sha-256'
log_line_prefix = '%m [%p] %q%u@%a '
include_if_exists 'node.conf'
EOF
# The proxy's logins (app, the monitor) must prove their passwords: the
# ones the container got through its environment.
cat >"$WORK/primary/pg_hba.conf" <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
echo "port = $PRIMARY_PORT" >"$WORK/primary/node.conf"
chown postgres: "$WORK/primary"/*.conf
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w -t 60 start >/dev/null \
    || { cat "$WORK/primary.log"; die "the primary did not start"; }
as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d "application_name=replica" \
    -D "$WORK/replica" -R -X stream --checkpoint=fast --no-sync
echo "port = $REPLICA_PORT" >"$WORK/replica/node.conf"
chown postgres: "$WORK/replica/node.conf"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/replica" -l "$WORK/replica.log" -w -t 60 start >/dev/null \
    || { cat "$WORK/replica.log"; die "the replica did not start"; }

direct() {
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}
APP_PASSWORD="app-$RANDOM$RANDOM"
MONITOR_PASSWORD="monitor-$RANDOM$RANDOM"
direct "$PRIMARY_PORT" -d postgres <<EOF >/dev/null
CREATE ROLE app LOGIN PASSWORD '$APP_PASSWORD';
-- A plain login role: the monitor's probes need no grants.
CREATE ROLE pgnear_monitor LOGIN PASSWORD '$MONITOR_PASSWORD';
CREATE DATABASE shop OWNER app;
EOF
# Waits until the replica has replayed everything the primary has now.
catch_up() {
    local lsn
    lsn=$(direct "$PRIMARY_PORT" -d postgres -c 'SELECT pg_current_wal_lsn()')
    for _ in $(seq 1 100); do
        [ "$(direct "$REPLICA_PORT" -d postgres -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && return 0
        sleep 0.1
    done
    die "the replica did not catch up with $lsn"
}
catch_up
lap "PostgreSQL"

# ---------------------------------------------------------------- pgnear in the container
# Transaction pooling, so that the pool's metrics exist for the name check.
cat >"$WORK/proxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
region = "local"
pool_mode = "transaction"
pool_size = 10

[[nodes]]
name = "primary"
host = "127.0.0.1"
port = $PRIMARY_PORT

[[nodes]]
name = "replica"
host = "127.0.0.1"
port = $REPLICA_PORT

[[users]]
name = "app"
password = "\${APP_PASSWORD}"

[monitor]
user = "pgnear_monitor"
password = "\${MONITOR_PASSWORD}"
EOF
chmod 644 "$WORK/proxy.toml"

say "podman run $IMAGE: host network, read-only root, no capabilities, config mounted"
APP_PASSWORD="$APP_PASSWORD" MONITOR_PASSWORD="$MONITOR_PASSWORD" \
    pm run -d --name "$NAME" --network host --read-only --cap-drop all --security-opt no-new-privileges \
    -e APP_PASSWORD -e MONITOR_PASSWORD \
    -v "$WORK/proxy.toml:/etc/pgnear/proxy.toml:ro" \
    "$IMAGE" --config /etc/pgnear/proxy.toml --log-format json >/dev/null
admin() { curl -sS --max-time 5 "http://127.0.0.1:$ADMIN_PORT$1"; }
status_of() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$ADMIN_PORT$1" || true; }
running() { [ "$(pm inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ]; }
for _ in $(seq 1 100); do
    [ "$(status_of /ready)" = 200 ] && break
    running || die "the container exited: $(pm logs "$NAME" 2>&1 | tail -5)"
    sleep 0.1
done
[ "$(status_of /ready)" = 200 ] || die "/ready is not 200: $(admin /ready)"
ok "/ready answers 200 (a primary is verified)"
health_ok() { admin /health | "$DEPLOY_PY" -c "import json,sys; h=json.load(sys.stdin); sys.exit(h['status']!='ok' or len(h['nodes'])!=2)"; }
for _ in $(seq 1 100); do health_ok && break; sleep 0.1; done
health_ok || die "/health is not ok with both nodes up: $(admin /health)"
ok "/health answers 200, status ok, both nodes up"

PID=$(pm inspect --format '{{.State.Pid}}' "$NAME")
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$PID/status")
[ "$uid" = 10001 ] || die "pgnear runs as uid $uid, not 10001"
ok "pgnear runs as uid 10001 (host pid $PID)"

export PGPASSWORD="$APP_PASSWORD"
via() { "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PROXY_PORT" -U app -d shop "$@"; }
out=$(via -c "CREATE TABLE t (id int PRIMARY KEY, at text)" -c "INSERT INTO t VALUES (1, 'via pgnear')" -c "SHOW pgnear.node")
[ "$out" = primary ] || die "the write ran on '$out', not the primary"
[ "$(direct "$PRIMARY_PORT" -d shop -c 'SELECT at FROM t WHERE id = 1')" = "via pgnear" ] \
    || die "the write is not on the primary"
ok "a write through pgnear ran on the primary (SHOW pgnear.node, and the row is there)"
catch_up
out=$(via -c "SELECT at FROM t WHERE id = 1" -c "SHOW pgnear.node" | paste -sd ' ')
[ "$out" = "via pgnear replica" ] || die "the read returned '$out', not 'via pgnear replica'"
ok "a read through pgnear ran on the replica"
# How the Kubernetes example's ConfigMap says to apply a changed config.
pm exec "$NAME" sh -c 'kill -HUP 1' || die "kill -HUP 1 in the container failed"
for _ in $(seq 1 50); do
    reloads=$(admin /metrics)
    [[ "$reloads" == *'pgnear_config_reloads_total{result="ok"} 1'* ]] && break
    sleep 0.1
done
[[ "$reloads" == *'pgnear_config_reloads_total{result="ok"} 1'* ]] || die "SIGHUP did not reload the config"
ok "sh -c 'kill -HUP 1' in the container reloads the config"
lap "container checks"

# ---------------------------------------------------------------- Prometheus
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/deploy/prometheus/pgnear-rules.yml
scrape_configs:
  - job_name: pgnear
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
say "prometheus on 127.0.0.1:$PROM_PORT, scraping pgnear every second"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
PROM="http://127.0.0.1:$PROM_PORT"
for _ in $(seq 1 100); do curl -sf "$PROM/-/ready" >/dev/null && break; sleep 0.1; done
curl -sf "$PROM/-/ready" >/dev/null || { cat "$WORK/prometheus.log"; die "prometheus is not ready"; }

# ---------------------------------------------------------------- load, RSS
say "pgbench through pgnear: -S -c 8 for 10 s, then TPC-B-like -c 4 for 5 s"
PGPASSWORD="$APP_PASSWORD" "$PG_BIN/pgbench" -q -i -s 1 -h 127.0.0.1 -p "$PRIMARY_PORT" -U app shop >/dev/null 2>&1
catch_up
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$PID/stat"; }
cpu0=$(cpu_ticks)
pgbench_via() { "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$PROXY_PORT" -U app "$@" shop 2>&1; }
read_tps=$(pgbench_via -S -c 8 -j 2 -T 10 | awk '/^tps/ { printf "%d", $3 }')
cpu1=$(cpu_ticks)
write_tps=$(pgbench_via -c 4 -j 2 -T 5 | awk '/^tps/ { printf "%d", $3 }')
[ -n "$read_tps" ] && [ "$read_tps" -gt 0 ] && [ -n "$write_tps" ] && [ "$write_tps" -gt 0 ] \
    || die "pgbench through pgnear failed (select-only tps '$read_tps', TPC-B tps '$write_tps')"
HWM_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PID/status")
RSS_KB=$(awk '/^VmRSS:/ { print $2 }' "/proc/$PID/status")
CPU_CORES=$(awk "BEGIN { printf \"%.2f\", ($cpu1 - $cpu0) / $ticks / 10 }")
echo "    select-only: $read_tps tps at $CPU_CORES cores of pgnear; TPC-B-like: $write_tps tps"
echo "    pgnear's memory: peak (VmHWM) $((HWM_KB / 1024)) MiB, now (VmRSS) $((RSS_KB / 1024)) MiB"
lap "load"

# ---------------------------------------------------------------- metrics
admin /metrics >"$WORK/metrics.txt"
content_type=$(curl -s -o /dev/null -w '%{content_type}' "http://127.0.0.1:$ADMIN_PORT/metrics")
case "$content_type" in text/plain*version=0.0.4*) ;; *) die "/metrics has content type '$content_type'" ;; esac
promtool check metrics <"$WORK/metrics.txt" || die "promtool check metrics rejected the scrape"
ok "/metrics answers in the Prometheus text format ($(grep -c '^# TYPE' "$WORK/metrics.txt") families)"
"$DEPLOY_PY" "$ROOT/tests/deploy/check.py" names "$WORK/metrics.txt"

# rate() over 30 s needs a few scrapes after the load: wait for them.
sleep 3
"$DEPLOY_PY" "$ROOT/tests/deploy/check.py" live "$PROM"
# Prometheus's state of each rule named by its alert: "inactive" while all is well.
alert_states() {
    curl -sf "$PROM/api/v1/rules?type=alert" | "$DEPLOY_PY" -c '
import json, sys
for group in json.load(sys.stdin)["data"]["groups"]:
    for rule in group["rules"]:
        labels = ",".join(sorted(f"{k}={v}" for a in rule["alerts"] for k, v in a["labels"].items()))
        print(rule["name"], rule["state"], labels)'
}
rules_loaded=$(alert_states | wc -l)
[ "$rules_loaded" -ge 11 ] || die "prometheus loaded $rules_loaded alert rules from pgnear-rules.yml"
active=$(alert_states | awk '$2 != "inactive"')
[ -z "$active" ] || die "alerts are active while everything is up: $active"
ok "prometheus loaded the $rules_loaded alert rules; none is active while everything is up"
lap "metrics and Prometheus"

# ---------------------------------------------------------------- a node down
say "the replica stops"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/replica" -m fast -w stop >/dev/null
for _ in $(seq 1 100); do
    health=$(admin /health)
    [[ "$health" == *'"status":"degraded"'* ]] && break
    sleep 0.1
done
[[ "$health" == *'"status":"degraded"'* ]] || die "/health does not report the replica down: $health"
[ "$(status_of /health)" = 200 ] || die "/health answers $(status_of /health) with the replica down"
[ "$(status_of /ready)" = 200 ] || die "/ready is not 200 with only the replica down"
ok "/health still answers 200 (status degraded): the liveness probe passes; /ready stays 200"
out=$(via -c "SELECT count(*) FROM t" -c "SHOW pgnear.node" | paste -sd ' ')
[ "$out" = "1 primary" ] || die "with the replica down the read returned '$out', not '1 primary'"
ok "reads fall back to the primary"
node_down() { [[ "$states" =~ (^|$'\n')"PgnearNodeDown pending "[^$'\n']*"node=replica" ]]; }
for _ in $(seq 1 100); do
    states=$(alert_states)
    node_down && break
    sleep 0.2
done
node_down || die "PgnearNodeDown is not pending for the replica: $(awk '$2 != "inactive"' <<<"$states")"
others=$(awk '$2 != "inactive" && $1 != "PgnearNodeDown"' <<<"$states")
[ -z "$others" ] || die "other alerts are active with only the replica down: $others"
ok "PgnearNodeDown is pending for node=replica, and no other alert"

say "the primary stops too, then starts again"
node_up() { admin /health | "$DEPLOY_PY" -c "import json,sys; sys.exit(not any(n['name']=='$1' and n['up'] for n in json.load(sys.stdin)['nodes']))"; }
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -m fast -w stop >/dev/null
for _ in $(seq 1 100); do node_up primary || break; sleep 0.1; done
node_up primary && die "/health still has the primary up after it stopped"
[ "$(status_of /health)" = 200 ] || die "/health answers $(status_of /health) with both nodes down"
[ "$(status_of /ready)" = 200 ] || die "/ready is not 200 after the primary went (it latches)"
ok "with both nodes down /health still answers 200, and /ready stays 200"
no_primary() { [[ "$states" =~ (^|$'\n')"PgnearNoVerifiedPrimary pending "[^$'\n']*"cluster=default" ]]; }
for _ in $(seq 1 100); do
    states=$(alert_states)
    no_primary && break
    sleep 0.2
done
no_primary || die "PgnearNoVerifiedPrimary is not pending: $(awk '$2 != "inactive"' <<<"$states")"
ok "PgnearNoVerifiedPrimary is pending"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w -t 60 start >/dev/null \
    || die "the primary did not start again"
for _ in $(seq 1 100); do node_up primary && break; sleep 0.1; done
node_up primary || die "pgnear does not see the primary up again: $(admin /health)"
ok "pgnear sees the primary up again"
kill "$PROM_PID" && wait "$PROM_PID" 2>/dev/null || true
PROM_PID=""
lap "nodes down"

# ---------------------------------------------------------------- SIGTERM drains
say "SIGTERM with a transaction open"
via -c "CREATE TABLE drained (id int)"
mkfifo "$WORK/hold.in"
via <"$WORK/hold.in" >"$WORK/hold.out" 2>&1 &
HOLD_PID=$!
exec 7>"$WORK/hold.in"
echo "BEGIN; INSERT INTO drained VALUES (1); SELECT 'in transaction';" >&7
wait_for_line() {
    for _ in $(seq 1 100); do grep -qx "$1" "$WORK/hold.out" && return 0; sleep 0.1; done
    die "the held session did not print '$1': $(cat "$WORK/hold.out")"
}
wait_for_line "in transaction"
stop_ts=$(date +%s.%N)
# Not holding the session's stdin open (fd 7) for as long as it runs.
pm stop -t 30 "$NAME" >/dev/null 2>&1 7>&- &
STOP_PID=$!
accepting() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PROXY_PORT" -U app -d shop; }
for _ in $(seq 1 100); do
    accepting || break
    sleep 0.1
done
accepting && die "pgnear still accepts clients after SIGTERM"
# The process itself: podman reports a container being stopped as not
# running.
kill -0 "$PID" 2>/dev/null || die "pgnear exited with a session still open"
ok "after SIGTERM new clients are refused, and pgnear waits for the open session"
echo "SELECT 'still served'; COMMIT;" >&7
wait_for_line "still served"
exec 7>&-
wait "$HOLD_PID" || die "the held session failed: $(cat "$WORK/hold.out")"
HOLD_PID=""
left_ts=$(date +%s.%N)
wait "$STOP_PID" || true
exited_ts=$(date +%s.%N)
exit_code=$(pm inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$exit_code" = 0 ] || die "the container exited with $exit_code"
[ "$(direct "$PRIMARY_PORT" -d shop -c 'SELECT count(*) FROM drained')" = 1 ] \
    || die "the open transaction's row was not committed"
exit_after=$(awk "BEGIN { printf \"%.1f\", $exited_ts - $left_ts }")
awk "BEGIN { exit !($exited_ts - $left_ts < 5) }" || die "pgnear took ${exit_after}s to exit after the last client left"
ok "the open transaction committed; pgnear exited 0, ${exit_after}s after its last client left" \
    "($(awk "BEGIN { printf \"%.1f\", $exited_ts - $stop_ts }")s after SIGTERM)"
lap "drain"

echo "image $IMAGE: $IMAGE_MB MB; pgnear peak RSS $((HWM_KB / 1024)) MiB under pgbench -c 8"
echo "timings: ${TIMINGS[*]}"
echo "container smoke test passed in $(( $(date +%s) - START_TS ))s"
