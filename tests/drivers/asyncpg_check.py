"""asyncpg through pgnear, used the ordinary way.

asyncpg prepares every statement (named, cached per connection), uses binary
COPY, and cancels on timeout. Every step runs even if an earlier one failed;
prints "asyncpg: ok" when all pass, else each failure and exits 1.
"""

import asyncio
import io
import os
import sys
import time
import traceback
import uuid
from decimal import Decimal

import asyncpg

DRIVER = "asyncpg"
STEP_TIMEOUT = 20
TABLE = "drv_asyncpg"

PARAMS = dict(
    host=os.environ.get("PGNEAR_HOST", "127.0.0.1"),
    port=int(os.environ.get("PGNEAR_PORT", "6432")),
    user=os.environ.get("PGNEAR_USER", "app"),
    password=os.environ.get("PGNEAR_PASSWORD", "apppw"),
    database=os.environ.get("PGNEAR_DB", "postgres"),
    timeout=10,
    ssl=False,
    server_settings={"application_name": "asyncpg_check"},
)

SERVER_USER = os.environ.get("PGNEAR_SERVER_USER", "postgres")
# 0 in DIRECT=1 control runs, which have no replica behind them.
REQUIRE_REPLICA = os.environ.get("PGNEAR_REQUIRE_REPLICA", "1") == "1"
failures = []


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


class Case:
    """Names the part of a step that failed: `async with Case("..."):`."""

    def __init__(self, label):
        self.label = label

    async def __aenter__(self):
        return self

    async def __aexit__(self, typ, e, tb):
        if e is not None and isinstance(e, Exception) and not isinstance(e, asyncio.TimeoutError):
            state = getattr(e, "sqlstate", None)
            raise AssertionError(f"{self.label}: {type(e).__name__}: {e}" + (f" [SQLSTATE {state}]" if state else "")) from e
        return False


async def connect(**kw):
    return await asyncpg.connect(**{**PARAMS, **kw})


async def step(fn):
    name = fn.__name__
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(fn(), STEP_TIMEOUT)
    except BaseException as e:  # noqa: BLE001 - report everything, keep going
        if isinstance(e, asyncio.TimeoutError):
            detail = f"step did not finish in {STEP_TIMEOUT}s"
        else:
            detail = f"{type(e).__module__}.{type(e).__name__}: {e}".strip()
        sqlstate = getattr(e, "sqlstate", None)
        if sqlstate:
            detail += f" [SQLSTATE {sqlstate}]"
        failures.append((name, detail))
        print(f"  FAIL {name}: {detail}")
        tb = traceback.format_exc().strip().splitlines()
        print("       " + "\n       ".join(tb[-6:]))
    else:
        print(f"  ok   {name} ({time.monotonic() - t0:.2f}s)")


# ---------------------------------------------------------------- steps


async def scram_login():
    conn = await connect()
    try:
        row = await conn.fetchrow("SELECT current_user AS u, session_user AS s")
        check((row["u"], row["s"]) == (SERVER_USER, SERVER_USER), f"server user {tuple(row)}, expected {SERVER_USER}")
        check(conn.get_server_version().major >= 15, f"server version {conn.get_server_version()}")
        check(conn.get_server_pid() > 0, "server pid")
        check(conn.get_settings().application_name == "asyncpg_check",
              f"application_name {conn.get_settings().application_name!r}")
    finally:
        await conn.close()


async def wrong_password_refused():
    try:
        conn = await connect(password="wrong")
    except asyncpg.InvalidPasswordError:
        pass
    else:
        await conn.close()
        raise AssertionError("a wrong password was accepted")


async def create_table():
    conn = await connect()
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.execute(
            f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text NOT NULL, amount numeric(12,2),"
            " tags text[], doc jsonb, uid uuid, data bytea, at timestamptz DEFAULT now())"
        )
    finally:
        await conn.close()


