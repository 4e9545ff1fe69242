#!/usr/bin/env bash
# PostgreSQL's own regression suite (pg_regress, parallel_schedule), run
# directly against a throwaway cluster and then through pgnear; prints both
# summaries and the tests that differ.
#
# usage: tests/compat/pg_regress.sh [--primary-only | --replica | --all]
#   (PGNEAR_COMPAT_PROXY adds [proxy] keys, e.g. 'pool_mode = "transaction"')
#   --primary-only  direct run, then through pgnear in front of one primary
#   --replica       direct run, then through pgnear in front of a primary and
#                   a streaming replica, read_your_writes = "session"
#   --all           both (the default)
#
# Environment:
#   PGNEAR_BIN           pgnear binary (default: cargo build --release, then
#                        target/release/pgnear)
#   PGNEAR_PG_BIN        PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   PGNEAR_COMPAT_CACHE  where the Debian source tree is unpacked and built
#                        (default /var/tmp/pgnear-compat; kept between runs)
#   PGNEAR_COMPAT_TESTS  space-separated test names to run instead of the
#                        whole parallel_schedule (for debugging; test_setup
#                        is always run first)
#   PGNEAR_COMPAT_KEEP=1 keep the work directory (logs, results) on success
#   PGNEAR_COMPAT_REPLICA_STRICT=1  also fail when the replica mode differs
#   PGNEAR_COMPAT_RYW    read_your_writes in replica mode (default session)
#   PGNEAR_COMPAT_LOG_STATEMENTS=1  log_statement = 'all' on every server
#                        (server-*.log then show, by application_name
#                        pg_regress/TEST, which statement ran on which node)
#   RUST_LOG             pgnear's log filter (default pgnear=info;
#                        pgnear=debug logs every routing decision)
#
# The regression files and regress.so are not in Debian's binary packages:
# the script fetches the Debian source package of the installed server
# version with `apt-get source --download-only`, through a private sources
# list and private lists directory (nothing under /etc/apt or /var/lib/apt
# is touched), unpacks it with dpkg-source, configures it minimally and
# builds only src/test/regress (pg_regress, regress.so, refint.so,
# autoinc.so). Needs root the first time (apt); later runs reuse the cache.
#
# Servers run as the `postgres` OS user when run as root, as the caller
# otherwise. Logs, pg_regress output and regression.diffs go to a work
# directory that is printed (and kept) when something fails.
#
# Exit status: non-zero if pgnear fails any test that the direct run passed
# in primary-only mode (in replica mode only with
# PGNEAR_COMPAT_REPLICA_STRICT=1), or if anything could not be set up.
set -euo pipefail

MODE=all
for arg in "$@"; do
    case "$arg" in
        --primary-only) MODE=primary ;;
        --replica) MODE=replica ;;
        --all) MODE=all ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PGBIN=${PGNEAR_PG_BIN:-/usr/lib/postgresql/15/bin}
