#!/usr/bin/env bash
# Driver compatibility check: psycopg 3, asyncpg, node-postgres, JDBC and
# sqlx, each used the ordinary way, through pgnear in front of a throwaway
# PostgreSQL 15 primary and one streaming replica.
#
#   bash tests/drivers/run.sh                 # builds pgnear --release
#   PGNEAR_BIN=target/debug/pgnear bash tests/drivers/run.sh
#   bash tests/drivers/run.sh psycopg jdbc    # only some drivers
#
# Environment:
#   PGNEAR_BIN            use this pgnear binary instead of building one
#   PGNEAR_PG_BIN         PostgreSQL binaries (/usr/lib/postgresql/15/bin)
#   PGNEAR_DRIVERS_CACHE  where the Python venv and npm packages are kept
#                         between runs (~/.cache/pgnear-drivers)
#   PGNEAR_DRIVERS_LOGS   where logs are copied at the end
#                         (/tmp/pgnear-drivers-logs)
#   PGNEAR_SQLX_TARGET_DIR  cargo target dir of the sqlx check
#                         (target/sqlx-check)
#   KEEP=1                leave the temp dir (servers are still stopped)
#   HOLD=1                set everything up, print how to connect, and wait
#                         (Ctrl-C or kill to clean up); runs no driver
#   DIRECT=1              control run: the drivers connect straight to the
#                         primary (as a SCRAM role "app"), not through pgnear,
#                         to tell a script fault from a pgnear fault
#
# Ends with the line "N passed, M failed"; exits non-zero if any failed.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PG_BIN="${PGNEAR_PG_BIN:-/usr/lib/postgresql/15/bin}"
CACHE="${PGNEAR_DRIVERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgnear-drivers}"
LOGS="${PGNEAR_DRIVERS_LOGS:-${TMPDIR:-/tmp}/pgnear-drivers-logs}"
DRIVER_TIMEOUT="${DRIVER_TIMEOUT:-90}"
ALL_DRIVERS=(psycopg asyncpg node jdbc sqlx)
if [ $# -gt 0 ]; then DRIVERS=("$@"); else DRIVERS=("${ALL_DRIVERS[@]}"); fi

say() { printf '==> %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }
START_TS=$(date +%s)

for d in "${DRIVERS[@]}"; do
    case "$d" in psycopg|asyncpg|node|jdbc|sqlx) ;; *) die "unknown driver '$d' (known: ${ALL_DRIVERS[*]})" ;; esac
done
wants() { local d; for d in "${DRIVERS[@]}"; do [ "$d" = "$1" ] && return 0; done; return 1; }

# ---------------------------------------------------------------- installs
[ -x "$PG_BIN/initdb" ] || die "no PostgreSQL 15 in $PG_BIN (apt-get install postgresql-15)"
id postgres >/dev/null 2>&1 || die "the postgres OS user is missing"
command -v python3 >/dev/null || die "python3 is required"

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

mkdir -p "$CACHE"
PY="$CACHE/venv/bin/python"
if wants psycopg || wants asyncpg; then
    if ! "$PY" -c 'import psycopg, asyncpg, sqlalchemy' >/dev/null 2>&1; then
        say "installing psycopg[binary], asyncpg and SQLAlchemy into $CACHE/venv"
        rm -rf "$CACHE/venv"
        python3 -m venv "$CACHE/venv" || { apt_install python3-venv; python3 -m venv "$CACHE/venv"; }
        "$PY" -m pip install --quiet --disable-pip-version-check 'psycopg[binary]' asyncpg sqlalchemy
    fi
fi
if wants node; then
    command -v node >/dev/null || apt_install nodejs npm
    node_pkgs=(pg pg-copy-streams pg-cursor)
    for p in "${node_pkgs[@]}"; do
        if [ ! -f "$CACHE/node/node_modules/$p/package.json" ]; then
            say "installing npm ${node_pkgs[*]} into $CACHE/node"
            mkdir -p "$CACHE/node"
            (cd "$CACHE/node" && npm install --silent --no-audit --no-fund --no-save "${node_pkgs[@]}" >/dev/null)
            break
        fi
    done
fi
JDBC_JAR=/usr/share/java/postgresql.jar
if wants jdbc; then
    command -v javac >/dev/null || apt_install openjdk-17-jdk-headless
    [ -f "$JDBC_JAR" ] || { say "installing libpostgresql-jdbc-java"; apt_install libpostgresql-jdbc-java; }
fi

SQLX_CHECK="${PGNEAR_SQLX_TARGET_DIR:-$ROOT/target/sqlx-check}/debug/sqlx-check"
if wants sqlx; then
    command -v cargo >/dev/null || die "cargo is required for the sqlx check"
    say "building the sqlx check (tests/drivers/sqlx_check)"
    (cd "$HERE/sqlx_check" && cargo build --locked --quiet --target-dir "$(dirname "$(dirname "$SQLX_CHECK")")")
fi