async def insert_and_select_params():
    conn = await connect()
    try:
        await conn.set_type_codec("jsonb", encoder=lambda v: __import__("json").dumps(v),
                                  decoder=lambda v: __import__("json").loads(v), schema="pg_catalog")
        await conn.executemany(
            f"INSERT INTO {TABLE} (id, name, amount, tags, doc, uid, data) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(i, f"row {i}", Decimal(f"{i}.50"), [f"t{i}", "x"], {"n": i}, uuid.UUID(int=i), bytes([i, 0, 255]))
             for i in range(1, 21)],
        )
        rows = await conn.fetch(
            f"SELECT id, name, amount, tags, doc, uid, data FROM {TABLE} WHERE id BETWEEN $1 AND $2 ORDER BY id", 5, 7)
        check([r["id"] for r in rows] == [5, 6, 7], f"ids {[r['id'] for r in rows]}")
        r = rows[0]
        check(r["name"] == "row 5" and r["amount"] == Decimal("5.50") and r["tags"] == ["t5", "x"], f"row {r}")
        check(r["doc"] == {"n": 5} and r["uid"] == uuid.UUID(int=5) and r["data"] == bytes([5, 0, 255]), f"row {r}")
        n = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE name LIKE $1", "row %")
        check(n == 20, f"count {n}")
        status = await conn.execute(f"UPDATE {TABLE} SET amount = amount + $1 WHERE id = $2", Decimal(1), 1)
        check(status == "UPDATE 1", f"update status {status!r}")
    finally:
        await conn.close()


async def replica_session():
    """A new connection whose first read the replica served (with no writes
    in it, pgnear sends reads to the replica once it has replayed the
    proxy's latest write)."""
    deadline = time.monotonic() + 5
    while True:
        conn = await connect()
        if await conn.fetchval("SELECT current_setting('in_hot_standby')::bool") or not REQUIRE_REPLICA:
            return conn
        await conn.close()
        check(time.monotonic() < deadline, "no session's first read reached the replica within 5s")
        await asyncio.sleep(0.05)


async def replica_read_then_write():
    # Sessions whose first statements are reads (served by the replica)
    # then write (must go to the primary) and read their own write. asyncpg
    # prepares each new statement with Parse/Describe/Flush (no Sync) and
    # then sends Bind/Execute/Sync.
    async with Case("read, then a parameterized write"):
        await read_then_write_plain()
    async with Case("prepare() a read, then execute() a write with no arguments"):
        await prepare_then_simple_write()
    async with Case("copy_records_to_table after a replica read"):
        await copy_after_replica_read()


async def read_then_write_plain():
    conn = await replica_session()
    try:
        status = await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 500, "after replica read")
        check(status == "INSERT 0 1", f"insert status {status!r}")
        v = await conn.fetchval(f"SELECT name FROM {TABLE} WHERE id = $1", 500)
        check(v == "after replica read", f"read-your-write {v!r}")
    finally:
        await conn.close()


async def prepare_then_simple_write():
    # prepare() a read up front (Parse/Describe/Flush, never executed),
    # then a write with no arguments (a simple Query).
    conn = await replica_session()
    try:
        stmt = await conn.prepare(f"SELECT name FROM {TABLE} WHERE id = $1")
        status = await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES (501, 'after prepare()')")
        check(status == "INSERT 0 1", f"insert status {status!r}")
        check(await stmt.fetchval(501) == "after prepare()", "prepared read-your-write")
    finally:
        await conn.close()


async def copy_after_replica_read():
    # copy_records_to_table prepares "SELECT cols FROM table LIMIT 1"
    # (Parse/Describe/Flush) to learn the column types, then sends COPY.
    conn = await replica_session()
    try:
        res = await conn.copy_records_to_table(TABLE, records=[(502, "copied after a replica read")],
                                               columns=["id", "name"])
        check(res == "COPY 1", f"copy_records_to_table {res!r}")
        check(await conn.fetchval(f"SELECT name FROM {TABLE} WHERE id = $1", 502) == "copied after a replica read",
              "read-your-copy")
    finally:
        await conn.close()