CACHE=${PGNEAR_COMPAT_CACHE:-/var/tmp/pgnear-compat}
SRC_PKG=postgresql-15
T_START=$SECONDS

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
# Run a command as the server's OS user.
as_pg() {
    if [ "$IS_ROOT" = 1 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

[ -x "$PGBIN/postgres" ] || die "$PGBIN/postgres not found (set PGNEAR_PG_BIN)"
if [ "$IS_ROOT" = 1 ]; then
    id postgres >/dev/null 2>&1 || die "the postgres OS user is missing"
fi

# ---------------------------------------------------------------------------
# Work directory and cleanup
# ---------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgnear-compat.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/logs" "$WORK/pg"
if [ "$IS_ROOT" = 1 ]; then chown postgres: "$WORK/pg" "$WORK/logs"; fi
chmod 777 "$WORK/logs"

STARTED_DATADIRS=()
PGNEAR_PID=
FAILED_SETUP=1
KEEP_WORK=${PGNEAR_COMPAT_KEEP:-0}

# SIGTERM drains; a second one closes any session still open.
stop_pgnear() {
    if [ -n "$PGNEAR_PID" ]; then
        kill "$PGNEAR_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$PGNEAR_PID" 2>/dev/null || break; sleep 0.1; done
        kill "$PGNEAR_PID" 2>/dev/null || true
        wait "$PGNEAR_PID" 2>/dev/null || true
        PGNEAR_PID=
    fi
}

cleanup() {
    local rc=$?
    set +e
    stop_pgnear
    local d
    for d in "${STARTED_DATADIRS[@]}"; do
        [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    done
    # Cluster data is never kept; logs and results are kept on failure.
    rm -rf "$WORK/pg"
    if [ "$rc" != 0 ] || [ "$FAILED_SETUP" = 1 ] || [ "$KEEP_WORK" = 1 ]; then
        echo "logs and results kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Print the tail of a log and fail.
die_log() {
    local log=$1
    shift
    printf 'error: %s\n' "$*" >&2
    if [ -f "$log" ]; then
        echo "---- last 40 lines of $log" >&2
        tail -n 40 "$log" >&2
    fi
    exit 1
}

# Ports below the kernel's ephemeral range, so that no client socket of
# this run (walreceiver, psql, pgnear's own connections) can hold one.
USED_PORTS=" "
PORT_LO=15000
PORT_HI=$(awk '{print $1 - 1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32767)
[ "$PORT_HI" -gt $((PORT_LO + 1000)) ] || { PORT_LO=61000; PORT_HI=65000; }
port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}
free_port() {
    local p i
    for i in $(seq 1 200); do
        p=$((PORT_LO + RANDOM % (PORT_HI - PORT_LO)))
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if ! port_in_use "$p"; then
            USED_PORTS="$USED_PORTS$p "
            echo "$p"
            return 0
        fi
    done
    return 1
}

# ---------------------------------------------------------------------------
# 1. The regression files for the installed server version
# ---------------------------------------------------------------------------
T0=$SECONDS
PKG_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || true)
[ -n "$PKG_VERSION" ] || die "$SRC_PKG is not installed (dpkg-query)"
SERVER_VERSION=$("$PGBIN/postgres" --version | awk '{print $3}')
case "$PKG_VERSION" in
    "$SERVER_VERSION"-*) ;;
    *) die "$PGBIN/postgres is $SERVER_VERSION but the $SRC_PKG package is $PKG_VERSION" ;;
esac
TREE_BASE="$CACHE/${SRC_PKG}_${PKG_VERSION//[:~]/_}"
TREE="$TREE_BASE/src"
REGRESS="$TREE/src/test/regress"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

need_apt_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$IS_ROOT" = 1 ] || die "missing packages ${missing[*]}: install them or run as root"
    say "installing ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") \
        >"$WORK/logs/apt-install.log" 2>&1 || die_log "$WORK/logs/apt-install.log" "apt-get install ${missing[*]} failed"
}

fetch_source() {
    [ "$IS_ROOT" = 1 ] || die "the source tree is not cached in $CACHE: run once as root (apt-get source)"
    need_apt_pkgs dpkg-dev
    local apt="$TREE_BASE/apt" log="$WORK/logs/apt-source.log"
    rm -rf "$apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/dl"
    # Reuse the Debian mirror(s) and suites this machine already uses (from
    # `apt-cache policy`), as deb-src lines in a private sources list.
    local codename keyring pairs
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    keyring=
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] && keyring="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    pairs=$(apt-cache policy 2>/dev/null | awk '
        $2 ~ /^https?:\/\// && $3 ~ /\// { url = $2; suite = $3; sub(/\/.*/, "", suite); next }
        url != "" && /release/ && /o=Debian,/ { print url, suite; url = ""; next }
        { url = "" }' | sort -u)
    if [ -z "$pairs" ]; then
        pairs="http://deb.debian.org/debian $codename
