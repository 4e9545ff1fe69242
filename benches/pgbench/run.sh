#!/usr/bin/env bash
# End-to-end benchmark: pgnear against direct PostgreSQL and PgBouncer.
#
#   benches/pgbench/run.sh            # everything, about 25 minutes
#   DURATION=5 ROUNDS=1 benches/pgbench/run.sh      # a quick pass
#   PHASES="pgbench" benches/pgbench/run.sh          # only the pgbench matrix
#
# It builds pgnear (release), starts its own primary and streaming replica
# on free loopback ports (as the postgres OS user when run as root), a
# PgBouncer in transaction mode on the primary (installing Debian's
# pgbouncer if missing), two pgnear instances (`routing.default = "primary"`
# for a like-for-like comparison with PgBouncer, and the default read/write
# split), then runs the phases below and prints one table per phase.
# Everything it starts is stopped and its temporary directory removed on
# exit; results stay in $OUT.
#
# Phases (PHASES, space separated; default "pgbench wan memory"):
#   pgbench  pgbench -S in simple/extended/prepared at -c 1/16/64 and the
#            TPC-B-like mix at -c 16, interleaving targets, ROUNDS rounds of
#            DURATION seconds; medians, ratios, added latency at -c 1, peak RSS
#   wan      the primary behind a 40 ms (each way) delay relay, the replica
#            local: a 90/10 read/write mix (read and write p50/p99) and
#            read-after-write p50, pgnear against direct-to-primary
#   raw-wan  (not in the default) a read right after a write over the WAN:
#            the primary behind the delay relay as in wan, and the local
#            replica's WAL over a second relay of the same delay (its
#            primary_conninfo pointed there), synchronous_commit = on on the
#            primary; ROUNDS interleaved rounds of tools.py raw
#            (RAW_ITERATIONS times UPDATE a row, SELECT it at once and again
#            RAW_LATER_MS later; stale reads, reads served locally) against
#            direct-wan (the relay), pgnear-wan (next to the replica, default
#            settings) and, with BASELINE_BIN, pgnear-wan-base; and tools.py
#            visible once a round: how long after the client's COMMIT
#            returns the replica shows it. Settings are restored after.
#   memory   pgnear RSS streaming a 1 GB result to a slow reader; with idle
#            authenticated clients; with 10,000 idle TCP-only clients; and
#            what 10,000 authenticated clients do
#   profile  syscalls per transaction (pgnear, PgBouncer and the byte relay,
#            perf stat) and a perf record of pgnear, under pgbench -S -c 16
#            (simple, extended, prepared) and the TPC-B-like mix
#   optimistic  (not in the default) transactions opened with a plain BEGIN,
#            as ORMs open them, through pgnear's read/write split: a unit
#            that only reads (BEGIN; two SELECTs; END) and one that reads
#            then writes (BEGIN; SELECT; UPDATE; END), each at -c OPT_CLIENTS
#            (16) in OPT_MODES (simple extended) for DURATION seconds after
#            OPT_WARMUP (3) seconds; from pgnear's /metrics, how many ended
#            on the replica, how many moved to the primary (replays,
#            matched or not) and how many went there at once (learned)
#   instructions  user-space instructions per transaction of pgnear, of
#            PgBouncer and of the byte relay (valgrind's callgrind; installed
#            if missing), under
#            pgbench -c 4 -t INSTR_TRANSACTIONS: a figure the load on a shared
#            machine does not move; beside it the cache lines of code and of
#            data each fetches per transaction through a simulated cache of
#            INSTR_CACHE_BYTES (a cache PostgreSQL's backends keep evicting
#            between the proxy's wake-ups: roughly the lines a transaction
#            touches, which is what costs time under load)
#
# Settings (environment):
#   DURATION=10  ROUNDS=3  SCALE=10  CLIENTS="1 16 64"  MODES="simple extended prepared"
#   OUT=target/pgbench-results/<timestamp>   KEEP=1 keeps the cluster directory
#   WAN_DELAY_MS=40 WAN_CLIENTS=4 WAN_DURATION=20 RAW_ITERATIONS=100
#   RAW_LATER_MS=50 (raw-wan's second read) BASELINE_BIN (raw-wan's A/B)
#   IDLE_AUTH=1000 IDLE_TCP=10000 STREAM_RATE_MB=16
#   CASES="S-simple-c16 tpcb-simple-c16" (instead of the MODES x CLIENTS matrix)
#   SETSID=1 (proxies and pgbench each in a session of their own; see below)
#   RESTART=1 (each round on freshly started proxies; 0: one process each
#   for all rounds)
#   PROFILE_SECONDS=10 PROFILE_CASES="simple extended prepared tpcb-simple"
#   PROFILE_EXTRA='pool_mode = "transaction"' ([proxy] keys for the profiled pgnear)
#   INSTR_CASES="simple extended prepared tpcb-simple" INSTR_TRANSACTIONS=2500
#   INSTR_CLIENTS=4 INSTR_EXTRA='pool_mode = "transaction"' ([proxy] keys)
#   INSTR_CACHE_BYTES=16384 (the simulated last-level cache; 0: no simulation)
#   TARGETS="direct pgbouncer pgnear-primary pgnear-pool pgnear-split" (add
#   pgnear-primary-N or pgnear-pool-N for worker_threads = N event loops;
#   pgnear-primary-base or pgnear-pool-base run BASELINE_BIN, another build of
#   pgnear, for an A/B comparison in the same interleaved rounds; a -sock
#   suffix (pgnear-primary-sock, pgbouncer-sock, direct-sock) has pgbench
#   connect over the target's Unix socket instead of TCP, as a sidecar's
#   application would; proxies still reach PostgreSQL over TCP; a pgnear
#   target with -local, e.g. pgnear-primary-local, reaches PostgreSQL
#   through its Unix sockets instead, as a proxy on the database's host may;
#   relay is a byte relay that parses nothing, the floor under any proxy)
#   BOUNCER_EXTRA="server_round_robin = 1" (lines added to pgbouncer.ini)
#   POOL_SIZE=20 (PgBouncer's default_pool_size and pgnear-pool's pool_size)
#   PGNEAR_PG_BIN=/usr/lib/postgresql/15/bin
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS="python3 $HERE/tools.py"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-"1 16 64"}
MODES=${MODES:-"simple extended prepared"}
PHASES=${PHASES:-"pgbench wan memory"}
WAN_DELAY_MS=${WAN_DELAY_MS:-40}
WAN_CLIENTS=${WAN_CLIENTS:-4}
WAN_DURATION=${WAN_DURATION:-20}
RAW_ITERATIONS=${RAW_ITERATIONS:-100}
RAW_LATER_MS=${RAW_LATER_MS:-50}
IDLE_AUTH=${IDLE_AUTH:-1000}
IDLE_TCP=${IDLE_TCP:-10000}
STREAM_RATE_MB=${STREAM_RATE_MB:-16}
PROFILE_SECONDS=${PROFILE_SECONDS:-10}
PROFILE_CASES=${PROFILE_CASES:-"simple extended prepared tpcb-simple"}
INSTR_CASES=${INSTR_CASES:-"simple extended prepared tpcb-simple"}
INSTR_TRANSACTIONS=${INSTR_TRANSACTIONS:-2500}
INSTR_CACHE_BYTES=${INSTR_CACHE_BYTES:-16384}
BOUNCER_EXTRA=${BOUNCER_EXTRA:-}
PG_BIN=${PGNEAR_PG_BIN:-/usr/lib/postgresql/15/bin}
OUT=${OUT:-$ROOT/target/pgbench-results/$(date +%Y%m%d-%H%M%S)}
MAX_CONNECTIONS=$((IDLE_AUTH + 150))

