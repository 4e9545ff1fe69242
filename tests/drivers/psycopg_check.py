"""psycopg 3 through pgnear, used the ordinary way.

Connects as PGNEAR_USER/PGNEAR_PASSWORD (SCRAM-SHA-256 against pgnear) to
PGNEAR_HOST:PGNEAR_PORT. Every step runs even if an earlier one failed;
prints "psycopg: ok" when all pass, else each failure and exits 1.
"""

import os
import signal
import sys
import threading
import time
import traceback
import uuid
from decimal import Decimal

import psycopg
from psycopg import errors, sql

DRIVER = "psycopg"
STEP_TIMEOUT = 20
TABLE = "drv_psycopg"

CONNINFO = psycopg.conninfo.make_conninfo(
    host=os.environ.get("PGNEAR_HOST", "127.0.0.1"),
    port=os.environ.get("PGNEAR_PORT", "6432"),
    user=os.environ.get("PGNEAR_USER", "app"),
    password=os.environ.get("PGNEAR_PASSWORD", "apppw"),
    dbname=os.environ.get("PGNEAR_DB", "postgres"),
    connect_timeout=10,
    application_name="psycopg_check",
)

SERVER_USER = os.environ.get("PGNEAR_SERVER_USER", "postgres")
# 0 in DIRECT=1 control runs, which have no replica behind them.
REQUIRE_REPLICA = os.environ.get("PGNEAR_REQUIRE_REPLICA", "1") == "1"
failures = []


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout(f"step did not finish in {STEP_TIMEOUT}s")


signal.signal(signal.SIGALRM, _alarm)


def step(fn):
    name = fn.__name__
    signal.alarm(STEP_TIMEOUT)
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - report everything, keep going
        signal.alarm(0)
        detail = f"{type(e).__module__}.{type(e).__name__}: {e}".strip()
        sqlstate = getattr(e, "sqlstate", None)
        if sqlstate:
            detail += f" [SQLSTATE {sqlstate}]"
        failures.append((name, detail))
        print(f"  FAIL {name}: {detail}")
        tb = traceback.format_exc().strip().splitlines()
        print("       " + "\n       ".join(tb[-6:]))
    else:
        signal.alarm(0)
        print(f"  ok   {name} ({time.monotonic() - t0:.2f}s)")


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


class Case:
    """Names the part of a step that failed: `with Case("..."):`."""

    def __init__(self, label):
        self.label = label

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is not None and isinstance(e, Exception) and not isinstance(e, StepTimeout):
            state = getattr(e, "sqlstate", None)
            raise AssertionError(f"{self.label}: {type(e).__name__}: {e}" + (f" [SQLSTATE {state}]" if state else "")) from e
        return False


def connect(**kw):
    return psycopg.connect(CONNINFO, **kw)


# ---------------------------------------------------------------- steps


def scram_login():
    with connect() as conn:
        row = conn.execute("SELECT current_user, session_user").fetchone()
        check(row == (SERVER_USER, SERVER_USER), f"server user is {row}, expected {SERVER_USER}")
        check(conn.info.server_version >= 150000, f"server_version {conn.info.server_version}")
        check(conn.info.backend_pid > 0, f"backend pid {conn.info.backend_pid}")
        # ParameterStatus relayed: application_name and the usual settings.
        check(conn.info.parameter_status("application_name") == "psycopg_check",
              f"application_name {conn.info.parameter_status('application_name')!r}")
        check(conn.info.parameter_status("server_encoding") == "UTF8", "server_encoding")


def wrong_password_refused():
    bad = CONNINFO.replace("password=apppw", "password=wrong")
    check(bad != CONNINFO, "could not build a bad conninfo")
    try:
        psycopg.connect(bad).close()
    except psycopg.OperationalError as e:
        check("password authentication failed" in str(e) or "28P01" in str(e),
              f"unexpected error for a wrong password: {e}")
    else:
        raise AssertionError("a wrong password was accepted")


def create_table():
    with connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, name text NOT NULL, amount numeric(12,2),"
                " tags text[], doc jsonb, uid uuid, data bytea, at timestamptz DEFAULT now())"
            ).format(sql.Identifier(TABLE))
        )


