// PgJDBC through pgnear, used the ordinary way.
//
// Connects as PGNEAR_USER/PGNEAR_PASSWORD (SCRAM-SHA-256 against pgnear).
// PgJDBC switches a PreparedStatement to a named server-side statement after
// prepareThreshold (5) executions, and batches pipeline Parse/Bind/Execute
// without a Sync in between. Every step runs even if an earlier one failed;
// prints "jdbc: ok" when all pass, else each failure and exits 1.

import java.io.ByteArrayOutputStream;
import java.io.StringReader;
import java.math.BigDecimal;
import java.sql.Array;
import java.sql.BatchUpdateException;
import java.sql.CallableStatement;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.sql.Types;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class JdbcCheck {
    static final String DRIVER = "jdbc";
    static final int STEP_TIMEOUT_S = 20;
    static final String TABLE = "drv_jdbc";
    static final String URL = "jdbc:postgresql://" + env("PGNEAR_HOST", "127.0.0.1") + ":" + env("PGNEAR_PORT", "6432")
            + "/" + env("PGNEAR_DB", "postgres");
    static final String SERVER_USER = env("PGNEAR_SERVER_USER", "postgres");
    /** False in DIRECT=1 control runs, which have no replica behind them. */
    static final boolean REQUIRE_REPLICA = env("PGNEAR_REQUIRE_REPLICA", "1").equals("1");
    static final List<String> failures = new ArrayList<>();
    static final ExecutorService pool = Executors.newCachedThreadPool(r -> {
        Thread t = new Thread(r);
        t.setDaemon(true);
        return t;
    });

    static String env(String name, String dflt) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? dflt : v;
    }

    interface Step {
        void run() throws Exception;
    }

    static void check(boolean cond, String msg) {
        if (!cond) throw new AssertionError(msg);
    }

    static Connection connect() throws SQLException {
        return connect(new Properties());
    }

    static Connection connect(Properties extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", env("PGNEAR_USER", "app"));
        p.setProperty("password", env("PGNEAR_PASSWORD", "apppw"));
        p.setProperty("ApplicationName", "jdbc_check");
        p.setProperty("connectTimeout", "10");
        p.setProperty("socketTimeout", "40");
        p.setProperty("sslmode", "disable");
        p.putAll(extra);
        return DriverManager.getConnection(URL, p);
    }

    static void step(String name, Step body) {
        long t0 = System.nanoTime();
        Future<?> f = pool.submit((Callable<Void>) () -> {
            body.run();
            return null;
        });
        try {
            f.get(STEP_TIMEOUT_S, TimeUnit.SECONDS);
            System.out.printf("  ok   %s (%.2fs)%n", name, (System.nanoTime() - t0) / 1e9);
        } catch (TimeoutException e) {
            f.cancel(true);
            fail(name, "step did not finish in " + STEP_TIMEOUT_S + "s", null);
        } catch (java.util.concurrent.ExecutionException e) {
            Throwable c = e.getCause();
            String detail = c.getClass().getName() + ": " + c.getMessage();
            if (c instanceof SQLException) {
                SQLException s = (SQLException) c;
                detail += " [SQLSTATE " + s.getSQLState() + "]";
                if (s.getNextException() != null) detail += " next: " + s.getNextException().getMessage();
            }
            fail(name, detail, c);
        } catch (InterruptedException e) {
            fail(name, "interrupted", e);
        }
    }

    static void fail(String name, String detail, Throwable t) {
        failures.add(name + ": " + detail);
        System.out.println("  FAIL " + name + ": " + detail);
        if (t != null) {
            StackTraceElement[] st = t.getStackTrace();
            for (int i = 0; i < Math.min(5, st.length); i++) System.out.println("       at " + st[i]);
        }
    }

    static SQLException expectSqlState(String state, String what, Step body) throws Exception {
        try {
            body.run();
        } catch (SQLException e) {
            check(state.equals(e.getSQLState()), what + ": expected SQLSTATE " + state + ", got " + e.getSQLState() + " (" + e.getMessage() + ")");
            return e;
        }
        throw new AssertionError(what + ": no error (expected SQLSTATE " + state + ")");
    }

    static long count(Connection c, String where) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT count(*) FROM " + TABLE + " " + where)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    // ------------------------------------------------------------------ steps

    static void scramLogin() throws Exception {
        try (Connection c = connect(); Statement s = c.createStatement();
             ResultSet rs = s.executeQuery("SELECT current_user, session_user, current_setting('application_name')")) {
            rs.next();
            check(rs.getString(1).equals(SERVER_USER) && rs.getString(2).equals(SERVER_USER), "server user " + rs.getString(1) + ", expected " + SERVER_USER);
            check(rs.getString(3).equals("jdbc_check"), "application_name " + rs.getString(3));
            DatabaseMetaData md = c.getMetaData();
            check(md.getDatabaseProductVersion().startsWith("15"), "server version " + md.getDatabaseProductVersion());
            check(c.unwrap(PGConnection.class).getBackendPID() > 0, "backend pid");
        }
    }

    static void wrongPasswordRefused() throws Exception {
        Properties p = new Properties();
        p.setProperty("password", "wrong");
        try (Connection c = connect(p)) {
            throw new AssertionError("a wrong password was accepted");
        } catch (SQLException e) {
            check("28P01".equals(e.getSQLState()), "wrong password: SQLSTATE " + e.getSQLState() + " " + e.getMessage());
        }
    }

    static void createTable() throws Exception {
        try (Connection c = connect(); Statement s = c.createStatement()) {
            s.execute("DROP TABLE IF EXISTS " + TABLE);
            s.execute("CREATE TABLE " + TABLE + " (id int PRIMARY KEY, name text NOT NULL, amount numeric(12,2),"
                    + " tags text[], uid uuid, data bytea, at timestamptz DEFAULT now())");
        }
    }

    static void insertAndSelectParams() throws Exception {
        try (Connection c = connect()) {
            try (PreparedStatement ps = c.prepareStatement(
                    "INSERT INTO " + TABLE + " (id, name, amount, tags, uid, data) VALUES (?, ?, ?, ?, ?, ?)")) {
                for (int i = 1; i <= 20; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "row " + i);
                    ps.setBigDecimal(3, new BigDecimal(i + ".50"));
                    ps.setArray(4, c.createArrayOf("text", new String[]{"t" + i, "x"}));
                    ps.setObject(5, new UUID(0, i));
                    ps.setBytes(6, new byte[]{(byte) i, 0, (byte) 255});
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                check(counts.length == 20, "batch counts " + counts.length);
            }
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT id, name, amount, tags, uid, data, at FROM " + TABLE + " WHERE id BETWEEN ? AND ? ORDER BY id")) {
                ps.setInt(1, 5);
                ps.setInt(2, 7);
                try (ResultSet rs = ps.executeQuery()) {
                    List<Integer> ids = new ArrayList<>();
                    while (rs.next()) {
                        ids.add(rs.getInt(1));
                        if (rs.getInt(1) == 5) {
                            check(rs.getString(2).equals("row 5"), "name");
                            check(rs.getBigDecimal(3).compareTo(new BigDecimal("5.50")) == 0, "amount " + rs.getBigDecimal(3));
                            String[] tags = (String[]) rs.getArray(4).getArray();
                            check(tags.length == 2 && tags[0].equals("t5"), "tags");
                            check(rs.getObject(5).equals(new UUID(0, 5)), "uuid " + rs.getObject(5));
                            byte[] b = rs.getBytes(6);
                            check(b.length == 3 && b[0] == 5 && b[2] == (byte) 255, "bytea");
                            check(rs.getTimestamp(7) != null, "timestamptz");
                        }
                    }
                    check(ids.equals(List.of(5, 6, 7)), "ids " + ids);
                }
            }
            check(count(c, "WHERE name LIKE 'row %'") == 20, "count");
        }
    }

    /** With no writes in this session, pgnear sends reads to the replica once it has replayed the proxy's latest write. */
    static void waitForReplicaRead(Connection c, String what) throws Exception {
        long deadline = System.currentTimeMillis() + 5000;
        try (PreparedStatement ps = c.prepareStatement("SELECT current_setting('in_hot_standby')::bool WHERE ?::int = 1")) {
            for (;;) {
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    if (rs.next() && (rs.getBoolean(1) || !REQUIRE_REPLICA)) return;
                }
                check(System.currentTimeMillis() < deadline, what + ": no read reached the replica within 5s");
                Thread.sleep(50);
            }
        }
    }

    static void readThenWrite(Connection c, int id, String what) throws Exception {
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, name) VALUES (?, ?)")) {
            ps.setInt(1, id);
            ps.setString(2, what);
            check(ps.executeUpdate() == 1, what + ": insert");
        }
        try (PreparedStatement ps = c.prepareStatement("SELECT name FROM " + TABLE + " WHERE id = ?")) {
            ps.setInt(1, id);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next() && rs.getString(1).equals(what), what + ": read-your-write");
            }
        }
    }

    static void replicaReadThenWrite() throws Exception {
        // A session whose first statements are reads (served by the replica)
        // then writes (must go to the primary) and reads its own write.
        try (Connection c = connect()) {
            waitForReplicaRead(c, "prepared statements");
            readThenWrite(c, 500, "after replica read");
        }
        // Read-only transactions (setReadOnly: BEGIN READ ONLY), then a write.
        try (Connection c = connect()) {
            waitForReplicaRead(c, "before a read-only transaction");
            c.setReadOnly(true);
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM " + TABLE + " WHERE id > ?")) {
                for (int i = 0; i < 6; i++) {
                    ps.setInt(1, 0);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getLong(1) > 0, "read-only transaction count");
                    }
                }
            }
            c.commit();
            c.setAutoCommit(true);
            c.setReadOnly(false);
            readThenWrite(c, 501, "after a read-only transaction");
        }
    }

    static void preparedStatements() throws Exception {
        try (Connection c = connect()) {
            // One PreparedStatement executed 12 times: unnamed for the first 4, then S_1.
            try (PreparedStatement ps = c.prepareStatement("SELECT id, name FROM " + TABLE + " WHERE id = ?")) {
                for (int i = 0; i < 12; i++) {
                    int id = i % 5 + 1;
                    ps.setInt(1, id);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == id && rs.getString(2).equals("row " + id), "prepared select " + i);
                        check(!rs.next(), "one row");
                    }
                }
            }
            try (PreparedStatement ps = c.prepareStatement("UPDATE " + TABLE + " SET amount = amount + ? WHERE id = ?")) {
                for (int i = 0; i < 12; i++) {
                    ps.setBigDecimal(1, BigDecimal.ONE);
                    ps.setInt(2, 20);
                    check(ps.executeUpdate() == 1, "prepared update " + i);
                }
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT amount FROM " + TABLE + " WHERE id = ?")) {
                ps.setInt(1, 20);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next() && rs.getBigDecimal(1).compareTo(new BigDecimal("32.50")) == 0, "amount after 12 prepared updates");
                }
            }
            // Server-prepared from the first execution, interleaved read/write.
            try (PreparedStatement w = c.prepareStatement("UPDATE " + TABLE + " SET name = ? WHERE id = ?");
                 PreparedStatement r = c.prepareStatement("SELECT name FROM " + TABLE + " WHERE id = ?")) {
                w.unwrap(org.postgresql.PGStatement.class).setPrepareThreshold(1);
                r.unwrap(org.postgresql.PGStatement.class).setPrepareThreshold(1);
                for (int i = 0; i < 12; i++) {
                    int id = i % 3 + 1;
                    w.setString(1, "row " + id);
                    w.setInt(2, id);
                    w.executeUpdate();
                    r.setInt(1, id);
                    try (ResultSet rs = r.executeQuery()) {
                        check(rs.next() && rs.getString(1).equals("row " + id), "read after write " + i);
                    }
                }
                check(r.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(), "statement is server-prepared");
            }
            // In a transaction, with a fetch size (portal, Execute with a row limit).
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT id FROM " + TABLE + " WHERE id BETWEEN ? AND 20 ORDER BY id")) {
                ps.setFetchSize(3);
                for (int round = 0; round < 7; round++) {
                    ps.setInt(1, 1);
                    int n = 0;
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) n++;
                    }
                    check(n == 20, "fetch-size rows " + n + " in round " + round);
                }
            }
            c.commit();
        }
        // prepareThreshold=0 (never named) and preferQueryMode=simple also work.
        for (String[] kv : new String[][]{{"prepareThreshold", "0"}, {"preferQueryMode", "simple"}, {"preferQueryMode", "extendedCacheEverything"}}) {
            Properties p = new Properties();
            p.setProperty(kv[0], kv[1]);
            try (Connection c = connect(p); PreparedStatement ps = c.prepareStatement("SELECT name FROM " + TABLE + " WHERE id = ?")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, 4);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getString(1).equals("row 4"), kv[0] + "=" + kv[1] + " select " + i);
                    }
                }
            }
        }
    }

    static void transactionRollback() throws Exception {
        try (Connection c = connect()) {
            long before = count(c, "");
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, name) VALUES (?, ?)")) {
                ps.setInt(1, 900);
                ps.setString(2, "rolled back");
                ps.executeUpdate();
            }
            check(count(c, "") == before + 1, "count inside the transaction");
            c.rollback();
            check(count(c, "") == before, "count after rollback");
            c.commit();
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO " + TABLE + " (id, name) VALUES (901, 'kept')");
                Savepoint sp = c.setSavepoint();
                s.executeUpdate("INSERT INTO " + TABLE + " (id, name) VALUES (902, 'savepoint')");
                c.rollback(sp);
                c.commit();
            }
            c.setAutoCommit(true);
            check(count(c, "WHERE id >= 900") == 1 && count(c, "WHERE id = 901") == 1, "rows after savepoint rollback");
            // setReadOnly: PgJDBC sends BEGIN READ ONLY for each transaction.
            c.setReadOnly(true);
            c.setAutoCommit(false);
            check(count(c, "") == before + 1, "read-only count");
            expectSqlState("25006", "write in a read-only transaction",
                    () -> { try (Statement s = c.createStatement()) { s.executeUpdate("DELETE FROM " + TABLE); } });
            c.rollback();
            c.setAutoCommit(true);
            c.setReadOnly(false);
            check(count(c, "") == before + 1, "count after read-only transaction");
        }
    }

    static void errorThenContinue() throws Exception {
        try (Connection c = connect()) {
            expectSqlState("22012", "1/0", () -> { try (Statement s = c.createStatement()) { s.executeQuery("SELECT 1/0"); } });
            check(count(c, "") > 0, "select after error");
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int / ?::int")) {
                // Fails on the 6th (server-prepared) execution, then keeps working.
                for (int i = 0; i < 10; i++) {
                    int d = i == 6 ? 0 : 2;
                    ps.setInt(1, 8);
                    ps.setInt(2, d);
                    if (d == 0) {
                        expectSqlState("22012", "prepared 1/0", () -> ps.executeQuery().close());
                    } else {
                        try (ResultSet rs = ps.executeQuery()) {
                            check(rs.next() && rs.getInt(1) == 4, "prepared division " + i);
                        }
                    }
                }
            }
            expectSqlState("23505", "duplicate key",
                    () -> { try (Statement s = c.createStatement()) { s.executeUpdate("INSERT INTO " + TABLE + " (id, name) VALUES (1, 'dup')"); } });
            expectSqlState("42P01", "missing table",
                    () -> { try (Statement s = c.createStatement()) { s.executeQuery("SELECT * FROM no_such_table_xyz"); } });
            // In a transaction: aborted until rollback.
            c.setAutoCommit(false);
            expectSqlState("22012", "1/0 in a transaction", () -> { try (Statement s = c.createStatement()) { s.executeQuery("SELECT 1/0"); } });
            expectSqlState("25P02", "statement in an aborted transaction", () -> count(c, ""));
            c.rollback();
            check(count(c, "") > 0, "select after rollback");
            c.commit();
            c.setAutoCommit(true);
            // A batch with a failing row.
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, name) VALUES (?, ?)")) {
                for (int id : new int[]{950, 951, 1, 952}) {
                    ps.setInt(1, id);
                    ps.setString(2, "batch " + id);
                    ps.addBatch();
                }
                try {
                    ps.executeBatch();
                    throw new AssertionError("a batch with a duplicate key succeeded");
                } catch (BatchUpdateException e) {
                    SQLException next = e.getNextException();
                    check(next != null && "23505".equals(next.getSQLState()), "batch error " + e.getMessage());
                }
            }
            // PgJDBC sends the whole batch before one Sync: one implicit
            // transaction, so the failure undoes the rows before it too.
            long kept = count(c, "WHERE id BETWEEN 950 AND 952");
            check(kept == 0, "rows kept from a failed autocommit batch: " + kept + ", expected 0");
            try (Statement s = c.createStatement()) {
                s.executeUpdate("DELETE FROM " + TABLE + " WHERE id BETWEEN 950 AND 952");
            }
        }
    }

    static void copyInOut() throws Exception {
        try (Connection c = connect()) {
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder sb = new StringBuilder();
            for (int i = 200; i < 300; i++) sb.append(i).append('\t').append("copied ").append(i).append('\t').append(i).append('\n');
            long n = cm.copyIn("COPY " + TABLE + " (id, name, amount) FROM STDIN", new StringReader(sb.toString()));
            check(n == 100, "copyIn rows " + n);
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            long m = cm.copyOut("COPY (SELECT id, name FROM " + TABLE + " WHERE id >= 200 AND id < 300 ORDER BY id) TO STDOUT WITH (FORMAT csv)", out);
            check(m == 100, "copyOut rows " + m);
            String[] lines = out.toString("UTF-8").split("\n");
            check(lines.length == 100 && lines[0].equals("200,copied 200") && lines[99].equals("299,copied 299"), "copyOut content");
            expectSqlState("23505", "failing COPY", () -> cm.copyIn("COPY " + TABLE + " (id, name) FROM STDIN", new StringReader("1\tdup\n")));
            check(count(c, "WHERE id >= 200 AND id < 300") == 100, "select after failed COPY");
        }
    }

    static void listenNotify() throws Exception {
        try (Connection listener = connect(); Connection sender = connect()) {
            try (Statement s = listener.createStatement()) {
                s.execute("LISTEN drv_jdbc_ch");
            }
            try (Statement s = sender.createStatement()) {
                s.execute("NOTIFY drv_jdbc_ch, 'hello'");
            }
            try (PreparedStatement ps = sender.prepareStatement("SELECT pg_notify(?, ?)")) {
                ps.setString(1, "drv_jdbc_ch");
                ps.setString(2, "world");
                ps.executeQuery().close();
            }
            List<String> got = new ArrayList<>();
            long deadline = System.currentTimeMillis() + 5000;
            PGConnection pgl = listener.unwrap(PGConnection.class);
            while (got.size() < 2 && System.currentTimeMillis() < deadline) {
                PGNotification[] ns = pgl.getNotifications(500);
                if (ns != null) for (PGNotification n : ns) got.add(n.getName() + ":" + n.getParameter());
            }
            check(got.equals(List.of("drv_jdbc_ch:hello", "drv_jdbc_ch:world")), "notifications " + got);
            try (Statement s = listener.createStatement()) {
                s.execute("UNLISTEN *");
            }
        }
    }

    static void cancelQuery() throws Exception {
        try (Connection c = connect()) {
            // Statement.cancel() from another thread: a CancelRequest.
            try (Statement s = c.createStatement()) {
                Future<?> canceller = pool.submit(() -> {
                    Thread.sleep(700);
                    s.cancel();
                    return null;
                });
                long t0 = System.currentTimeMillis();
                expectSqlState("57014", "Statement.cancel()", () -> s.executeQuery("SELECT pg_sleep(30)"));
                canceller.get();
                check(System.currentTimeMillis() - t0 < 10000, "cancel was slow");
            }
            check(count(c, "") > 0, "select after cancel");
            // setQueryTimeout: PgJDBC's timer sends the CancelRequest.
            try (PreparedStatement ps = c.prepareStatement("SELECT pg_sleep(?)")) {
                ps.setQueryTimeout(1);
                ps.setInt(1, 30);
                long t0 = System.currentTimeMillis();
                expectSqlState("57014", "setQueryTimeout", () -> ps.executeQuery());
                check(System.currentTimeMillis() - t0 < 10000, "query timeout was slow");
            }
            // In a transaction that wrote.
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE " + TABLE + " SET name = name WHERE id = 1");
                s.setQueryTimeout(1);
                expectSqlState("57014", "setQueryTimeout in a transaction", () -> s.executeQuery("SELECT pg_sleep(30)"));
            }
            c.rollback();
            c.setAutoCommit(true);
            check(count(c, "") > 0, "select after cancel in a transaction");
        }
    }

    static void metadataAndCallable() throws Exception {
        try (Connection c = connect()) {
            DatabaseMetaData md = c.getMetaData();
            boolean found = false;
            try (ResultSet rs = md.getTables(null, "public", TABLE, new String[]{"TABLE"})) {
                while (rs.next()) found |= rs.getString("TABLE_NAME").equals(TABLE);
            }
            check(found, "getTables did not list " + TABLE);
            int cols = 0;
            try (ResultSet rs = md.getColumns(null, "public", TABLE, null)) {
                while (rs.next()) cols++;
            }
            check(cols == 7, "getColumns " + cols);
            try (ResultSet rs = md.getPrimaryKeys(null, "public", TABLE)) {
                check(rs.next() && rs.getString("COLUMN_NAME").equals("id"), "primary key");
            }
            try (CallableStatement cs = c.prepareCall("{? = call upper(?)}")) {
                cs.registerOutParameter(1, Types.VARCHAR);
                cs.setString(2, "abc");
                cs.execute();
                check(cs.getString(1).equals("ABC"), "callable upper");
            }
            Array a = c.createArrayOf("int4", new Integer[]{1, 2, 3});
            try (PreparedStatement ps = c.prepareStatement("SELECT cardinality(?::int4[])")) {
                ps.setArray(1, a);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next() && rs.getInt(1) == 3, "array parameter");
                }
            }
        }
    }

    static void cleanup() throws Exception {
        try (Connection c = connect(); Statement s = c.createStatement()) {
            s.execute("DROP TABLE " + TABLE);
        }
    }

    public static void main(String[] args) {
        System.out.println("  PgJDBC " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ", Java " + System.getProperty("java.version"));
        step("scram_login", JdbcCheck::scramLogin);
        step("wrong_password_refused", JdbcCheck::wrongPasswordRefused);
        step("create_table", JdbcCheck::createTable);
        if (failures.isEmpty()) {
            step("insert_and_select_params", JdbcCheck::insertAndSelectParams);
            step("replica_read_then_write", JdbcCheck::replicaReadThenWrite);
            step("prepared_statements", JdbcCheck::preparedStatements);
            step("transaction_rollback", JdbcCheck::transactionRollback);
            step("error_then_continue", JdbcCheck::errorThenContinue);
            step("copy_in_out", JdbcCheck::copyInOut);
            step("listen_notify", JdbcCheck::listenNotify);
            step("cancel_query", JdbcCheck::cancelQuery);
            step("metadata_and_callable", JdbcCheck::metadataAndCallable);
            step("cleanup", JdbcCheck::cleanup);
        }
        if (!failures.isEmpty()) {
            System.out.println(DRIVER + ": FAILED " + failures.size() + " step(s): " + String.join("; ", failures));
            System.exit(1);
        }
        System.out.println(DRIVER + ": ok");
        System.exit(0);
    }
}