has_phase() { [[ " $PHASES " == *" $1 "* ]]; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# --- prerequisites ----------------------------------------------------------

[[ -x $PG_BIN/initdb ]] || die "no PostgreSQL in $PG_BIN (apt-get install postgresql-15, or set PGNEAR_PG_BIN)"
PGBENCH=$PG_BIN/pgbench
PSQL=$PG_BIN/psql
command -v python3 >/dev/null || die "python3 is needed"
if ! command -v pgbouncer >/dev/null; then
    [[ $(id -u) == 0 ]] || die "pgbouncer is missing; install it (apt-get install pgbouncer) or run as root"
    log "installing pgbouncer"
    # The Debian package may try to start its own service; ours runs
    # separately on its own port with its own config, so that is harmless.
    apt-get install -y pgbouncer >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y pgbouncer >/dev/null; }
fi
if has_phase profile && ! command -v perf >/dev/null; then
    [[ $(id -u) == 0 ]] || die "perf is missing (apt-get install linux-perf)"
    apt-get install -y linux-perf >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y linux-perf >/dev/null; }
fi
ulimit -n "$(ulimit -Hn)" || true
(($(ulimit -n) >= IDLE_TCP + 100)) || log "warning: ulimit -n is $(ulimit -n); the idle-client test may run out of descriptors"

log "building pgnear (release)"
# Two builds: an example brings in the dev-dependencies, whose features
# (tokio's process driver) would otherwise end up in the measured binary.
(cd "$ROOT" && cargo build --release --bin pgnear >&2 && cargo build --release --example wan_relay >&2)
PGNEAR=$ROOT/target/release/pgnear
RELAY=$ROOT/target/release/examples/wan_relay
# An A/B run of a binary against itself measures only the noise: cargo does
# not re-link target/release/pgnear when another checkout built into the
# same target directory last and this one is already fresh.
if [[ ${TARGETS:-} == *-base* && -n ${BASELINE_BIN:-} ]] && cmp -s "$PGNEAR" "$BASELINE_BIN"; then
    log "warning: BASELINE_BIN is identical to $PGNEAR (touch src/lib.rs and rebuild): this is an A/A run"
fi

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/pgnear-bench.XXXXXX)
chmod 755 "$WORK"
if [[ $(id -u) == 0 ]]; then
    chown postgres: "$WORK"
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

# SETSID=1 (the default): every proxy and pgbench run in a session of their
# own, as services do, and as each PostgreSQL backend does (it calls
# setsid()). With the kernel's autogroup scheduling (sched_autogroup_enabled)
# the CPU is shared first between sessions: started from this script's
# session, pgbench and the proxy would share one share between them while
# each of the 16 backends had one of its own.
SETSID_CMD=()
[[ ${SETSID:-1} == 1 ]] && SETSID_CMD=(setsid -w)