def insert_and_select_params():
    with connect() as conn:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {TABLE} (id, name, amount, tags, doc, uid, data) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [
                    (i, f"row {i}", Decimal(f"{i}.50"), [f"t{i}", "x"],
                     psycopg.types.json.Jsonb({"n": i}), uuid.UUID(int=i), bytes([i, 0, 255]))
                    for i in range(1, 21)
                ],
            )
        conn.commit()
        # Read back (read-your-writes) with parameters, text and binary results.
        for binary in (False, True):
            with conn.cursor(binary=binary) as cur:
                cur.execute(
                    f"SELECT id, name, amount, tags, doc, uid, data FROM {TABLE} WHERE id BETWEEN %s AND %s ORDER BY id",
                    (5, 7),
                )
                rows = cur.fetchall()
                check([r[0] for r in rows] == [5, 6, 7], f"ids {[r[0] for r in rows]} (binary={binary})")
                r = rows[0]
                check(r[1] == "row 5" and r[2] == Decimal("5.50") and r[3] == ["t5", "x"], f"row {r}")
                check(r[4] == {"n": 5} and r[5] == uuid.UUID(int=5) and bytes(r[6]) == bytes([5, 0, 255]), f"row {r}")
        n = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE name LIKE %s", ("row %",)).fetchone()[0]
        check(n == 20, f"count {n}")
        conn.commit()


def wait_for_replica_read(conn, what, **kw):
    """A read-only, parameterized query until the replica serves it (with
    no writes in this session, pgnear sends reads to the replica once it
    has replayed the proxy's latest write)."""
    deadline = time.monotonic() + 5
    while not conn.execute("SELECT current_setting('in_hot_standby')::bool WHERE %s::int = 1", (1,), **kw).fetchone()[0]:
        if not REQUIRE_REPLICA:
            return
        check(time.monotonic() < deadline, f"{what}: no read reached the replica within 5s")
        time.sleep(0.05)


def replica_read_then_write():
    # A session whose first statements are reads (served by the replica)
    # then writes (must go to the primary) and reads its own write.
    with Case("read, then a write (autocommit)"), connect(autocommit=True) as conn:
        wait_for_replica_read(conn, "extended query", prepare=True)
        conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (500, "after replica read"))
        row = conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (500,), prepare=True).fetchone()
        check(row == ("after replica read",), f"read-your-write {row}")
    # The same in a transaction block: BEGIN; SELECT; INSERT; COMMIT.
    with Case("read, then a write in a transaction"), connect() as conn:
        conn.execute("SELECT 1")
        conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (501, "read then write in a transaction"))
        conn.commit()
        check(conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 501").fetchone() == (1,), "committed row")
        conn.commit()
    # Pipeline mode: fetching a result mid-pipeline makes libpq send a Flush.
    with Case("pipelined read (Flush), then a write"), connect(autocommit=True) as conn:
        wait_for_replica_read(conn, "before the pipeline")
        with conn.pipeline():
            cur = conn.execute("SELECT current_setting('in_hot_standby')::bool, %s::int", (1,))
            on_replica = cur.fetchone()[0]
        print(f"       (pipelined read served by the {'replica' if on_replica else 'primary'})")
        conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (502, "after a pipelined read"))
        row = conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (502,)).fetchone()
        check(row == ("after a pipelined read",), f"read-your-write after pipeline {row}")


def on_replica(conn):
    """Whether the unit of work runs on a hot standby."""
    return conn.execute("SHOW in_hot_standby").fetchone()[0] == "on"