async def prepared_statements():
    conn = await connect()
    try:
        stmt = await conn.prepare(f"SELECT id, name FROM {TABLE} WHERE id = $1")
        for i in range(12):
            rid = i % 5 + 1
            row = await stmt.fetchrow(rid)
            check(tuple(row) == (rid, f"row {rid}"), f"prepared select {i}: {row}")
        check([a.name for a in stmt.get_attributes()] == ["id", "name"], "statement attributes")
        upd = await conn.prepare(f"UPDATE {TABLE} SET amount = amount + $1 WHERE id = $2")
        for _ in range(12):
            await upd.fetch(Decimal(1), 20)
        amount = await conn.fetchval(f"SELECT amount FROM {TABLE} WHERE id = $1", 20)
        check(amount == Decimal("32.50"), f"amount after 12 prepared updates: {amount}")
        # The implicit statement cache: the same query text 12 times.
        for i in range(12):
            v = await conn.fetchval("SELECT $1::int * 2", i)
            check(v == i * 2, f"cached statement {i}: {v}")
        # Mixed reads and writes on cached statements, interleaved.
        for i in range(12):
            await conn.execute(f"UPDATE {TABLE} SET name = $1 WHERE id = $2", f"row {i % 3 + 1}", i % 3 + 1)
            v = await conn.fetchval(f"SELECT name FROM {TABLE} WHERE id = $1", i % 3 + 1)
            check(v == f"row {i % 3 + 1}", f"read after write {i}: {v}")
        # Statement cache disabled: unnamed statements.
        c2 = await connect(statement_cache_size=0)
        try:
            for i in range(12):
                v = await c2.fetchval(f"SELECT name FROM {TABLE} WHERE id = $1", 4)
                check(v == "row 4", f"uncached select {i}: {v}")
        finally:
            await c2.close()
    finally:
        await conn.close()


async def transaction_rollback():
    conn = await connect()
    try:
        before = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")

        class Boom(Exception):
            pass

        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 900, "rolled back")
                inside = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
                check(inside == before + 1, f"count inside the transaction {inside}")
                raise Boom()
        except Boom:
            pass
        after = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
        check(after == before, f"count after rollback {after}, expected {before}")
        # Nested transaction = savepoint.
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 901, "kept")
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 902, "savepoint")
                    raise Boom()
            except Boom:
                pass
        ids = [r[0] for r in await conn.fetch(f"SELECT id FROM {TABLE} WHERE id >= 900 ORDER BY id")]
        check(ids == [901], f"ids after savepoint rollback {ids}")
        # Read-only, repeatable read.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            n = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
            check(n == before + 1, f"read-only count {n}")
        # Explicit BEGIN/ROLLBACK text.
        await conn.execute("BEGIN")
        await conn.execute(f"DELETE FROM {TABLE}")
        await conn.execute("ROLLBACK")
        n = await conn.fetchval(f"SELECT count(*) FROM {TABLE}")
        check(n == before + 1, f"count after BEGIN/DELETE/ROLLBACK {n}")
    finally:
        await conn.close()