PIDS=()
cleanup() {
    local status=$?
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    # PgBouncer runs under runuser as root: its pidfile names the process.
    # (It removes the file as it exits: a stop just before may race.)
    [[ -s $WORK/pgbouncer.pid ]] && kill "$(cat "$WORK/pgbouncer.pid" 2>/dev/null)" 2>/dev/null
    # pgnear drains on SIGTERM; a second one closes sessions still open.
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    for node in replica primary; do
        [[ -f $WORK/$node/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" -D "$WORK/$node" -m immediate -w stop >/dev/null 2>&1
    done
    if [[ -n ${KEEP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    log "results in $OUT"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r P_PRIMARY P_REPLICA P_BOUNCER P_NEAR_PRIMARY P_NEAR_SPLIT P_NEAR_WAN P_NEAR_MEM <<<"$($TOOLS freeport --count 7)"

{
    echo "# pgnear benchmark $(date -Is)"
    echo "# host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
    echo "# pgnear: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet -- src 2>/dev/null || echo '+dirty')"
    echo "# $("$PG_BIN/postgres" --version); $(pgbouncer --version | head -1)"
    echo "# DURATION=$DURATION ROUNDS=$ROUNDS SCALE=$SCALE CLIENTS=$CLIENTS MODES=$MODES"
} >"$OUT/env.txt"
cat "$OUT/env.txt" >&2

# --- PostgreSQL: a primary and one streaming replica --------------------------

log "starting a primary on $P_PRIMARY and a replica on $P_REPLICA in $WORK"
as_pg "$PG_BIN/initdb" -D "$WORK/primary" -A trust -U postgres -E UTF8 --locale=C --no-sync --no-instructions >/dev/null
cat >>"$WORK/primary/postgresql.conf" <<EOF
# pgnear benchmark
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = $MAX_CONNECTIONS
shared_buffers = 256MB
wal_level = replica
max_wal_senders = 10
wal_keep_size = 512MB
hot_standby = on
hot_standby_feedback = on
fsync = off
logging_collector = off
EOF
cat >"$WORK/primary/pg_hba.conf" <<EOF
local all all trust
local replication all trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 trust
EOF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/primary" -o "-p $P_PRIMARY" -l "$WORK/primary.log" -w start >/dev/null
as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$P_PRIMARY" -U postgres -D "$WORK/replica" -R -X stream --no-sync
as_pg "$PG_BIN/pg_ctl" -D "$WORK/replica" -o "-p $P_REPLICA" -l "$WORK/replica.log" -w start >/dev/null

psql_at() { "$PSQL" -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"; }
[[ $(psql_at "$P_REPLICA" "SELECT pg_is_in_recovery()") == t ]] || die "the replica is not in recovery"

log "pgbench -i -s $SCALE"
"$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$P_PRIMARY" -U postgres postgres >"$OUT/pgbench-init.log" 2>&1
psql_at "$P_PRIMARY" "VACUUM ANALYZE" >/dev/null

wait_replica() {
    local lsn
    lsn=$(psql_at "$P_PRIMARY" "SELECT pg_current_wal_lsn()")
    for _ in $(seq 600); do
        [[ $(psql_at "$P_REPLICA" "SELECT pg_last_wal_replay_lsn() >= '$lsn'") == t ]] && return 0
        sleep 0.1
    done
    die "the replica did not catch up"
}
wait_replica

# --- PgBouncer --------------------------------------------------------------

start_pgbouncer() { start_pgbouncer_with; }

# start_pgbouncer_with [WRAPPER ARGS...]: PgBouncer, run by WRAPPER if given
start_pgbouncer_with() {
    echo '"postgres" ""' >"$WORK/userlist.txt"
    mkdir -p "$WORK/bouncer-sock" && chown postgres: "$WORK/bouncer-sock" 2>/dev/null || true
    cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$P_PRIMARY

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $P_BOUNCER
unix_socket_dir = $WORK/bouncer-sock
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = ${POOL_SIZE:-20}
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
admin_users = postgres
$BOUNCER_EXTRA
EOF
    chown postgres: "$WORK"/userlist.txt "$WORK"/pgbouncer.ini 2>/dev/null || true
    # A wrapper (valgrind) would trace setsid instead of PgBouncer.
    local detach=("${SETSID_CMD[@]}")
    (($#)) && detach=()
    as_pg "$@" "${detach[@]}" pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
    PIDS+=("$!")
    wait_port "$P_BOUNCER" pgbouncer
    # runuser may stay in between: the pidfile names pgbouncer itself.
    BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")
    PIDS+=("$BOUNCER_PID")
}

# --- pgnear -------------------------------------------------------------------

# write_pgnear_config FILE PORT PRIMARY_PORT ROUTING_DEFAULT [EXTRA_PROXY_KEYS]
#   [PRIMARY_REGION]; NODE_HOST (default 127.0.0.1) is where both servers
#   are reached: $WORK reaches them through their Unix sockets
write_pgnear_config() {
    cat >"$1" <<EOF
[proxy]
listen = "127.0.0.1:$2"
region = "local"
$5

[[nodes]]
name = "primary"
host = "${NODE_HOST:-127.0.0.1}"
port = $3
region = "${6:-local}"

[[nodes]]
name = "replica"
host = "${NODE_HOST:-127.0.0.1}"
port = $P_REPLICA
region = "local"

[[users]]
name = "postgres"
auth = "trust"

[routing]
default = "$4"

[monitor]
interval_ms = 50
EOF
}

wait_port() {
    for _ in $(seq 300); do
        "$PSQL" -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "SELECT 1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$2 on port $1 did not come up"
}

# start_relay NAME [WRAPPER...] -- RELAY_ARGS...: starts the wan_relay example
# (under WRAPPER, e.g. valgrind) and waits for its port; sets RELAY_PID and
# RELAY_PORT. Its stderr goes to $OUT/NAME.log.
start_relay() {
    local name=$1 wrapper=()
    shift
    while [[ $1 != -- ]]; do wrapper+=("$1"); shift; done
    shift
    local port_file=$WORK/$name.port
    rm -f "$port_file"
    [[ ${#wrapper[@]} == 0 ]] && wrapper=("${SETSID_CMD[@]}")
    "${wrapper[@]}" "$RELAY" "$@" --port-file "$port_file" >/dev/null 2>"$OUT/$name.log" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    for _ in $(seq 300); do [[ -s $port_file ]] && break; sleep 0.1; done
    [[ -s $port_file ]] || die "$name did not start (see $OUT/$name.log)"
    RELAY_PORT=$(cat "$port_file")
}

# start_pgnear NAME CONFIG PORT [ENV=VALUE...]: sets NEAR_PID
start_pgnear() {
    local bin=$PGNEAR
    [[ $1 == *-base ]] && bin=${BASELINE_BIN:?"set BASELINE_BIN to the pgnear binary for $1"}
    "${SETSID_CMD[@]}" env "${@:4}" "$bin" --config "$2" >"$OUT/$1.log" 2>&1 &
    NEAR_PID=$!
    PIDS+=("$NEAR_PID")
    wait_port "$3" "pgnear ($1)"
}

# pgnear drains on SIGTERM; a second one closes sessions still open.
stop_pid() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

rss_kb() { $TOOLS rss "$1"; } # "VmRSS VmHWM"

# --- phase: pgbench -----------------------------------------------------------

# cpu_ticks PID: user + system clock ticks so far
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# per_txn TICKS TXNS: clock ticks as microseconds per transaction
per_txn() { awk -v t="$1" -v n="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", t * 1e6 / hz / n}'; }

# run_pgbench TARGET PORT PROXY_PID|- NAME ARGS...
#   -> "tps lat_ms status proxy_cpu pg_cpu pgbench_cpu proxy_sleeps proxy_preempted p50_us"
#   (CPU: us per transaction; the proxy's voluntary and involuntary context
#   switches per transaction; p50_us: at -c 1, the median latency of single
#   transactions, from a 20% sample pgbench logs, which a stall of part of
#   the run moves less than it moves the average)
run_pgbench() {
    local target=$1 port=$2 pid=$3 name=$4
    shift 4
    local log="$OUT/runs/$name.$target.r$ROUND.log" txlog="$OUT/runs/$name.$target.r$ROUND.tx"
    [[ " $* " == *" -c 1 "* ]] && set -- "$@" -l --sampling-rate=0.2 --log-prefix="$txlog"
    local rc=0 before=0 after=0 pg_before pg_after postmaster sw_before="0 0" sw_after="0 0"
    postmaster=$(head -1 "$WORK/primary/postmaster.pid")
    [[ $pid != - ]] && before=$(cpu_ticks "$pid") && sw_before=$($TOOLS switches "$pid")
    pg_before=$($TOOLS server-ticks "$postmaster")
    local TIMEFORMAT='%3U %3S'
    { time "${SETSID_CMD[@]}" "$PGBENCH" -n -h "$(target_host "$target")" -p "$port" -U postgres "$@" postgres >"$log" 2>&1 || rc=$?; } 2>"$log.time"
    pg_after=$($TOOLS server-ticks "$postmaster")
    [[ $pid != - ]] && after=$(cpu_ticks "$pid") && sw_after=$($TOOLS switches "$pid")
    local tps lat txns cpu=nan pg=nan bench=nan sleeps=nan preempted=nan p50=nan
    compgen -G "$txlog.*" >/dev/null && p50=$($TOOLS p50 --prefix "$txlog")
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$log")
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' "$log")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log")
    if [[ $pid != - && ${txns:-0} -gt 0 ]]; then
        cpu=$(per_txn $((after - before)) "$txns")
        read -r sleeps preempted < <(awk -v b="$sw_before" -v a="$sw_after" -v n="$txns" 'BEGIN {
            split(b, x, " "); split(a, y, " "); printf "%.2f %.2f\n", (y[1] - x[1]) / n, (y[2] - x[2]) / n }')
    fi
    if [[ ${txns:-0} -gt 0 ]]; then
        pg=$(per_txn $((pg_after - pg_before)) "$txns")
        bench=$(awk -v n="$txns" '{printf "%.1f", ($1 + $2) * 1e6 / n}' "$log.time")
    fi
    if [[ $rc != 0 || -z $tps ]]; then
        echo "nan nan failed nan nan nan nan nan nan"
    else
        echo "$tps $lat ok $cpu $pg $bench $sleeps $preempted $p50"
    fi
}

# target_host TARGET: where pgbench connects: 127.0.0.1, or the directory of
# the target's Unix socket for a -sock target.
target_host() {
    case $1 in
        direct-sock) echo "$WORK" ;;
        pgbouncer-sock) echo "$WORK/bouncer-sock" ;;
        *-sock) echo "$WORK/sock-$1" ;;
        *) echo 127.0.0.1 ;;
    esac
}

# Targets: direct, pgbouncer, pgnear-primary (routing.default = "primary"),
# pgnear-pool (the same in transaction pooling with PgBouncer's pool size of
# 20: like for like with PgBouncer), pgnear-split (the default read/write
# split); optional pgnear-primary-N and pgnear-pool-N (as pgnear-primary and
# pgnear-pool with worker_threads = N event loops instead of the default,
# half the cores), and -sock variants of each (see target_host); and relay,
# the floor: a byte relay in front of the primary that parses nothing (the
# wan_relay example with --plain, one tokio event loop like pgnear's default).
TARGETS=${TARGETS:-"direct pgbouncer pgnear-primary pgnear-pool pgnear-split"}

# start_proxies: starts every proxy target (PgBouncer, the relay, each pgnear)
# and sets port[] and pid[] (phase_pgbench's). With RESTART=1 (the default)
# each round runs on processes started for it: how a process's memory
# happens to be placed moves its speed by up to 20% for as long as it runs
# (two instances of one binary, side by side, differed that much over three
# rounds), so that is sampled round by round instead of fixed for the run.
start_proxies() {
    if [[ " $TARGETS " == *" pgbouncer "* || " $TARGETS " == *" pgbouncer-sock "* ]]; then
        start_pgbouncer
        port[pgbouncer]=$P_BOUNCER
        pid[pgbouncer]=$BOUNCER_PID
        port[pgbouncer-sock]=$P_BOUNCER
        pid[pgbouncer-sock]=$BOUNCER_PID
        # PgBouncer supports protocol-level prepared statements in
        # transaction mode from 1.21 (max_prepared_statements).
        if pgbouncer --version | head -1 | awk '{split($2, v, "."); exit !(v[1] > 1 || v[2] >= 21)}'; then
            bouncer_prepared=1
            echo "max_prepared_statements = 100" >>"$WORK/pgbouncer.ini"
            kill -HUP "$BOUNCER_PID"
        fi
    fi
    if [[ " $TARGETS " == *" relay "* ]]; then
        start_relay plain-relay -- --plain --target "127.0.0.1:$P_PRIMARY"
        pid[relay]=$RELAY_PID
        port[relay]=$RELAY_PORT
    fi
    local t p routing
    for t in "${targets[@]}"; do
        [[ $t == pgnear-* ]] || continue
        read -r p _ <<<"$($TOOLS freeport)"
        routing=primary
        [[ $t == pgnear-split* ]] && routing=auto
        local extra=""
        [[ $t == pgnear-pool* ]] && extra=$'pool_mode = "transaction"\npool_size = '"${POOL_SIZE:-20}"
        [[ $t =~ ^pgnear-[a-z]+-([0-9]+)$ ]] && extra+=$'\nworker_threads = '"${BASH_REMATCH[1]}"
        if [[ $t == *-sock ]]; then
            mkdir -p "$(target_host "$t")"
            extra+=$'\nunix_socket_dir = "'"$(target_host "$t")"'"'
        fi
        local node_host=127.0.0.1
        [[ $t == *-local* ]] && node_host=$WORK
        NODE_HOST=$node_host write_pgnear_config "$WORK/$t.toml" "$p" "$P_PRIMARY" "$routing" "$extra"
        start_pgnear "$t" "$WORK/$t.toml" "$p"
        port[$t]=$p
        pid[$t]=$NEAR_PID
    done
    log "warm-up"
    for t in "${targets[@]}"; do run_pgbench "$t" "${port[$t]}" - warmup -S -c 4 -j 2 -T 2 >/dev/null; done
}

# stop_proxies: keeps each proxy's peak RSS so far (hwm[], the highest over
# the instances a target had) and stops it.
stop_proxies() {
    local t rss peak
    for t in "${targets[@]}"; do
        [[ $t == pgnear-* || $t == pgbouncer ]] || continue
        read -r rss peak <<<"$(rss_kb "${pid[$t]}")"
        last_rss[$t]=${rss:-0}
        ((${peak:-0} > ${hwm[$t]:-0})) && hwm[$t]=$peak
    done
    for t in "${targets[@]}"; do
        [[ ${pid[$t]} != - && ${pid[$t]} != stopped ]] || continue
        stop_pid "${pid[$t]}"
        # pgbouncer-sock shares PgBouncer's process.
        local u
        for u in "${!pid[@]}"; do [[ ${pid[$u]} == "${pid[$t]}" && $u != "$t" ]] && pid[$u]=stopped; done
        pid[$t]=stopped
    done
    # Their PIDs may be reused: the exit trap must not signal them.
    local alive=() p
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    PIDS=("${alive[@]}")
}

phase_pgbench() {
    mkdir -p "$OUT/runs"
    local targets=($TARGETS)
    declare -A port=([direct]=$P_PRIMARY [direct-sock]=$P_PRIMARY) pid=([direct]=- [direct-sock]=-)
    declare -A hwm=() last_rss=()
    local bouncer_prepared=0 ROUND=0
    start_proxies
    local cases=()
    for mode in $MODES; do
        for c in $CLIENTS; do cases+=("S-$mode-c$c"); done
    done
    cases+=("tpcb-simple-c16")
    # CASES overrides the matrix, e.g. CASES="S-simple-c16 tpcb-simple-c16".
    [[ -n ${CASES:-} ]] && read -r -a cases <<<"$CASES"

    printf 'round\tcase\ttarget\ttps\tlatency_ms\tstatus\tload1\tproxy_cpu_us_per_txn\tpostgres_cpu_us_per_txn\tpgbench_cpu_us_per_txn\tproxy_sleeps_per_txn\tproxy_preempted_per_txn\tlatency_p50_us\n' >"$OUT/results.tsv"
    for ROUND in $(seq "$ROUNDS"); do
        if [[ ${RESTART:-1} == 1 && $ROUND -gt 1 ]]; then
            stop_proxies
            start_proxies
        fi
        local k=0
        for cs in "${cases[@]}"; do
            k=$((k + 1))
            IFS=- read -r kind mode c <<<"$cs"
            c=${c#c}
            local args=(-M "$mode" -c "$c" -j $((c < 2 ? c : 2)) -T "$DURATION")
            [[ $kind == S ]] && args+=(-S)
            # Rotate the order of targets from case to case and round to round.
            local n=${#targets[@]} i
            for ((i = 0; i < n; i++)); do
                t=${targets[$(((i + ROUND + k) % n))]}
                local load
                load=$(load1)
                if [[ $t == pgbouncer* && $mode == prepared && $bouncer_prepared == 0 ]]; then
                    printf '%s\t%s\t%s\tnan\tnan\tn/a\t%s\tnan\tnan\tnan\tnan\tnan\tnan\n' "$ROUND" "$cs" "$t" "$load" >>"$OUT/results.tsv"
                    continue
                fi
                read -r tps lat status cpu pg bench sleeps preempted p50 <<<"$(run_pgbench "$t" "${port[$t]}" "${pid[$t]}" "$cs" "${args[@]}")"
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$cs" "$t" "$tps" "$lat" "$status" "$load" "$cpu" "$pg" "$bench" "$sleeps" "$preempted" "$p50" >>"$OUT/results.tsv"
                local proxy_cpu=${cpu}us
                [[ $cpu == nan ]] && proxy_cpu=n/a
                log "round $ROUND $cs $t: tps=$tps lat=${lat}ms cpu/txn proxy=$proxy_cpu postgres=${pg}us pgbench=${bench}us proxy switches/txn=$sleeps/$preempted ($status, load $load)"
            done
        done
    done
    stop_proxies
    : >"$OUT/rss.tsv"
    for t in "${targets[@]}"; do
        [[ $t == pgnear-* || $t == pgbouncer ]] || continue
        printf '%s\t%s\t%s\n' "$t" "${last_rss[$t]}" "${hwm[$t]}" >>"$OUT/rss.tsv"
    done
    $TOOLS summarize --results "$OUT/results.tsv" --rss "$OUT/rss.tsv" | tee "$OUT/summary.txt"
    return 0
}

# --- phase: WAN -------------------------------------------------------------------

phase_wan() {
    mkdir -p "$OUT/wan"
    start_relay relay -- --target "127.0.0.1:$P_PRIMARY" --delay-ms "$WAN_DELAY_MS"
    local relay_pid=$RELAY_PID p_relay=$RELAY_PORT
    log "relay on $p_relay: primary $WAN_DELAY_MS ms away each way"
    # This pgnear runs next to the replica; the primary is across the WAN.
    write_pgnear_config "$WORK/pgnear-wan.toml" "$P_NEAR_WAN" "$p_relay" auto "" remote
    start_pgnear pgnear-wan "$WORK/pgnear-wan.toml" "$P_NEAR_WAN"
    local near_wan=$NEAR_PID
    sleep 2 # a few monitor rounds: RTT and lag known

    cat >"$WORK/read.sql" <<EOF
\\set aid random(1, 100000 * $SCALE)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
EOF
    cat >"$WORK/write.sql" <<EOF
\\set aid random(1, 100000 * $SCALE)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
EOF
    declare -A port=([direct-wan]=$p_relay [pgnear-wan]=$P_NEAR_WAN)
    printf 'round\ttarget\tread_n\tread_p50_ms\tread_p99_ms\twrite_n\twrite_p50_ms\twrite_p99_ms\traw_write_p50_ms\traw_read_p50_ms\traw_read_p99_ms\tstale_reads\ttps\tload1\n' >"$OUT/wan.tsv"
    for ROUND in $(seq "$ROUNDS"); do
        local targets=(direct-wan pgnear-wan)
        ((ROUND % 2 == 0)) && targets=(pgnear-wan direct-wan)
        for t in "${targets[@]}"; do
            local load prefix="$OUT/wan/$t.r$ROUND"
            load=$(load1)
            rm -f "$prefix".log*
            "$PGBENCH" -n -h 127.0.0.1 -p "${port[$t]}" -U postgres -M simple -c "$WAN_CLIENTS" -j 2 -T "$WAN_DURATION" \
                -f "$WORK/read.sql@9" -f "$WORK/write.sql@1" -l --log-prefix="$prefix.log" postgres >"$prefix.out" 2>&1 ||
                log "pgbench failed against $t: see $prefix.out"
            local tps mix raw
            tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$prefix.out")
            mix=$($TOOLS pct --prefix "$prefix.log" --names read,write)
            raw=$($TOOLS raw --port "${port[$t]}" --iterations "$RAW_ITERATIONS" --rows $((100000 * SCALE)) \
                --primary-port "$P_PRIMARY")
            log "WAN round $ROUND $t: $mix $raw tps=$tps (load $load)"
            # key=value pairs into the TSV columns
            local -A v=()
            for kv in $mix $raw; do v[${kv%%=*}]=${kv#*=}; done
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$t" \
                "${v[read_n]}" "${v[read_p50_ms]}" "${v[read_p99_ms]}" "${v[write_n]}" "${v[write_p50_ms]}" "${v[write_p99_ms]}" \
                "${v[raw_write_p50_ms]}" "${v[raw_read_p50_ms]}" "${v[raw_read_p99_ms]}" "${v[stale_reads]}" "${tps:-nan}" "$load" >>"$OUT/wan.tsv"
        done
    done
    $TOOLS summarize-wan --wan "$OUT/wan.tsv" | tee -a "$OUT/summary.txt"
    stop_pid "$near_wan"
    stop_pid "$relay_pid"
}

# --- phase: raw-wan ----------------------------------------------------------------

# replica_wal_from PORT CONNINFO: sets the replica's primary_conninfo (ALTER
# SYSTEM, reload), waits until its WAL receiver streams from PORT and it has
# caught up with the primary
replica_wal_from() {
    psql_at "$P_REPLICA" "ALTER SYSTEM SET primary_conninfo = '${2//\'/\'\'}'"
    psql_at "$P_REPLICA" "SELECT pg_reload_conf()" >/dev/null
    local source=""
    # The WAL receiver restarts on the change; the startup process may take
    # wal_retrieve_retry_interval (5 s) to start the next one.
    for _ in $(seq 300); do
        source=$(psql_at "$P_REPLICA" "SELECT status || ':' || sender_port FROM pg_stat_wal_receiver")
        [[ $source == "streaming:$1" ]] && break
        sleep 0.1
    done
    [[ $source == "streaming:$1" ]] || die "the replica's WAL receiver is not streaming from port $1 (${source:-no receiver})"
    wait_replica
}

# primary_setting NAME VALUE: ALTER SYSTEM on the primary and a reload
# (VALUE "" resets it)
primary_setting() {
    if [[ -z $2 ]]; then
        psql_at "$P_PRIMARY" "ALTER SYSTEM RESET $1"
    else
        psql_at "$P_PRIMARY" "ALTER SYSTEM SET $1 = '$2'"
    fi
    psql_at "$P_PRIMARY" "SELECT pg_reload_conf()" >/dev/null
    for _ in $(seq 50); do
        [[ -z $2 || $(psql_at "$P_PRIMARY" "SHOW $1") == "$2" ]] && return 0
        sleep 0.1
    done
    die "the primary's $1 did not become $2"
}

phase_raw_wan() {
    start_relay raw-wan-relay -- --target "127.0.0.1:$P_PRIMARY" --delay-ms "$WAN_DELAY_MS"
    local relay_pid=$RELAY_PID p_relay=$RELAY_PORT
    start_relay raw-wan-wal-relay -- --target "127.0.0.1:$P_PRIMARY" --delay-ms "$WAN_DELAY_MS"
    local wal_relay_pid=$RELAY_PID p_wal_relay=$RELAY_PORT
    log "relays on $p_relay (clients) and $p_wal_relay (the replica's WAL): primary $WAN_DELAY_MS ms away each way"

    local old_conninfo old_sync sync_changed=0
    old_conninfo=$(psql_at "$P_REPLICA" "SHOW primary_conninfo")
    replica_wal_from "$p_wal_relay" "host=127.0.0.1 port=$p_wal_relay user=postgres application_name=replica"
    log "the replica streams its WAL through $p_wal_relay"
    # The harness sets no synchronous_commit (on, PostgreSQL's default);
    # make sure, in case postgresql.conf or an earlier run says otherwise.
    old_sync=$(psql_at "$P_PRIMARY" "SHOW synchronous_commit")
    if [[ $old_sync != on ]]; then
        log "synchronous_commit is $old_sync on the primary: on for this phase"
        primary_setting synchronous_commit on
        sync_changed=1
    fi

    # pgnear next to the replica, the primary across the WAN, as in phase_wan;
    # default settings. (Its log would overwrite phase_wan's.)
    [[ -f $OUT/pgnear-wan.log ]] && mv "$OUT/pgnear-wan.log" "$OUT/pgnear-wan.phase-wan.log"
    declare -A port=([direct-wan]=$p_relay [pgnear-wan]=$P_NEAR_WAN) pid=()
    local targets=(direct-wan pgnear-wan) t p
    write_pgnear_config "$WORK/pgnear-raw-wan.toml" "$P_NEAR_WAN" "$p_relay" auto "" remote
    start_pgnear pgnear-wan "$WORK/pgnear-raw-wan.toml" "$P_NEAR_WAN"
    pid[pgnear-wan]=$NEAR_PID
    if [[ -n ${BASELINE_BIN:-} ]]; then
        cmp -s "$PGNEAR" "$BASELINE_BIN" && log "warning: BASELINE_BIN is identical to $PGNEAR: this is an A/A run"
        read -r p _ <<<"$($TOOLS freeport)"
        write_pgnear_config "$WORK/pgnear-raw-wan-base.toml" "$p" "$p_relay" auto "" remote
        start_pgnear pgnear-wan-base "$WORK/pgnear-raw-wan-base.toml" "$p"
        pid[pgnear-wan-base]=$NEAR_PID
        port[pgnear-wan-base]=$p
        targets+=(pgnear-wan-base)
    fi
    sleep 3 # a few monitor rounds: RTT and lag known

    local cols=(raw_n raw_write_p50_ms raw_write_p90_ms raw_write_p99_ms raw_read_p50_ms raw_read_p90_ms
        raw_read_p99_ms stale_reads raw_read_local raw_later_n raw_later_p50_ms raw_later_p90_ms raw_later_p99_ms
        stale_later raw_later_local)
    local vcols=(visible_n visible_p50_ms visible_p90_ms visible_p99_ms visible_first_poll visible_polls_p50 visible_timeouts)
    (IFS=$'\t'; echo "round"$'\t'"target"$'\t'"${cols[*]}"$'\t'"load1") >"$OUT/raw-wan.tsv"
    (IFS=$'\t'; echo "round"$'\t'"${vcols[*]}"$'\t'"load1") >"$OUT/raw-wan-visible.tsv"
    local rows=$((100000 * SCALE)) n=${#targets[@]}
    for ROUND in $(seq "$ROUNDS"); do
        local i
        for ((i = 0; i < n; i++)); do
            t=${targets[$(((i + ROUND - 1) % n))]}
            local load raw c line
            load=$(load1)
            raw=$($TOOLS raw --port "${port[$t]}" --iterations "$RAW_ITERATIONS" --rows "$rows" \
                --later-ms "$RAW_LATER_MS" --primary-port "$P_PRIMARY")
            log "raw-wan round $ROUND $t: $raw (load $load)"
            local -A v=()
            for kv in $raw; do v[${kv%%=*}]=${kv#*=}; done
            line="$ROUND"$'\t'"$t"
            for c in "${cols[@]}"; do line+=$'\t'"${v[$c]:-nan}"; done
            printf '%s\t%s\n' "$line" "$load" >>"$OUT/raw-wan.tsv"
        done
        load=$(load1)
        raw=$($TOOLS visible --port "$p_relay" --replica-port "$P_REPLICA" --iterations "$RAW_ITERATIONS" --rows "$rows")
        log "raw-wan round $ROUND visible: $raw (load $load)"
        local -A v=()
        for kv in $raw; do v[${kv%%=*}]=${kv#*=}; done
        line="$ROUND"
        for c in "${vcols[@]}"; do line+=$'\t'"${v[$c]:-nan}"; done
        printf '%s\t%s\n' "$line" "$load" >>"$OUT/raw-wan-visible.tsv"
    done
    $TOOLS summarize-raw-wan --raw "$OUT/raw-wan.tsv" --visible "$OUT/raw-wan-visible.tsv" --later-ms "$RAW_LATER_MS" |
        tee -a "$OUT/summary.txt"

    for t in "${targets[@]}"; do [[ -n ${pid[$t]:-} ]] && stop_pid "${pid[$t]}"; done
    ((sync_changed)) && primary_setting synchronous_commit ""
    replica_wal_from "$P_PRIMARY" "$old_conninfo"
    log "the replica streams from the primary again"
    stop_pid "$wal_relay_pid"
    stop_pid "$relay_pid"
}

# --- phase: memory ------------------------------------------------------------

# A fresh pgnear per test, so that each RSS figure is about that test alone.
# mem_start NAME [EXTRA_PROXY_KEYS]
mem_start() {
    write_pgnear_config "$WORK/pgnear-mem.toml" "$P_NEAR_MEM" "$P_PRIMARY" auto \
        "max_client_connections = 20000
startup_timeout_ms = 3600000
${2:-}"
    start_pgnear "pgnear-mem-$1" "$WORK/pgnear-mem.toml" "$P_NEAR_MEM"
    MEM_PID=$NEAR_PID
    sleep 1
    read -r MEM_BASE _ <<<"$(rss_kb "$MEM_PID")"
}

# poll_rss PID FILE: the highest VmRSS seen, written to FILE until killed
poll_rss() {
    local max=0 rss
    while kill -0 "$1" 2>/dev/null; do
        read -r rss _ <<<"$($TOOLS rss "$1" 2>/dev/null || echo 0 0)"
        ((rss > max)) && max=$rss && echo "$max" >"$2"
        sleep 0.2
    done
}

# idle_test NAME MODE COUNT: holds COUNT connections, records RSS
# idle_test NAME MODE COUNT [EXTRA_PROXY_KEYS]
idle_test() {
    mem_start "$1" "${4:-}"
    local out="$OUT/memory-$1.out"
    $TOOLS idle --port "$P_NEAR_MEM" --mode "$2" --count "$3" >"$out" 2>&1 &
    local idle_pid=$!
    PIDS+=("$idle_pid")
    for _ in $(seq 1200); do grep -q READY "$out" && break; sleep 0.5; done
    sleep 3
    local rss hwm
    read -r rss hwm <<<"$(rss_kb "$MEM_PID")"
    local outcome
    outcome=$(grep READY "$out" | cut -d' ' -f2-)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$MEM_BASE" "$rss" "$hwm" "$(load1)" "$outcome" >>"$OUT/memory.tsv"
    log "memory $1: baseline ${MEM_BASE} kB, now ${rss} kB, peak ${hwm} kB; $outcome"
    stop_pid "$idle_pid"
    stop_pid "$MEM_PID"
}

phase_memory() {
    printf 'test\tbaseline_kb\trss_kb\thwm_kb\tload1\toutcome\n' >"$OUT/memory.tsv"

    mem_start stream
    poll_rss "$MEM_PID" "$WORK/stream.max" &
    local poller=$!
    PIDS+=("$poller")
    log "streaming 1M rows of 1000 bytes through pgnear to a reader limited to $STREAM_RATE_MB MB/s"
    local result
    result=$($TOOLS stream --port "$P_NEAR_MEM" --rate-mb "$STREAM_RATE_MB")
    local rss hwm
    read -r rss hwm <<<"$(rss_kb "$MEM_PID")"
    stop_pid "$poller"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' stream-1GB-slow-reader "$MEM_BASE" "$(cat "$WORK/stream.max")" "$hwm" "$(load1)" "$result" >>"$OUT/memory.tsv"
    log "memory stream: baseline ${MEM_BASE} kB, polled max ${rss} kB, VmHWM ${hwm} kB; $result"
    stop_pid "$MEM_PID"

    idle_test "idle-auth-$IDLE_AUTH" auth "$IDLE_AUTH"
    idle_test "idle-tcp-$IDLE_TCP" tcp "$IDLE_TCP"
    idle_test "auth-attempt-$IDLE_TCP" auth "$IDLE_TCP"
    # In transaction pooling an idle session holds no server connection.
    idle_test "pooled-auth-$IDLE_TCP" auth "$IDLE_TCP" 'pool_mode = "transaction"'
    $TOOLS summarize-memory --memory "$OUT/memory.tsv" | tee -a "$OUT/summary.txt"
}

# --- phase: profile -------------------------------------------------------------

# count_syscalls TARGET PID PORT NAME PGBENCH_ARGS...: one row of syscalls.tsv
count_syscalls() {
    local target=$1 pid=$2 port=$3 name=$4
    shift 4
    local events=sendto,recvfrom,epoll_wait,futex,write,read
    local file="$OUT/profile/$name/syscalls-$target.txt"
    local tracepoints
    tracepoints=$(sed 's/\([a-z_][a-z_]*\)/syscalls:sys_enter_\1/g' <<<"$events")
    perf stat -e "$tracepoints" -p "$pid" -o "$file" &
    local perf_pid=$!
    # The same system-wide: pgbench, PostgreSQL and the proxy together.
    perf stat -a -e "$tracepoints,context-switches" -o "$file.all" &
    local perf_all=$!
    sleep 0.5
    local before after
    before=$(awk '{print $14, $15}' "/proc/$pid/stat")
    "$PGBENCH" -n "$@" -T "$PROFILE_SECONDS" -h 127.0.0.1 -p "$port" -U postgres postgres >"$file.pgbench" 2>&1 || true
    after=$(awk '{print $14, $15}' "/proc/$pid/stat")
    kill -INT "$perf_pid" "$perf_all"
    wait "$perf_pid" || true
    wait "$perf_all" || true
    local txns
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$file.pgbench")
    printf '%s\t%s\t%s' "$name" "$target" "${txns:-0}" >>"$OUT/profile/syscalls.tsv"
    # user and system CPU per transaction, microseconds
    awk -v b="$before" -v a="$after" -v t="${txns:-0}" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        split(b, x, " "); split(a, y, " ");
        printf "\t%.1f\t%.1f", t ? (y[1] - x[1]) * 1e6 / hz / t : 0, t ? (y[2] - x[2]) * 1e6 / hz / t : 0 }' >>"$OUT/profile/syscalls.tsv"
    per_txn() {
        local n
        n=$(awk -v e="$1" '$2 == e {gsub(",", "", $1); print $1}' "$2")
        awk -v n="${n:-0}" -v t="${txns:-0}" 'BEGIN{printf "%.2f", t ? n / t : 0}'
    }
    for e in ${events//,/ }; do
        printf '\t%s' "$(per_txn "syscalls:sys_enter_$e" "$file")" >>"$OUT/profile/syscalls.tsv"
    done
    printf '\n%s\t%s\t%s\t-\t-' "$name" "$target+all" "${txns:-0}" >>"$OUT/profile/syscalls.tsv"
    for e in ${events//,/ }; do
        printf '\t%s' "$(per_txn "syscalls:sys_enter_$e" "$file.all")" >>"$OUT/profile/syscalls.tsv"
    done
    printf '\t%s\n' "$(per_txn context-switches "$file.all")" >>"$OUT/profile/syscalls.tsv"
}

phase_profile() {
    mkdir -p "$OUT/profile"
    write_pgnear_config "$WORK/pgnear-profile.toml" "$P_NEAR_PRIMARY" "$P_PRIMARY" primary "${PROFILE_EXTRA:-}"
    start_pgnear pgnear-profile "$WORK/pgnear-profile.toml" "$P_NEAR_PRIMARY"
    local pid=$NEAR_PID
    start_pgbouncer
    # The floor: the byte relay's syscalls and CPU under the same pgbench.
    start_relay profile-relay -- --plain --target "127.0.0.1:$P_PRIMARY"
    local relay=$RELAY_PID p_relay=$RELAY_PORT
    # Rows "<target>+all" count every process on the machine (pgbench,
    # PostgreSQL and the proxy), with context switches in the last column.
    printf 'case\ttarget\ttransactions\tuser_us\tsys_us\tsendto\trecvfrom\tepoll_wait\tfutex\twrite\tread\tcswitch\n' >"$OUT/profile/syscalls.tsv"
    for name in $PROFILE_CASES; do
        local dir=$OUT/profile/$name mode=${name#tpcb-} args=(-c 16 -j 2)
        [[ $name == tpcb-* ]] || args+=(-S)
        args+=(-M "$mode")
        mkdir -p "$dir"
        # Syscalls per transaction (tracepoints work without a PMU), pgnear
        # and PgBouncer on the same pgbench.
        log "syscalls per transaction under pgbench ${args[*]} (load $(load1))"
        count_syscalls pgnear "$pid" "$P_NEAR_PRIMARY" "$name" "${args[@]}"
        [[ $mode == prepared ]] || count_syscalls pgbouncer "$BOUNCER_PID" "$P_BOUNCER" "$name" "${args[@]}"
        count_syscalls relay "$relay" "$p_relay" "$name" "${args[@]}"
        # A sampled profile with DWARF call graphs (cpu-clock: no PMU in VMs).
        log "profiling pgnear under pgbench ${args[*]} (load $(load1))"
        "$PGBENCH" -n "${args[@]}" -T $((PROFILE_SECONDS + 4)) -h 127.0.0.1 -p "$P_NEAR_PRIMARY" \
            -U postgres postgres >"$dir/pgbench.out" 2>&1 &
        local bench=$!
        sleep 2
        perf record -F 1999 -e cpu-clock --call-graph dwarf,16384 -p "$pid" -o "$dir/perf.data" \
            -- sleep "$PROFILE_SECONDS" >/dev/null 2>&1
        wait "$bench" || true
        local report=(perf report -i "$dir/perf.data" --stdio --percent-limit 0.3)
        "${report[@]}" --no-children --sort symbol -g none >"$dir/self.txt" 2>/dev/null
        "${report[@]}" --children --sort symbol -g none >"$dir/children.txt" 2>/dev/null
        "${report[@]}" --no-children --sort dso -g none >"$dir/dso.txt" 2>/dev/null
        log "profile ($name): $(grep -m1 '^tps' "$dir/pgbench.out"); reports and perf.data in $dir"
    done
    column -t "$OUT/profile/syscalls.tsv" | tee -a "$OUT/summary.txt"
    stop_pid "$relay"
    stop_pid "$pid"
    stop_pid "$BOUNCER_PID"
}

# --- phase: instructions -------------------------------------------------------

# User-space instructions per transaction, counted by valgrind's callgrind
# in pgnear, in PgBouncer and in the byte relay (the floor) under the same
# pgbench runs. Unlike CPU time on a shared machine, the count does not
# move with the load, so it shows what a change to the hot path is worth.
# instr_count NAME PID PORT CASE ARGS...: one "case target instructions" row
instr_count() {
    local name=$1 pid=$2 port=$3 case=$4
    shift 4
    local dir=$OUT/instructions
    "$PGBENCH" -n "$@" -t 200 -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1 || true
    # valgrind's control channel answers only its own user.
    local control=(callgrind_control)
    [[ $name == pgbouncer ]] && control=(as_pg callgrind_control)
    "${control[@]}" -z "$pid" >/dev/null 2>&1 || die "callgrind_control cannot reach $name"
    "$PGBENCH" -n "$@" -t "$INSTR_TRANSACTIONS" -h 127.0.0.1 -p "$port" -U postgres postgres \
        >"$dir/$case.$name.pgbench" 2>&1 || die "pgbench through $name failed: see $dir/$case.$name.pgbench"
    "${control[@]}" -d "$case" "$pid" >/dev/null 2>&1 || die "callgrind_control cannot reach $name"
    local txns figures
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$dir/$case.$name.pgbench")
    # "instructions loop_instructions code_lines data_lines" per transaction
    figures=$($TOOLS callgrind-per-txn --prefix "$dir/$name.callgrind.$pid" --transactions "$txns") ||
        die "no callgrind summary for $name in $dir"
    printf '%s\t%s\t%s\t%s\n' "$case" "$name" "$txns" "${figures// /$'\t'}" >>"$dir/instructions.tsv"
    log "instructions ($case, $name): per transaction, instructions (all threads, session loops), code and data cache lines: $figures"
}

phase_instructions() {
    if ! command -v callgrind_control >/dev/null; then
        [[ $(id -u) == 0 ]] || die "valgrind is missing; install it (apt-get install valgrind) or run as root"
        log "installing valgrind"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null
    fi
    local dir=$OUT/instructions
    mkdir -p "$dir"
    chmod 777 "$dir"
    write_pgnear_config "$WORK/pgnear-instr.toml" "$P_NEAR_PRIMARY" "$P_PRIMARY" primary "${INSTR_EXTRA:-}"
    # The same simulated caches for all three: first levels of 4 KiB and a
    # last level of INSTR_CACHE_BYTES, whose misses are reported.
    local sim=()
    ((INSTR_CACHE_BYTES > 0)) &&
        sim=(--cache-sim=yes --I1=4096,2,64 --D1=4096,2,64 --LL="$INSTR_CACHE_BYTES",2,64)
    # pgnear's threads apart: the service loop's monitor and timers run on
    # a wall clock, which valgrind's slowdown inflates per transaction.
    valgrind --tool=callgrind "${sim[@]}" --separate-threads=yes --callgrind-out-file="$dir/pgnear.callgrind.%p" \
        "$PGNEAR" --config "$WORK/pgnear-instr.toml" >"$OUT/pgnear-instr.log" 2>&1 &
    local near=$!
    PIDS+=("$near")
    wait_port "$P_NEAR_PRIMARY" "pgnear under callgrind"
    start_pgbouncer_with valgrind --tool=callgrind "${sim[@]}" --callgrind-out-file="$dir/pgbouncer.callgrind.%p"
    # The floor: the byte relay's own count under the same runs.
    start_relay relay-instr valgrind --tool=callgrind "${sim[@]}" --callgrind-out-file="$dir/relay.callgrind.%p" -- \
        --plain --target "127.0.0.1:$P_PRIMARY"
    local relay=$RELAY_PID p_relay=$RELAY_PORT
    printf 'case\ttarget\ttransactions\tinstructions_per_txn\tloop_instructions_per_txn\tcode_lines_per_txn\tdata_lines_per_txn\n' >"$dir/instructions.tsv"
    for name in $INSTR_CASES; do
        local mode=${name#tpcb-} args=(-c "${INSTR_CLIENTS:-4}" -j 1)
        [[ $name == tpcb-* ]] || args+=(-S)
        args+=(-M "$mode")
        instr_count pgnear "$near" "$P_NEAR_PRIMARY" "$name" "${args[@]}"
        [[ $mode == prepared ]] || instr_count pgbouncer "$BOUNCER_PID" "$P_BOUNCER" "$name" "${args[@]}"
        instr_count relay "$relay" "$p_relay" "$name" "${args[@]}"
    done
    column -t "$dir/instructions.tsv" | tee -a "$OUT/summary.txt"
    stop_pid "$relay"
    stop_pid "$near"
    stop_pid "$BOUNCER_PID"
}

# --- phase: optimistic transactions ---------------------------------------------

phase_optimistic() {
    local dir=$OUT/optimistic admin
    mkdir -p "$dir"
    admin=$($TOOLS freeport --count 1)
    write_pgnear_config "$WORK/pgnear-opt.toml" "$P_NEAR_SPLIT" "$P_PRIMARY" auto "admin_listen = \"127.0.0.1:$admin\""
    start_pgnear pgnear-optimistic "$WORK/pgnear-opt.toml" "$P_NEAR_SPLIT"
    local near=$NEAR_PID
    cat >"$dir/read-only.sql" <<EOF
\\set aid random(1, 100000 * $SCALE)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT bbalance FROM pgbench_branches WHERE bid = 1;
END;
EOF
    cat >"$dir/read-then-write.sql" <<EOF
\\set aid random(1, 100000 * $SCALE)
\\set delta random(-5000, 5000)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
END;
EOF
    printf 'script\tmode\ttransactions\ttps\treplica\tlearned_primary\treplays\treplays_per_1000\n' >"$dir/optimistic.tsv"
    local script mode
    for script in read-only read-then-write; do
        for mode in ${OPT_MODES:-simple extended}; do
            local out=$dir/$script-$mode.out before after txns tps per
            wait_replica # the phases before may have left it behind
            "$PGBENCH" -n -h 127.0.0.1 -p "$P_NEAR_SPLIT" -U postgres -M "$mode" -c "${OPT_CLIENTS:-16}" -j 2 \
                -T "${OPT_WARMUP:-3}" -f "$dir/$script.sql" postgres >"$out.warmup" 2>&1 ||
                log "pgbench warm-up failed: see $out.warmup"
            before=$($TOOLS optimistic --admin-port "$admin")
            "$PGBENCH" -n -h 127.0.0.1 -p "$P_NEAR_SPLIT" -U postgres -M "$mode" -c "${OPT_CLIENTS:-16}" -j 2 \
                -T "$DURATION" -f "$dir/$script.sql" postgres >"$out" 2>&1 || log "pgbench failed: see $out"
            after=$($TOOLS optimistic --admin-port "$admin")
            txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
            tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$out")
            read -r r0 l0 p0 <<<"$before"
            read -r r1 l1 p1 <<<"$after"
            per=$(awk -v p=$((p1 - p0)) -v n="${txns:-0}" 'BEGIN{printf "%.2f", n ? p * 1000 / n : 0}')
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$script" "$mode" "${txns:-0}" "${tps:-nan}" \
                $((r1 - r0)) $((l1 - l0)) $((p1 - p0)) "$per" >>"$dir/optimistic.tsv"
            log "optimistic $script $mode: txns=${txns:-0} tps=${tps:-nan} replica=$((r1 - r0)) learned=$((l1 - l0)) replays=$((p1 - p0)) ($per per 1000)"
        done
    done
    column -t "$dir/optimistic.tsv" | tee -a "$OUT/summary.txt"
    stop_pid "$near"
}

has_phase pgbench && phase_pgbench
has_phase wan && phase_wan
has_phase raw-wan && phase_raw_wan
has_phase memory && phase_memory
has_phase profile && phase_profile
has_phase instructions && phase_instructions
has_phase optimistic && phase_optimistic
log "done"