def orm_units_of_work():
    # psycopg's default (autocommit off) opens a plain BEGIN before a unit's
    # first statement, for reads too: pgnear runs such a unit on a replica
    # while it only reads, and moves it to the primary if it writes.
    with Case("read-only units of work (default transactional mode)"), connect() as conn:
        deadline = time.monotonic() + 5
        while True:
            conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id > %s", (0,)).fetchone()
            replica = on_replica(conn)
            conn.commit()
            if replica or not REQUIRE_REPLICA:
                break
            check(time.monotonic() < deadline, "no unit of work reached the replica within 5s")
            time.sleep(0.05)
        if REQUIRE_REPLICA:
            for i in range(10):
                conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (1,)).fetchone()
                check(on_replica(conn), f"read-only unit {i} ran on the primary")
                conn.commit()
    with Case("read-modify-write units of work"), connect() as conn:
        conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (700, "0"))
        conn.commit()
        for i in range(5):
            (name,) = conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (700,)).fetchone()
            check(name == str(i), f"unit {i} read {name!r}: a stale read or a lost update")
            conn.execute(f"UPDATE {TABLE} SET name = %s WHERE id = %s", (str(i + 1), 700))
            conn.commit()
    try:
        import sqlalchemy
    except ImportError:
        print("       (SQLAlchemy is not installed: its units of work are not checked)")
        return
    with Case("SQLAlchemy units of work"):
        engine = sqlalchemy.create_engine(
            "postgresql+psycopg://", creator=lambda: psycopg.connect(CONNINFO), poolclass=sqlalchemy.pool.NullPool)
        # A shape of its own: the units above taught pgnear that theirs writes.
        select = sqlalchemy.text(f"SELECT name FROM {TABLE} WHERE id = :id AND name IS NOT NULL")
        standby = sqlalchemy.text("SHOW in_hot_standby")
        with engine.connect() as conn:
            deadline = time.monotonic() + 5
            while REQUIRE_REPLICA:
                with conn.begin():
                    conn.execute(select, {"id": 700}).scalar()
                    if conn.execute(standby).scalar() == "on":
                        break
                check(time.monotonic() < deadline, "no SQLAlchemy unit of work reached the replica within 5s")
                time.sleep(0.05)
            replicas = 0
            for i in range(10):
                with conn.begin():
                    check(conn.execute(select, {"id": 700}).scalar() == "5", "SQLAlchemy read")
                    replicas += conn.execute(standby).scalar() == "on"
            print(f"       ({replicas} of 10 SQLAlchemy read-only units of work ran on a replica)")
            if REQUIRE_REPLICA:
                check(replicas == 10, f"only {replicas} of 10 read-only units of work ran on a replica")
            with conn.begin():
                name = conn.execute(select, {"id": 700}).scalar()
                conn.execute(sqlalchemy.text(f"UPDATE {TABLE} SET name = :n WHERE id = 700"), {"n": name + "!"})
            check(conn.execute(select, {"id": 700}).scalar() == "5!", "SQLAlchemy read-modify-write")
            conn.commit()
        engine.dispose()


def prepared_statements():
    with connect(autocommit=True) as conn:
        # Explicit prepare=True and psycopg's own auto-prepare (threshold 5).
        for i in range(12):
            rid = i % 5 + 1
            row = conn.execute(f"SELECT id, name FROM {TABLE} WHERE id = %s", (rid,), prepare=True).fetchone()
            check(row == (rid, f"row {rid}"), f"prepared select {i}: {row}")
        for i in range(12):
            conn.execute(f"UPDATE {TABLE} SET amount = amount + %s WHERE id = %s", (1, 20), prepare=True)
        amount = conn.execute(f"SELECT amount FROM {TABLE} WHERE id = %s", (20,)).fetchone()[0]
        check(amount == Decimal("32.50"), f"amount after 12 prepared updates: {amount}")
        for i in range(12):
            row = conn.execute("SELECT %s::int * 2", (i,)).fetchone()
            check(row == (i * 2,), f"auto-prepared select {i}: {row}")
        # Different cursors sharing the prepared statements, then DEALLOCATE ALL.
        with conn.cursor() as cur:
            for i in range(6):
                cur.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (3,), prepare=True)
                check(cur.fetchone() == ("row 3",), "cursor prepared select")
        conn.execute("DEALLOCATE ALL")
        row = conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (4,), prepare=True).fetchone()
        check(row == ("row 4",), f"after DEALLOCATE ALL: {row}")