http://deb.debian.org/debian $codename-updates
http://deb.debian.org/debian-security $codename-security"
    fi
    : >"$apt/sources.list"
    while read -r url suite; do
        echo "deb-src ${keyring}$url $suite main" >>"$apt/sources.list"
    done <<<"$pairs"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o APT::Sandbox::User=root)
    {
        echo "# private sources list:"
        cat "$apt/sources.list"
        apt-get "${opts[@]}" update
    } >"$log" 2>&1 || die_log "$log" "apt-get update (private deb-src list) failed"
    (cd "$apt/dl" && apt-get "${opts[@]}" source --download-only "$SRC_PKG=$PKG_VERSION") >>"$log" 2>&1 ||
        die_log "$log" "apt-get source $SRC_PKG=$PKG_VERSION failed (is that version still on the mirror?)"
    rm -rf "$TREE.tmp"
    (cd "$apt/dl" && dpkg-source -x ./*.dsc "$TREE.tmp") >>"$log" 2>&1 || die_log "$log" "dpkg-source -x failed"
    mv "$TREE.tmp" "$TREE"
    # dpkg-source leaves a copy of the upstream tarball beside the tree.
    rm -rf "$apt" "$TREE_BASE"/*.orig.tar.*
}

build_regress() {
    need_apt_pkgs gcc make perl libc6-dev
    local log="$WORK/logs/build.log"
    # Only what pg_regress and regress.so need: no optional libraries.
    (cd "$TREE" && ./configure --prefix="$TREE_BASE/inst" --without-readline --without-zlib \
        --without-icu --without-openssl --without-ldap --without-gssapi --without-pam \
        --without-llvm --without-perl --without-python --without-tcl) >"$log" 2>&1 ||
        die_log "$log" "configure failed"
    {
        make -C "$TREE/src/backend" -j2 generated-headers &&
            make -C "$TREE/src/test/regress" -j2 all &&
            make -C "$TREE/contrib/spi" -j2 refint.so autoinc.so
    } >>"$log" 2>&1 || die_log "$log" "build failed"
    # The server loads regress.so, refint.so, autoinc.so and reads data/.
    chmod -R a+rX "$TREE_BASE"
    touch "$TREE_BASE/.built"
}

if [ ! -d "$TREE" ]; then
    say "fetching the $SRC_PKG $PKG_VERSION source package into $CACHE"
    fetch_source
fi
if [ ! -f "$TREE_BASE/.built" ] || [ ! -f "$REGRESS/regress.so" ]; then
    say "building pg_regress and regress.so (about 1-2 minutes)"
    build_regress
fi
flock -u 9
T_PREPARE=$((SECONDS - T0))
for f in pg_regress regress.so refint.so autoinc.so parallel_schedule; do
    [ -e "$REGRESS/$f" ] || die "$REGRESS/$f is missing after the build (remove $TREE_BASE to rebuild)"
done

# ---------------------------------------------------------------------------
# pgnear
# ---------------------------------------------------------------------------
T0=$SECONDS
if [ -n "${PGNEAR_BIN:-}" ]; then
    case "$PGNEAR_BIN" in /*) ;; *) PGNEAR_BIN="$REPO/$PGNEAR_BIN" ;; esac
else
    say "cargo build --release"
    (cd "$REPO" && cargo build --release --locked --bin pgnear) >"$WORK/logs/cargo.log" 2>&1 ||
        die_log "$WORK/logs/cargo.log" "cargo build --release failed"
    PGNEAR_BIN="$REPO/target/release/pgnear"
fi
[ -x "$PGNEAR_BIN" ] || die "$PGNEAR_BIN is not executable"
T_CARGO=$((SECONDS - T0))

# ---------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------
SOCKDIR="$WORK/pg/sock"
as_pg mkdir -p "$SOCKDIR"

# new_primary NAME PORT: initdb and start a primary.
new_primary() {
    local name=$1 port=$2 d="$WORK/pg/$1"
    rm -rf "$d"
    as_pg "$PGBIN/initdb" -D "$d" -U postgres --auth=trust -E UTF8 --locale=C \
        >"$WORK/logs/initdb-$name.log" 2>&1 || die_log "$WORK/logs/initdb-$name.log" "initdb failed"
    # What pg_regress itself adds to a temporary instance, plus replication
    # and room for the parallel groups through a proxy.
    as_pg tee -a "$d/postgresql.conf" >/dev/null <<EOF

# added by tests/compat/pg_regress.sh
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$SOCKDIR'
max_connections = 200
max_prepared_transactions = 10
max_wal_senders = 5
wal_level = replica
hot_standby = on
# Feedback would hold back the primary's xmin horizon, so that VACUUM in
# test_setup could not mark tenk1 all-visible and plans would change
# (create_index) for a reason that has nothing to do with pgnear.
hot_standby_feedback = off
fsync = off
full_page_writes = off
synchronous_commit = off
log_autovacuum_min_duration = 0
log_checkpoints = on
log_line_prefix = '%m %b[%p] %q%a '
log_lock_waits = on
log_temp_files = 128kB
EOF
    if [ "${PGNEAR_COMPAT_LOG_STATEMENTS:-0}" = 1 ]; then
        echo "log_statement = 'all'" | as_pg tee -a "$d/postgresql.conf" >/dev/null
    fi
    start_cluster "$name"
}

start_cluster() {
    local name=$1 d="$WORK/pg/$1"
    STARTED_DATADIRS+=("$d")
    as_pg "$PGBIN/pg_ctl" -D "$d" -l "$WORK/logs/server-$name.log" -w -t 120 start \
        >"$WORK/logs/pg_ctl-$name.log" 2>&1 || die_log "$WORK/logs/server-$name.log" "starting $name failed"
}

stop_cluster() {
    local name=$1 d="$WORK/pg/$1"
    as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$d"
}

# new_replica NAME PORT PRIMARY_PORT: streaming replica of the primary.
new_replica() {
    local name=$1 port=$2 pport=$3 d="$WORK/pg/$1"
    rm -rf "$d"
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$pport" -U postgres -D "$d" -R -X stream -c fast \
        >"$WORK/logs/basebackup-$name.log" 2>&1 || die_log "$WORK/logs/basebackup-$name.log" "pg_basebackup failed"
    as_pg tee -a "$d/postgresql.conf" >/dev/null <<EOF
port = $port
EOF
    start_cluster "$name"
    local i
    for i in $(seq 1 300); do
        if [ "$(psql_at "$pport" "select count(*) from pg_stat_replication where state = 'streaming'")" -ge 1 ] 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die_log "$WORK/logs/server-$name.log" "replica $name did not start streaming"
}

psql_at() {
    "$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2" 2>/dev/null
}

# start_pgnear MODE PORT CONFIG
start_pgnear() {
    local mode=$1 port=$2 config=$3 log="$WORK/logs/pgnear-$1.log"
    "$PGNEAR_BIN" check --config "$config" >"$WORK/logs/pgnear-check-$mode.log" 2>&1 ||
        die_log "$WORK/logs/pgnear-check-$mode.log" "pgnear check rejected $config"
    NO_COLOR=1 RUST_LOG=${RUST_LOG:-pgnear=info} "$PGNEAR_BIN" --config "$config" >"$log" 2>&1 &
    PGNEAR_PID=$!
    local i
    for i in $(seq 1 200); do
        kill -0 "$PGNEAR_PID" 2>/dev/null || die_log "$log" "pgnear exited at startup"
        if [ "$(psql_at "$port" "select 1")" = 1 ]; then
            # Let the monitor see every node once more.
            sleep 1
            return 0
        fi
        sleep 0.1
    done
    die_log "$log" "pgnear did not accept a query within 20 s"
}

# ---------------------------------------------------------------------------
# pg_regress
# ---------------------------------------------------------------------------
# run_suite LABEL PORT: run the schedule against 127.0.0.1:PORT; results in
# $WORK/LABEL; pg_regress's own output in $WORK/LABEL/pg_regress.out.
run_suite() {
    local label=$1 port=$2 out="$WORK/$1"
    mkdir -p "$out"
    [ "$IS_ROOT" = 1 ] && chown postgres: "$out"
    local tests=(--schedule="$REGRESS/parallel_schedule")
    if [ -n "${PGNEAR_COMPAT_TESTS:-}" ]; then
        # shellcheck disable=SC2206
        tests=(test_setup $PGNEAR_COMPAT_TESTS)
    fi
    local t0=$SECONDS
    # Same options as upstream's `make installcheck-parallel`.
    (cd "$out" && as_pg env -u PGDATABASE -u PGUSER -u PGPORT -u PGHOST \
        "$REGRESS/pg_regress" \
        --inputdir="$REGRESS" \
        --outputdir="$out" \
        --bindir="$PGBIN" \
        --dlpath="$REGRESS" \
        --max-concurrent-tests=20 \
        --host=127.0.0.1 --port="$port" --user=postgres \
        "${tests[@]}") >"$out/pg_regress.out" 2>&1 || true
    echo $((SECONDS - t0)) >"$out/seconds"
    # One "name status" line per test: ok, FAILED, ignored.
    sed -nE 's/^(test +| +)([A-Za-z0-9_.-]+) +\.\.\. +(ok|FAILED|failed \(ignored\)).*/\2 \3/p' \
        "$out/pg_regress.out" | sed 's/ failed (ignored)$/ ignored/' >"$out/results.txt"
    if [ ! -s "$out/results.txt" ]; then
        echo "---- $out/pg_regress.out" >&2
        tail -n 40 "$out/pg_regress.out" >&2
        die "pg_regress ran no test ($label)"
    fi
}