async def error_then_continue():
    conn = await connect()
    try:
        try:
            await conn.fetchval("SELECT 1/0")
        except asyncpg.DivisionByZeroError as e:
            check(e.sqlstate == "22012", f"sqlstate {e.sqlstate}")
        else:
            raise AssertionError("1/0 did not fail")
        check(await conn.fetchval("SELECT 1") == 1, "select after error")
        try:
            await conn.fetchval("SELECT $1::int / 0", 1)
        except asyncpg.DivisionByZeroError:
            pass
        check(await conn.fetchval("SELECT $1::int", 2) == 2, "extended query after error")
        try:
            await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 1, "dup")
        except asyncpg.UniqueViolationError:
            pass
        else:
            raise AssertionError("duplicate key did not fail")
        try:
            await conn.fetch("SELECT * FROM no_such_table_xyz")
        except asyncpg.UndefinedTableError:
            pass
        # Error inside a transaction, the block rolls back, connection usable.
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 903, "gone")
                await conn.fetchval("SELECT 1/0")
        except asyncpg.DivisionByZeroError:
            pass
        check(await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id = 903") == 0, "rolled back row visible")
        check(await conn.fetchval("SELECT 3") == 3, "select after errors")
        check(not conn.is_in_transaction(), "still in a transaction")
    finally:
        await conn.close()


async def copy_in_out():
    conn = await connect()
    try:
        # Binary COPY FROM with records.
        res = await conn.copy_records_to_table(
            TABLE, records=[(i, f"copied {i}", Decimal(i)) for i in range(200, 300)], columns=["id", "name", "amount"])
        check(res == "COPY 100", f"copy_records_to_table {res!r}")
        # Text COPY FROM a file-like source.
        src = io.BytesIO("".join(f"{i}\tcsv {i}\n" for i in range(300, 310)).encode())
        res = await conn.copy_to_table(TABLE, source=src, columns=["id", "name"])
        check(res == "COPY 10", f"copy_to_table {res!r}")
        # COPY TO.
        out = io.BytesIO()
        res = await conn.copy_from_query(
            f"SELECT id, name FROM {TABLE} WHERE id >= $1 AND id < $2 ORDER BY id", 200, 310, output=out, format="csv")
        check(res == "COPY 110", f"copy_from_query {res!r}")
        lines = out.getvalue().decode().splitlines()
        check(len(lines) == 110 and lines[0] == "200,copied 200" and lines[-1] == "309,csv 309",
              f"copy_from_query content {lines[:1]} {lines[-1:]}")
        out = io.BytesIO()
        res = await conn.copy_from_table(TABLE, columns=["id"], output=out)
        check(res.startswith("COPY "), f"copy_from_table {res!r}")
        # A failing COPY; the connection stays usable.
        try:
            await conn.copy_records_to_table(TABLE, records=[(1, "dup")], columns=["id", "name"])
        except asyncpg.UniqueViolationError:
            pass
        else:
            raise AssertionError("COPY of a duplicate key did not fail")
        check(await conn.fetchval("SELECT 5") == 5, "select after failed COPY")
    finally:
        await conn.close()


async def cursor_in_transaction():
    conn = await connect()
    try:
        async with conn.transaction():
            ids = [r["id"] async for r in conn.cursor(
                f"SELECT id FROM {TABLE} WHERE id >= $1 AND id < $2 ORDER BY id", 200, 310, prefetch=7)]
            check(len(ids) == 110 and ids[0] == 200, f"cursor rows {len(ids)}")
            cur = await conn.cursor(f"SELECT id FROM {TABLE} WHERE id >= $1 ORDER BY id", 200)
            first = await cur.fetch(5)
            check([r[0] for r in first] == [200, 201, 202, 203, 204], f"cursor fetch {first}")
            await cur.forward(10)
            row = await cur.fetchrow()
            check(row[0] == 215, f"cursor after forward {row}")
    finally:
        await conn.close()


async def listen_notify():
    listener = await connect()
    sender = await connect()
    try:
        got = []
        done = asyncio.Event()

        def on_notify(conn, pid, channel, payload):
            got.append((channel, payload))
            if len(got) >= 2:
                done.set()

        await listener.add_listener("drv_asyncpg_ch", on_notify)
        await sender.execute("NOTIFY drv_asyncpg_ch, 'hello'")
        await sender.execute("SELECT pg_notify($1, $2)", "drv_asyncpg_ch", "world")
        try:
            await asyncio.wait_for(done.wait(), 5)
        except asyncio.TimeoutError:
            raise AssertionError(f"notifications not delivered in 5s; got {got}")
        check(got == [("drv_asyncpg_ch", "hello"), ("drv_asyncpg_ch", "world")], f"notifications {got}")
        await listener.remove_listener("drv_asyncpg_ch", on_notify)
    finally:
        await listener.close()
        await sender.close()


async def cancel_query():
    conn = await connect()
    try:
        # wait_for cancels the task; asyncpg sends a CancelRequest.
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(30)"), 1.0)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(30) returned")
        v = await conn.fetchval("SELECT 6")
        took = time.monotonic() - t0
        check(v == 6, "select after cancel")
        check(took < 10, f"cancel + next query took {took:.1f}s (was the query really canceled?)")
        # The timeout= argument (same mechanism).
        t0 = time.monotonic()
        try:
            await conn.execute("SELECT pg_sleep(30)", timeout=1.0)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(30) with timeout=1 returned")
        check(await conn.fetchval("SELECT 7") == 7, "select after timeout")
        check(time.monotonic() - t0 < 10, "timeout= cancel was slow")
        # Cancel inside a transaction that wrote (served by the primary).
        tr = conn.transaction()
        await tr.start()
        await conn.execute(f"UPDATE {TABLE} SET name = name WHERE id = 1")
        t0 = time.monotonic()
        try:
            await conn.fetchval("SELECT pg_sleep(30)", timeout=1.0)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(30) in a transaction returned")
        await tr.rollback()
        check(await conn.fetchval("SELECT 8") == 8, "select after cancel in a transaction")
        check(time.monotonic() - t0 < 10, "cancel in a transaction was slow")
        # command_timeout on the connection.
        c2 = await connect(command_timeout=0.5)
        try:
            try:
                await c2.fetchval("SELECT pg_sleep(30)")
            except asyncio.TimeoutError:
                pass
            else:
                raise AssertionError("command_timeout did not fire")
            check(await c2.fetchval("SELECT 9") == 9, "select after command_timeout")
        finally:
            await c2.close()
    finally:
        await conn.close()