def pipeline_mode():
    with connect() as conn:
        with conn.pipeline():
            with conn.cursor() as cur:
                for i in range(101, 111):
                    cur.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (i, f"pipe {i}"))
                cur.execute(f"SELECT count(*) FROM {TABLE} WHERE id BETWEEN %s AND %s", (101, 110))
                check(cur.fetchone() == (10,), "count inside pipeline")
            c2 = conn.execute("SELECT %s::text", ("x",))
            c3 = conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (105,), prepare=True)
            check(c2.fetchone() == ("x",), "pipeline select")
            check(c3.fetchone() == ("pipe 105",), "pipeline prepared select")
        conn.commit()
        # executemany uses the pipeline on its own.
        with conn.cursor() as cur:
            cur.executemany(f"UPDATE {TABLE} SET name = %s WHERE id = %s", [(f"piped {i}", i) for i in range(101, 111)])
        conn.commit()
        n = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE name LIKE 'piped %%'").fetchone()[0]
        check(n == 10, f"count after executemany {n}")
        conn.commit()
        # An error inside a pipeline aborts the rest; the connection recovers.
        try:
            with conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 2")
        except errors.DivisionByZero:
            pass
        else:
            raise AssertionError("no error from 1/0 in a pipeline")
        conn.rollback()
        check(conn.execute("SELECT 42").fetchone() == (42,), "select after pipeline error")
        conn.commit()
        # Autocommit pipeline: each statement its own transaction.
        conn.autocommit = True
        with conn.pipeline() as p:
            conn.execute(f"DELETE FROM {TABLE} WHERE id = %s", (110,))
            cur = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id BETWEEN 101 AND 110")
            p.sync()
            check(cur.fetchone() == (9,), "autocommit pipeline count")


def libpq_pipeline_reads_as_it_writes():
    """libpq's pipeline mode, with no Sync and no Flush: PostgreSQL sends an
    error at once, and everything queued before it, so a client reading
    while it writes sees them before it ends the pipeline."""
    import select
    from psycopg import pq
    c = pq.PGconn.connect(CONNINFO.encode())
    check(c.status == pq.ConnStatus.OK, f"low-level connect: {c.error_message!r}")
    try:
        c.exec_(f"CREATE TABLE IF NOT EXISTS {TABLE}_keyed (id int PRIMARY KEY)".encode())
        c.exec_(f"TRUNCATE {TABLE}_keyed".encode())
        c.enter_pipeline_mode()
        c.send_query_params(b"BEGIN", None)
        c.send_prepare(b"ins", f"INSERT INTO {TABLE}_keyed VALUES ($1)".encode())
        for _ in range(3):
            c.send_query_prepared(b"ins", [b"1"])  # the second one fails
        c.send_query_params(b"COMMIT", None)
        c.flush()
        c.nonblocking = 1
        statuses = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pq.ExecStatus.FATAL_ERROR not in statuses:
            c.consume_input()
            while not c.is_busy():
                r = c.get_result()
                if r is None:
                    break
                statuses.append(r.status)
            select.select([c.socket], [], [], 0.2)
        check(pq.ExecStatus.FATAL_ERROR in statuses, f"no error before the pipeline ended: {statuses}")
        check(statuses.count(pq.ExecStatus.COMMAND_OK) == 3, f"results before the error: {statuses}")
        c.pipeline_sync()
        c.flush()
    finally:
        c.finish()


def transaction_rollback():
    with connect() as conn:
        before = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        conn.commit()
        conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (900, "rolled back"))
        inside = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        check(inside == before + 1, f"count inside the transaction {inside}, expected {before + 1}")
        conn.rollback()
        after = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        check(after == before, f"count after rollback {after}, expected {before}")
        conn.commit()
        # The context-manager way, with a savepoint.
        conn.autocommit = True
        with conn.transaction():
            conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (901, "kept"))
            with conn.transaction():
                conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (%s, %s)", (902, "savepoint"))
                raise psycopg.Rollback()
        ids = [r[0] for r in conn.execute(f"SELECT id FROM {TABLE} WHERE id >= 900 ORDER BY id")]
        check(ids == [901], f"ids after savepoint rollback {ids}")
        # Read-only transaction.
        conn.autocommit = False
        conn.read_only = True
        n = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        check(n == after + 1, f"read-only count {n}")
        conn.commit()