count() { # count FILE STATUS
    awk -v s="$2" '$2 == s { n++ } END { print n + 0 }' "$1"
}

summary() { # summary LABEL
    local out="$WORK/$1"
    printf '%-22s %3d passed, %d failed, %d failed (ignored)  [%ss]\n' "$1:" \
        "$(count "$out/results.txt" ok)" "$(count "$out/results.txt" FAILED)" \
        "$(count "$out/results.txt" ignored)" "$(cat "$out/seconds")"
    grep -E '^(=+$| *(All|[0-9]+ of) [0-9]+ tests)' "$out/pg_regress.out" | grep -v '^=' | sed 's/^ */    pg_regress: /'
}

# compare LABEL: tests that passed directly but not through pgnear.
compare() {
    local label=$1 out="$WORK/$1"
    awk 'NR == FNR { if ($2 == "ok") ok[$1] = 1; next }
         ($1 in ok) && $2 != "ok" { print $1 }' \
        "$WORK/direct/results.txt" "$out/results.txt" >"$out/regressions.txt"
    # Tests that failed directly but passed through pgnear (or are missing).
    awk 'NR == FNR { st[$1] = $2; next }
         !($1 in st) { print $1 " (missing through pgnear)"; next }
         st[$1] == "ok" && $2 != "ok" { print $1 " (failed directly, passed through pgnear)" }' \
        "$out/results.txt" "$WORK/direct/results.txt" >"$out/other-differences.txt"
    if [ -s "$out/regressions.txt" ]; then
        echo "$label: tests that passed directly but failed through pgnear:"
        sed 's/^/    /' "$out/regressions.txt"
    else
        echo "$label: no test fails through pgnear that passed directly"
    fi
    if [ -s "$out/other-differences.txt" ]; then
        echo "$label: other differences:"
        sed 's/^/    /' "$out/other-differences.txt"
    fi
}