# ---------------------------------------------------------------- pgnear
if [ -n "${PGNEAR_BIN:-}" ]; then
    PGNEAR="$(cd "$(dirname "$PGNEAR_BIN")" && pwd)/$(basename "$PGNEAR_BIN")"
    [ -x "$PGNEAR" ] || die "PGNEAR_BIN=$PGNEAR_BIN is not executable"
else
    say "cargo build --release"
    (cd "$ROOT" && cargo build --release --locked --quiet)
    PGNEAR="$ROOT/target/release/pgnear"
fi

# ---------------------------------------------------------------- temp dir, cleanup
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pgnear-drivers.XXXXXX")"
chmod 755 "$WORK"
PGNEAR_PID=""
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
    local rc=$?
    set +e
    if [ -n "$PGNEAR_PID" ]; then
        # SIGTERM drains; a second one closes any session still open.
        kill "$PGNEAR_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$PGNEAR_PID" 2>/dev/null || break; sleep 0.1; done
        kill "$PGNEAR_PID" 2>/dev/null
        wait "$PGNEAR_PID" 2>/dev/null
    fi
    for node in replica primary; do
        [ -f "$WORK/$node/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/$node" -m immediate -w stop >/dev/null 2>&1
    done
    mkdir -p "$LOGS" && rm -f "$LOGS"/*.log
    cp "$WORK"/*.log "$LOGS"/ 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- PostgreSQL
read -r PRIMARY_PORT REPLICA_PORT PROXY_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)
# Owned by postgres: the server refuses to run as root.
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
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
hot_standby_feedback = on
fsync = off
shared_buffers = '32MB'
max_connections = 100
password_encryption = 'scram-sha-256'
log_line_prefix = '%m [%p] %q%u@%a '
log_min_error_statement = error
# Every statement, so the logs show which server served what.
log_statement = 'all'
log_connections = on
include_if_exists 'node.conf'
EOF
cat >"$WORK/primary/pg_hba.conf" <<EOF
local all all trust
host all app 127.0.0.1/32 scram-sha-256
local replication all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
EOF
echo "port = $PRIMARY_PORT" >"$WORK/primary/node.conf"
chown postgres: "$WORK/primary"/*.conf
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -l "$WORK/primary.log" -w -t 60 start >/dev/null \
    || { cat "$WORK/primary.log"; die "primary failed to start"; }

as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d "application_name=replica" \
    -D "$WORK/replica" -R -X stream --checkpoint=fast --no-sync
echo "port = $REPLICA_PORT" >"$WORK/replica/node.conf"
chown postgres: "$WORK/replica/node.conf"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/replica" -l "$WORK/replica.log" -w -t 60 start >/dev/null \
    || { cat "$WORK/replica.log"; die "replica failed to start"; }

psql_primary() { "$PG_BIN/psql" -X -q -A -t -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres "$@"; }
for _ in $(seq 1 100); do
    [ "$(psql_primary -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" = 1 ] && break
    sleep 0.1
done
[ "$(psql_primary -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")" = 1 ] \
    || die "the replica is not streaming"
[ "$("$PG_BIN/psql" -X -A -t -h 127.0.0.1 -p "$REPLICA_PORT" -U postgres -d postgres \
    -c 'SELECT pg_is_in_recovery()')" = t ] || die "the replica is not in recovery"

# A SCRAM role "app" on the servers, which want SCRAM from it. pgnear's
# config does not list it: pgnear looks it up with auth_query (as postgres,
# whom the servers trust) and logs in to both servers by SCRAM passthrough,
# so that every driver's login goes through both. DIRECT=1 control runs
# log in as app straight to the primary.
psql_primary -c "CREATE ROLE app SUPERUSER LOGIN PASSWORD 'apppw'" >/dev/null

# ---------------------------------------------------------------- pgnear
cat >"$WORK/pgnear.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
region = "local"
auth_user = "postgres"

[[nodes]]
name = "primary"
host = "127.0.0.1"
port = $PRIMARY_PORT

[[nodes]]
name = "replica"
host = "127.0.0.1"
port = $REPLICA_PORT

[[users]]
name = "postgres"
auth = "trust"

[monitor]
interval_ms = 50

# Read-your-writes across sessions: each check reads rows an earlier
# session wrote, which a replica may not have replayed yet under the
# default (per-session) guarantee.
[consistency]
read_your_writes = "proxy"
EOF
"$PGNEAR" check --config "$WORK/pgnear.toml" >/dev/null || die "pgnear check rejected the config"

say "pgnear on 127.0.0.1:$PROXY_PORT ($PGNEAR)"
NO_COLOR=1 RUST_LOG="${RUST_LOG:-pgnear=debug}" "$PGNEAR" --config "$WORK/pgnear.toml" >"$WORK/pgnear.log" 2>&1 &
PGNEAR_PID=$!
for _ in $(seq 1 100); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d postgres && break
    kill -0 "$PGNEAR_PID" 2>/dev/null || { cat "$WORK/pgnear.log"; die "pgnear exited"; }
    sleep 0.1
done
"$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d postgres \
    || { tail -50 "$WORK/pgnear.log"; die "pgnear is not accepting connections"; }
# Let the monitor see both nodes before the drivers start.
sleep 0.5

# ---------------------------------------------------------------- drivers
export PGNEAR_HOST=127.0.0.1 PGNEAR_PORT="$PROXY_PORT" PGNEAR_USER=app PGNEAR_PASSWORD=apppw PGNEAR_DB=postgres
# The role the server sees: app itself (auth_query, SCRAM passthrough).
export PGNEAR_SERVER_USER=app
if [ "${DIRECT:-0}" = 1 ]; then
    say "DIRECT=1: the drivers connect to the primary, not to pgnear"
    PGNEAR_PORT="$PRIMARY_PORT" PGNEAR_SERVER_USER=app
    export PGNEAR_REQUIRE_REPLICA=0
fi
export PGNEAR_PRIMARY_PORT="$PRIMARY_PORT" PGNEAR_REPLICA_PORT="$REPLICA_PORT"

if [ "${HOLD:-0}" = 1 ]; then
    echo "pgnear:  psql 'host=127.0.0.1 port=$PROXY_PORT user=app password=apppw dbname=postgres'"
    echo "primary: psql 'host=127.0.0.1 port=$PRIMARY_PORT user=postgres dbname=postgres'"
    echo "replica: psql 'host=127.0.0.1 port=$REPLICA_PORT user=postgres dbname=postgres'"
    echo "logs:    $WORK/{pgnear,primary,replica}.log; holding (pid $$), Ctrl-C to stop"
    while kill -0 "$PGNEAR_PID" 2>/dev/null; do sleep 1; done
    die "pgnear exited"
fi

if wants jdbc; then
    mkdir -p "$WORK/classes"
    javac -nowarn -d "$WORK/classes" -cp "$JDBC_JAR" "$HERE/JdbcCheck.java"
fi

passed=0
failed=0
failures=()
# Which server ran the driver's statements, from the servers' statement logs
# (pgnear passes application_name through to every server it uses).
served_by() {
    local app="${1}_check" p r
    p=$(grep -cE "@$app LOG:  (statement|execute)" "$WORK/primary.log" || true)
    r=$(grep -cE "@$app LOG:  (statement|execute)" "$WORK/replica.log" || true)
    echo "    statements run by the primary: $p, by the replica: $r"
}

run_driver() {
    local name=$1; shift
    local log="$WORK/$name.log" t0 rc
    t0=$(date +%s)
    say "$name"
    set +e
    timeout -k 5 "$DRIVER_TIMEOUT" "$@" >"$log" 2>&1
    rc=$?
    set -e
    sed 's/^/    /' "$log"
    served_by "$name"
    if [ $rc -eq 0 ] && grep -qx "$name: ok" "$log"; then
        passed=$((passed + 1))
        echo "    ($(( $(date +%s) - t0 ))s)"
    else
        [ $rc -eq 124 ] && echo "    $name: TIMED OUT after ${DRIVER_TIMEOUT}s"
        failed=$((failed + 1))
        failures+=("$name")
        echo "    $name: FAILED (exit $rc, $(( $(date +%s) - t0 ))s)"
    fi
}

wants psycopg && run_driver psycopg "$PY" "$HERE/psycopg_check.py"
wants asyncpg && run_driver asyncpg "$PY" "$HERE/asyncpg_check.py"
wants node && run_driver node env NODE_PATH="$CACHE/node/node_modules" node --no-deprecation "$HERE/node_check.js"
wants jdbc && run_driver jdbc java -cp "$JDBC_JAR:$WORK/classes" JdbcCheck
wants sqlx && run_driver sqlx "$SQLX_CHECK"

if ! kill -0 "$PGNEAR_PID" 2>/dev/null; then
    echo "pgnear died during the run"
    failed=$((failed + 1))
    failures+=("pgnear-alive")
fi
if [ $failed -gt 0 ]; then
    echo "failed: ${failures[*]}"
    echo "pgnear warnings and errors:"
    grep -E ' (WARN|ERROR) ' "$WORK/pgnear.log" | tail -30 | sed 's/^/    /' || true
    echo "writes pgnear sent to the replica (which refused them), by client:"
    awk '/ERROR:  cannot execute .* (in a read-only transaction|during recovery)/ {
             split($0, a, "ERROR:  "); err = a[2]; match($0, /@[^ ]+ /); who = substr($0, RSTART + 1, RLENGTH - 2); next_stmt = 1; next }
         next_stmt && /STATEMENT:  / { split($0, b, "STATEMENT:  "); print who ": " err " <- " b[2]; next_stmt = 0 }' \
        "$WORK/replica.log" | sort | uniq -c | sort -rn | head -20 | cut -c1-200 | sed 's/^/    /' || true
    echo "logs (pgnear.log, primary.log, replica.log, <driver>.log) are copied to $LOGS"
fi
echo "took $(( $(date +%s) - START_TS ))s"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