async def pool_usage():
    pool = await asyncpg.create_pool(**PARAMS, min_size=2, max_size=4)
    try:
        async def work(i):
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {TABLE} (id, name) VALUES ($1, $2)", 1000 + i, f"pool {i}")
                return await conn.fetchval(f"SELECT name FROM {TABLE} WHERE id = $1", 1000 + i)

        names = await asyncio.gather(*(work(i) for i in range(20)))
        check(names == [f"pool {i}" for i in range(20)], f"pool results {names}")
        # pool.fetch & friends, released connections get reset (RESET ALL, UNLISTEN *, ...).
        for i in range(12):
            v = await pool.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id >= $1", 1000)
            check(v == 20, f"pool.fetchval {v}")
        async with pool.acquire() as conn:
            await conn.execute("SET search_path = pg_catalog")
        async with pool.acquire() as conn:
            sp = await conn.fetchval("SHOW search_path")
        # Any of the 4 connections: the one that ran SET was reset on release.
        check(sp == '"$user", public', f"search_path after pool reset {sp!r}")
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def cleanup():
    conn = await connect()
    try:
        await conn.execute(f"DROP TABLE {TABLE}")
    finally:
        await conn.close()


async def main():
    print(f"  asyncpg {asyncpg.__version__}")
    for fn in (scram_login, wrong_password_refused, create_table, insert_and_select_params, replica_read_then_write,
               prepared_statements,
               transaction_rollback, error_then_continue, copy_in_out, cursor_in_transaction, listen_notify,
               cancel_query, pool_usage, cleanup):
        await step(fn)
        if fn is create_table and failures:
            break
    if failures:
        print(f"{DRIVER}: FAILED {len(failures)} step(s): " + "; ".join(f"{n}: {d}" for n, d in failures))
        sys.exit(1)
    print(f"{DRIVER}: ok")


if __name__ == "__main__":
    asyncio.run(main())