show_diffs() { # show_diffs LABEL
    local out="$WORK/$1"
    if [ -f "$out/regression.diffs" ]; then
        echo "---- first 200 lines of $out/regression.diffs"
        head -n 200 "$out/regression.diffs"
        echo "----"
    fi
}

write_config() { # write_config FILE LISTEN_PORT PRIMARY_PORT [REPLICA_PORT]
    local file=$1 lport=$2 pport=$3 rport=${4:-}
    cat >"$file" <<EOF
[proxy]
listen = "127.0.0.1:$lport"
${PGNEAR_COMPAT_PROXY:-}

[[nodes]]
name = "primary"
host = "127.0.0.1"
port = $pport
EOF
    if [ -n "$rport" ]; then
        cat >>"$file" <<EOF

[[nodes]]
name = "replica"
host = "127.0.0.1"
port = $rport

[consistency]
read_your_writes = "${PGNEAR_COMPAT_RYW:-session}"
EOF
    fi
    cat >>"$file" <<EOF

[[users]]
name = "postgres"
auth = "trust"

[monitor]
interval_ms = 50
EOF
}

# ---------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------
say "PostgreSQL $SERVER_VERSION; regression tree $TREE; work directory $WORK"

PPORT=$(free_port)
say "direct run against the primary (port $PPORT)"
new_primary direct-primary "$PPORT"
run_suite direct "$PPORT"
stop_cluster direct-primary
STATUS=0
REPLICA_REGRESSED=0