def error_then_continue():
    with connect(autocommit=True) as conn:
        try:
            conn.execute("SELECT 1/0")
        except errors.DivisionByZero as e:
            check(e.sqlstate == "22012", f"sqlstate {e.sqlstate}")
        else:
            raise AssertionError("1/0 did not fail")
        check(conn.execute("SELECT 1").fetchone() == (1,), "select after error (autocommit)")
        try:
            conn.execute("SELECT %s::int / 0", (1,))
        except errors.DivisionByZero:
            pass
        check(conn.execute("SELECT %s::int", (2,)).fetchone() == (2,), "extended query after error")
        try:
            conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (1, 'dup')")
        except errors.UniqueViolation:
            pass
        else:
            raise AssertionError("duplicate key did not fail")
        try:
            conn.execute("SELECT * FROM no_such_table_xyz")
        except errors.UndefinedTable:
            pass
        check(conn.execute("SELECT 3").fetchone() == (3,), "select after errors")
    with connect() as conn:
        conn.execute("SELECT 1")
        try:
            conn.execute("SELECT 1/0")
        except errors.DivisionByZero:
            pass
        try:
            conn.execute("SELECT 1")
        except errors.InFailedSqlTransaction:
            pass
        else:
            raise AssertionError("statement in an aborted transaction did not fail with 25P02")
        conn.rollback()
        check(conn.execute("SELECT 4").fetchone() == (4,), "select after rollback")
        conn.commit()


def copy_in_out():
    with connect() as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {TABLE} (id, name, amount) FROM STDIN") as copy:
                for i in range(200, 300):
                    copy.write_row((i, f"copied {i}", Decimal(i)))
            check(cur.rowcount == 100, f"COPY FROM rowcount {cur.rowcount}")
            # Binary COPY FROM.
            with cur.copy(f"COPY {TABLE} (id, name) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                for i in range(300, 310):
                    copy.write_row((i, f"bin {i}"))
        conn.commit()
        with conn.cursor() as cur:
            rows = []
            with cur.copy(f"COPY (SELECT id, name FROM {TABLE} WHERE id >= %s AND id < %s ORDER BY id) TO STDOUT",
                          (200, 310)) as copy:
                for row in copy.rows():
                    rows.append(row)
            check(len(rows) == 110, f"COPY TO rows {len(rows)}")
            check(rows[0] == ("200", "copied 200") and rows[-1] == ("309", "bin 309"), f"COPY TO rows {rows[0]} {rows[-1]}")
            data = b""
            with cur.copy(f"COPY {TABLE} (id, name) TO STDOUT (FORMAT CSV)") as copy:
                for chunk in copy:
                    data += bytes(chunk)
            check(b"250,copied 250\n" in data, "CSV COPY TO content")
        conn.commit()
        # COPY FROM that fails on the server; the connection stays usable.
        try:
            with conn.cursor() as cur:
                with cur.copy(f"COPY {TABLE} (id, name) FROM STDIN") as copy:
                    copy.write_row((1, "duplicate key"))
        except errors.UniqueViolation:
            pass
        else:
            raise AssertionError("COPY of a duplicate key did not fail")
        conn.rollback()
        check(conn.execute("SELECT 5").fetchone() == (5,), "select after failed COPY")
        conn.commit()


def server_side_cursor():
    with connect() as conn:
        with conn.cursor(name="drv_cur") as cur:
            cur.itersize = 7
            cur.execute(f"SELECT id FROM {TABLE} WHERE id >= %s AND id < %s ORDER BY id", (200, 400))
            ids = [r[0] for r in cur]
            check(len(ids) == 110 and ids[0] == 200, f"named cursor rows {len(ids)}")
        conn.commit()


def listen_notify():
    with connect(autocommit=True) as listener, connect(autocommit=True) as sender:
        listener.execute("LISTEN drv_psycopg_ch")
        sender.execute("NOTIFY drv_psycopg_ch, 'hello'")
        sender.execute("SELECT pg_notify(%s, %s)", ("drv_psycopg_ch", "world"))
        got = []
        for n in listener.notifies(timeout=5, stop_after=2):
            got.append((n.channel, n.payload))
        check(got == [("drv_psycopg_ch", "hello"), ("drv_psycopg_ch", "world")], f"notifications {got}")
        # Notification arriving while a query runs is still delivered.
        sender.execute("NOTIFY drv_psycopg_ch, 'third'")
        time.sleep(0.2)
        listener.execute("SELECT 1")
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=3, stop_after=1)]
        check(got == [("drv_psycopg_ch", "third")], f"third notification {got}")
        listener.execute("UNLISTEN *")