if [ "$MODE" = primary ] || [ "$MODE" = all ]; then
    PPORT=$(free_port)
    NPORT=$(free_port)
    say "through pgnear, primary only (pgnear port $NPORT, primary port $PPORT)"
    new_primary primary-only-primary "$PPORT"
    write_config "$WORK/pgnear-primary-only.toml" "$NPORT" "$PPORT"
    start_pgnear primary-only "$NPORT" "$WORK/pgnear-primary-only.toml"
    run_suite primary-only "$NPORT"
    stop_pgnear
    stop_cluster primary-only-primary
fi

if [ "$MODE" = replica ] || [ "$MODE" = all ]; then
    PPORT=$(free_port)
    RPORT=$(free_port)
    NPORT=$(free_port)
    say "through pgnear, primary + streaming replica (pgnear port $NPORT, primary $PPORT, replica $RPORT)"
    new_primary replica-primary "$PPORT"
    new_replica replica-replica "$RPORT" "$PPORT"
    write_config "$WORK/pgnear-replica.toml" "$NPORT" "$PPORT" "$RPORT"
    start_pgnear replica "$NPORT" "$WORK/pgnear-replica.toml"
    run_suite replica "$NPORT"
    stop_pgnear
    stop_cluster replica-replica
    stop_cluster replica-primary
fi
FAILED_SETUP=0

echo
echo "==================== summaries ===================="
summary direct
for label in primary-only replica; do
    [ -f "$WORK/$label/results.txt" ] || continue
    summary "$label"
done
echo
for label in primary-only replica; do
    [ -f "$WORK/$label/results.txt" ] || continue
    compare "$label"
    if [ -s "$WORK/$label/regressions.txt" ]; then
        show_diffs "$label"
        if [ "$label" = primary-only ] || [ "${PGNEAR_COMPAT_REPLICA_STRICT:-0}" = 1 ]; then
            STATUS=1
        else
            REPLICA_REGRESSED=1
        fi
    fi
done
if [ "$REPLICA_REGRESSED" = 1 ] || [ "$STATUS" != 0 ]; then
    KEEP_WORK=1
fi

echo
echo "timings: source+build ${T_PREPARE}s, cargo ${T_CARGO}s, direct $(cat "$WORK/direct/seconds")s$(
    for label in primary-only replica; do
        [ -f "$WORK/$label/seconds" ] && printf ', %s %ss' "$label" "$(cat "$WORK/$label/seconds")"
    done
), total $((SECONDS - T_START))s"
printf 'direct: %d passed, %d failed\n' "$(count "$WORK/direct/results.txt" ok)" \
    "$(($(count "$WORK/direct/results.txt" FAILED) + $(count "$WORK/direct/results.txt" ignored)))"
for label in primary-only replica; do
    [ -f "$WORK/$label/results.txt" ] || continue
    printf '%s: %d passed, %d failed\n' "$label" "$(count "$WORK/$label/results.txt" ok)" \
        "$(($(count "$WORK/$label/results.txt" FAILED) + $(count "$WORK/$label/results.txt" ignored)))"
done
exit "$STATUS"