def cancel_query():
    for method in ("cancel", "cancel_safe"):
        with connect(autocommit=True) as conn:
            if not hasattr(conn, method):
                continue

            def fire():
                time.sleep(0.7)
                getattr(conn, method)()

            t = threading.Thread(target=fire)
            t.start()
            t0 = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(30)")
            except errors.QueryCanceled:
                pass
            else:
                raise AssertionError(f"pg_sleep(30) was not canceled by conn.{method}()")
            finally:
                t.join()
            took = time.monotonic() - t0
            check(took < 10, f"conn.{method}() took {took:.1f}s to cancel")
            check(conn.execute("SELECT 6").fetchone() == (6,), f"select after conn.{method}()")
    # Cancel inside a transaction that wrote (runs on the primary).
    with connect() as conn:
        conn.execute(f"UPDATE {TABLE} SET name = name WHERE id = 1")
        t = threading.Thread(target=lambda: (time.sleep(0.7), conn.cancel()))
        t.start()
        try:
            conn.execute("SELECT pg_sleep(30)")
        except errors.QueryCanceled:
            pass
        else:
            raise AssertionError("pg_sleep(30) in a write transaction was not canceled")
        finally:
            t.join()
        conn.rollback()
        check(conn.execute("SELECT 7").fetchone() == (7,), "select after cancel in a transaction")
        conn.commit()
    # statement_timeout, set by the session.
    with connect(autocommit=True) as conn:
        conn.execute("SET statement_timeout = 500")
        try:
            conn.execute("SELECT pg_sleep(30)")
        except errors.QueryCanceled:
            pass
        else:
            raise AssertionError("statement_timeout did not cancel pg_sleep(30)")
        check(conn.execute("SHOW statement_timeout").fetchone() == ("500ms",), "statement_timeout kept")


def async_connection():
    import asyncio

    async def main():
        async with await psycopg.AsyncConnection.connect(CONNINFO, autocommit=True) as aconn:
            async with aconn.cursor() as cur:
                for i in range(10):
                    await cur.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (i + 1,), prepare=True)
                    check(await cur.fetchone() == (f"row {i + 1}",), "async prepared select")
            async with aconn.pipeline():
                c1 = await aconn.execute("SELECT 1")
                c2 = await aconn.execute("SELECT 2")
            check(await c1.fetchone() == (1,) and await c2.fetchone() == (2,), "async pipeline")

    asyncio.run(main())


def cleanup():
    with connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(TABLE)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE + "_keyed")))


def main():
    print(f"  psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}, impl {psycopg.pq.__impl__})")
    for fn in (scram_login, wrong_password_refused, create_table, insert_and_select_params, replica_read_then_write,
               orm_units_of_work,
               prepared_statements, pipeline_mode, libpq_pipeline_reads_as_it_writes, transaction_rollback, error_then_continue,
               copy_in_out, server_side_cursor, listen_notify, cancel_query, async_connection, cleanup):
        step(fn)
        if fn is create_table and failures:
            break
    if failures:
        print(f"{DRIVER}: FAILED {len(failures)} step(s): " + "; ".join(f"{n}: {d}" for n, d in failures))
        sys.exit(1)
    print(f"{DRIVER}: ok")


if __name__ == "__main__":
    main()
