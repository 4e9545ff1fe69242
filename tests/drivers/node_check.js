// node-postgres (npm `pg`) through pgnear, used the ordinary way.
//
// Connects as PGNEAR_USER/PGNEAR_PASSWORD (SCRAM-SHA-256 against pgnear).
// Every step runs even if an earlier one failed; prints "node: ok" when all
// pass, else each failure and exits 1. COPY uses pg-copy-streams and
// cursors pg-cursor, the packages node-postgres' documentation points to.
'use strict'

const pg = require('pg')
const { pipeline } = require('stream/promises')
const { Readable, Writable } = require('stream')
function optional(name) {
  try {
    return require(name)
  } catch (e) {
    return null
  }
}
const copyStreams = optional('pg-copy-streams')
const Cursor = optional('pg-cursor')

const DRIVER = 'node'
const STEP_TIMEOUT_MS = 20000
const TABLE = 'drv_node'

const CONFIG = {
  host: process.env.PGNEAR_HOST || '127.0.0.1',
  port: Number(process.env.PGNEAR_PORT || 6432),
  user: process.env.PGNEAR_USER || 'app',
  password: process.env.PGNEAR_PASSWORD || 'apppw',
  database: process.env.PGNEAR_DB || 'postgres',
  application_name: 'node_check',
  connectionTimeoutMillis: 10000,
}

const SERVER_USER = process.env.PGNEAR_SERVER_USER || 'postgres'
// 0 in DIRECT=1 control runs, which have no replica behind them.
const REQUIRE_REPLICA = (process.env.PGNEAR_REQUIRE_REPLICA || '1') === '1'
const failures = []

function check(cond, msg) {
  if (!cond) throw new Error('assertion failed: ' + msg)
}

// Names the part of a step that failed.
async function kase(label, fn) {
  try {
    return await fn()
  } catch (err) {
    const wrapped = new Error(`${label}: ${err.message}`)
    wrapped.code = err.code
    throw wrapped
  }
}

async function connect(extra = {}) {
  const client = new pg.Client({ ...CONFIG, ...extra })
  // An 'error' event without a listener would crash the process.
  client.on('error', (err) => console.log(`  (client error event: ${err.message})`))
  await client.connect()
  return client
}

async function withClient(fn, extra) {
  const client = await connect(extra)
  try {
    return await fn(client)
  } finally {
    await client.end().catch(() => {})
  }
}

async function expectError(promise, code, what) {
  try {
    await promise
  } catch (err) {
    check(err.code === code, `${what}: expected SQLSTATE ${code}, got ${err.code} (${err.message})`)
    return err
  }
  throw new Error(`${what}: no error (expected SQLSTATE ${code})`)
}

async function step(name, fn) {
  const t0 = Date.now()
  let timer
  try {
    await Promise.race([
      fn(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`step did not finish in ${STEP_TIMEOUT_MS / 1000}s`)), STEP_TIMEOUT_MS)
      }),
    ])
    console.log(`  ok   ${name} (${((Date.now() - t0) / 1000).toFixed(2)}s)`)
  } catch (err) {
    let detail = `${err.name}: ${err.message}`
    if (err.code) detail += ` [SQLSTATE ${err.code}]`
    failures.push([name, detail])
    console.log(`  FAIL ${name}: ${detail}`)
    const stack = (err.stack || '').split('\n').slice(1, 5).join('\n       ')
    if (stack) console.log('       ' + stack)
  } finally {
    clearTimeout(timer)
  }
}

// ------------------------------------------------------------------ steps

async function scramLogin() {
  await withClient(async (c) => {
    const r = await c.query('SELECT current_user AS u, session_user AS s')
    check(r.rows[0].u === SERVER_USER && r.rows[0].s === SERVER_USER, `server user ${JSON.stringify(r.rows[0])}, expected ${SERVER_USER}`)
    check(c.processID > 0, `processID ${c.processID}`)
    const app = await c.query('SHOW application_name')
    check(app.rows[0].application_name === 'node_check', `application_name ${JSON.stringify(app.rows[0])}`)
  })
}

async function wrongPasswordRefused() {
  const c = new pg.Client({ ...CONFIG, password: 'wrong' })
  c.on('error', () => {})
  try {
    await c.connect()
  } catch (err) {
    check(err.code === '28P01', `wrong password: expected 28P01, got ${err.code} (${err.message})`)
    return
  } finally {
    await c.end().catch(() => {})
  }
  throw new Error('a wrong password was accepted')
}

async function createTable() {
  await withClient(async (c) => {
    await c.query(`DROP TABLE IF EXISTS ${TABLE}`)
    await c.query(
      `CREATE TABLE ${TABLE} (id int PRIMARY KEY, name text NOT NULL, amount numeric(12,2),` +
        ' tags text[], doc jsonb, data bytea, at timestamptz DEFAULT now())'
    )
  })
}

async function insertAndSelectParams() {
  await withClient(async (c) => {
    for (let i = 1; i <= 20; i++) {
      const r = await c.query(
        `INSERT INTO ${TABLE} (id, name, amount, tags, doc, data) VALUES ($1, $2, $3, $4, $5, $6)`,
        [i, `row ${i}`, `${i}.50`, [`t${i}`, 'x'], { n: i }, Buffer.from([i, 0, 255])]
      )
      check(r.rowCount === 1 && r.command === 'INSERT', `insert ${i}: ${r.command} ${r.rowCount}`)
    }
    const r = await c.query(
      `SELECT id, name, amount, tags, doc, data, at FROM ${TABLE} WHERE id BETWEEN $1 AND $2 ORDER BY id`,
      [5, 7]
    )
    check(JSON.stringify(r.rows.map((x) => x.id)) === '[5,6,7]', `ids ${r.rows.map((x) => x.id)}`)
    const row = r.rows[0]
    check(row.name === 'row 5' && row.amount === '5.50' && JSON.stringify(row.tags) === '["t5","x"]', `row ${JSON.stringify(row)}`)
    check(row.doc.n === 5 && Buffer.compare(row.data, Buffer.from([5, 0, 255])) === 0, `row ${JSON.stringify(row)}`)
    check(row.at instanceof Date, 'timestamptz parsed')
    const a = await c.query({ text: `SELECT id, name FROM ${TABLE} WHERE id = $1`, values: [3], rowMode: 'array' })
    check(JSON.stringify(a.rows) === '[[3,"row 3"]]', `rowMode array ${JSON.stringify(a.rows)}`)
    check(a.fields.map((f) => f.name).join() === 'id,name', 'fields')
    const n = await c.query(`SELECT count(*)::int AS n FROM ${TABLE} WHERE name LIKE $1`, ['row %'])
    check(n.rows[0].n === 20, `count ${n.rows[0].n}`)
  })
}

async function waitForReplicaRead(c, what) {
  // With no writes in this session, pgnear sends reads to the replica once
  // it has replayed the proxy's latest write.
  const deadline = Date.now() + 5000
  for (;;) {
    const r = await c.query('SELECT current_setting(\'in_hot_standby\')::bool AS r WHERE $1::int = 1', [1])
    if (r.rows[0].r || !REQUIRE_REPLICA) return
    check(Date.now() < deadline, `${what}: no read reached the replica within 5s`)
    await new Promise((res) => setTimeout(res, 50))
  }
}

async function readThenWrite(c, id, what) {
  const ins = await c.query(`INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, [id, what])
  check(ins.rowCount === 1, `${what}: insert`)
  const r = await c.query(`SELECT name FROM ${TABLE} WHERE id = $1`, [id])
  check(r.rows.length === 1 && r.rows[0].name === what, `${what}: read-your-write ${JSON.stringify(r.rows)}`)
}

async function replicaReadThenWrite() {
  // A session whose first statements are reads (served by the replica)
  // then writes (must go to the primary) and reads its own write.
  await kase('read, then a write', () => withClient(async (c) => {
    await waitForReplicaRead(c, 'unnamed statements')
    await readThenWrite(c, 500, 'after replica read')
  }))
  await kase('named read, then a write', () => withClient(async (c) => {
    await waitForReplicaRead(c, 'before a named statement')
    const r = await c.query({ name: 'recovery', text: 'SELECT current_setting(\'in_hot_standby\')::bool AS r', values: [] })
    console.log(`       (named read served by the ${r.rows[0].r ? 'replica' : 'primary'})`)
    await readThenWrite(c, 501, 'after a named read')
  }))
  // pg-cursor: Execute with a row limit followed by Flush, Sync only at close.
  if (!Cursor) throw new Error('pg-cursor is not installed')
  await kase('pg-cursor read (Execute with a row limit + Flush), then a write', () => withClient(async (c) => {
    await waitForReplicaRead(c, 'before a cursor')
    const cursor = c.query(new Cursor('SELECT current_setting(\'in_hot_standby\')::bool AS r, g FROM generate_series(1, $1::int) g', [10]))
    const first = await cursor.read(3)
    const rest = await cursor.read(100)
    await cursor.close()
    check(first.length === 3 && rest.length === 7, `cursor rows ${first.length} + ${rest.length}`)
    console.log(`       (cursor read served by the ${first[0].r ? 'replica' : 'primary'})`)
    await readThenWrite(c, 502, 'after a cursor read')
  }))
}

async function preparedStatements() {
  await withClient(async (c) => {
    // Named statements: parsed once per connection, then Bind/Execute only.
    for (let i = 0; i < 12; i++) {
      const id = (i % 5) + 1
      const r = await c.query({ name: 'get-row', text: `SELECT id, name FROM ${TABLE} WHERE id = $1`, values: [id] })
      check(r.rows.length === 1 && r.rows[0].name === `row ${id}`, `named select ${i}: ${JSON.stringify(r.rows)}`)
    }
    for (let i = 0; i < 12; i++) {
      await c.query({ name: 'bump', text: `UPDATE ${TABLE} SET amount = amount + $1 WHERE id = $2`, values: [1, 20] })
    }
    const r = await c.query({ name: 'get-amount', text: `SELECT amount FROM ${TABLE} WHERE id = $1`, values: [20] })
    check(r.rows[0].amount === '32.50', `amount after 12 named updates ${r.rows[0].amount}`)
    // Interleaved named read/write.
    for (let i = 0; i < 12; i++) {
      const id = (i % 3) + 1
      await c.query({ name: 'set-name', text: `UPDATE ${TABLE} SET name = $1 WHERE id = $2`, values: [`row ${id}`, id] })
      const g = await c.query({ name: 'get-row', text: `SELECT id, name FROM ${TABLE} WHERE id = $1`, values: [id] })
      check(g.rows[0].name === `row ${id}`, `read after write ${i}`)
    }
  })
}

async function pipelineMode() {
  // pg >= 8.14 `pipeline: true`: queries are sent without waiting for results.
  await withClient(
    async (c) => {
      if (!c.pipeline) {
        console.log('  (this pg has no pipeline mode; skipped)')
        return
      }
      const ps = []
      for (let i = 101; i <= 110; i++) {
        ps.push(c.query(`INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, [i, `pipe ${i}`]))
      }
      ps.push(c.query(`SELECT count(*)::int AS n FROM ${TABLE} WHERE id BETWEEN $1 AND $2`, [101, 110]))
      const results = await Promise.all(ps)
      check(results[10].rows[0].n === 10, `pipelined count ${results[10].rows[0].n}`)
      // An error in the middle fails only that query.
      const settled = await Promise.allSettled([
        c.query('SELECT 1 AS x'),
        c.query('SELECT 1/0'),
        c.query('SELECT 2 AS x'),
      ])
      check(settled[0].status === 'fulfilled' && settled[0].value.rows[0].x === 1, 'first pipelined query')
      check(settled[1].status === 'rejected' && settled[1].reason.code === '22012', 'pipelined 1/0')
      check(settled[2].status === 'fulfilled' && settled[2].value.rows[0].x === 2, `third pipelined query ${settled[2].status}`)
    },
    { pipeline: true }
  )
}

async function transactionRollback() {
  await withClient(async (c) => {
    const count = async () => (await c.query(`SELECT count(*)::int AS n FROM ${TABLE}`)).rows[0].n
    const before = await count()
    await c.query('BEGIN')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, [900, 'rolled back'])
    check((await count()) === before + 1, 'count inside the transaction')
    await c.query('ROLLBACK')
    check((await count()) === before, 'count after rollback')
    await c.query('BEGIN')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, [901, 'kept'])
    await c.query('SAVEPOINT sp')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, [902, 'savepoint'])
    await c.query('ROLLBACK TO SAVEPOINT sp')
    await c.query('COMMIT')
    const ids = (await c.query(`SELECT id FROM ${TABLE} WHERE id >= $1 ORDER BY id`, [900])).rows.map((r) => r.id)
    check(JSON.stringify(ids) === '[901]', `ids after savepoint rollback ${ids}`)
    await c.query('BEGIN READ ONLY')
    check((await count()) === before + 1, 'read-only count')
    await c.query('COMMIT')
  })
}

async function errorThenContinue() {
  await withClient(async (c) => {
    await expectError(c.query('SELECT 1/0'), '22012', 'simple 1/0')
    check((await c.query('SELECT 1 AS x')).rows[0].x === 1, 'select after error')
    await expectError(c.query('SELECT $1::int / 0', [1]), '22012', 'extended 1/0')
    check((await c.query('SELECT $1::int AS x', [2])).rows[0].x === 2, 'extended select after error')
    await expectError(c.query({ name: 'div', text: 'SELECT $1::int / $2::int AS x', values: [1, 0] }), '22012', 'named 1/0')
    check((await c.query({ name: 'div', text: 'SELECT $1::int / $2::int AS x', values: [4, 2] })).rows[0].x === 2, 'named statement after its error')
    await expectError(c.query(`INSERT INTO ${TABLE} (id, name) VALUES (1, 'dup')`), '23505', 'duplicate key')
    await expectError(c.query('SELECT * FROM no_such_table_xyz'), '42P01', 'missing table')
    await c.query('BEGIN')
    await expectError(c.query('SELECT 1/0'), '22012', '1/0 in a transaction')
    await expectError(c.query('SELECT 1'), '25P02', 'statement in an aborted transaction')
    await c.query('ROLLBACK')
    check((await c.query('SELECT 3 AS x')).rows[0].x === 3, 'select after rollback')
    // Several statements in one simple query.
    const multi = await c.query('SELECT 1 AS a; SELECT 2 AS b')
    check(Array.isArray(multi) && multi[1].rows[0].b === 2, 'multi-statement simple query')
  })
}

async function copyInOut() {
  if (!copyStreams) throw new Error('pg-copy-streams is not installed')
  await withClient(async (c) => {
    const lines = []
    for (let i = 200; i < 300; i++) lines.push(`${i}\tcopied ${i}\t${i}\n`)
    const ingest = c.query(copyStreams.from(`COPY ${TABLE} (id, name, amount) FROM STDIN`))
    await pipeline(Readable.from(lines), ingest)
    check(ingest.rowCount === 100, `COPY FROM rowCount ${ingest.rowCount}`)
    const chunks = []
    const out = c.query(copyStreams.to(`COPY (SELECT id, name FROM ${TABLE} WHERE id >= 200 AND id < 300 ORDER BY id) TO STDOUT WITH (FORMAT csv)`))
    await pipeline(out, new Writable({ write(chunk, _enc, cb) { chunks.push(chunk); cb() } }))
    const text = Buffer.concat(chunks).toString()
    const got = text.trim().split('\n')
    check(got.length === 100 && got[0] === '200,copied 200' && got[99] === '299,copied 299', `COPY TO content ${got.length}`)
    // A failing COPY; the connection stays usable.
    let failed = null
    try {
      await pipeline(Readable.from(['1\tdup\n']), c.query(copyStreams.from(`COPY ${TABLE} (id, name) FROM STDIN`)))
    } catch (err) {
      failed = err
    }
    check(failed && failed.code === '23505', `failing COPY: ${failed && failed.message}`)
    check((await c.query('SELECT 5 AS x')).rows[0].x === 5, 'select after failed COPY')
  })
}

async function listenNotify() {
  const listener = await connect()
  const sender = await connect()
  try {
    const got = []
    let resolve
    const two = new Promise((r) => (resolve = r))
    listener.on('notification', (msg) => {
      got.push([msg.channel, msg.payload])
      if (got.length >= 2) resolve()
    })
    await listener.query('LISTEN drv_node_ch')
    await sender.query("NOTIFY drv_node_ch, 'hello'")
    await sender.query('SELECT pg_notify($1, $2)', ['drv_node_ch', 'world'])
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error(`notifications not delivered in 5s; got ${JSON.stringify(got)}`)), 5000))
    await Promise.race([two, timeout])
    check(JSON.stringify(got) === JSON.stringify([['drv_node_ch', 'hello'], ['drv_node_ch', 'world']]), `notifications ${JSON.stringify(got)}`)
    await listener.query('UNLISTEN drv_node_ch')
  } finally {
    await listener.end().catch(() => {})
    await sender.end().catch(() => {})
  }
}

async function cancelQuery() {
  // statement_timeout: the documented way to bound a query.
  await withClient(
    async (c) => {
      const t0 = Date.now()
      await expectError(c.query('SELECT pg_sleep(30)'), '57014', 'statement_timeout')
      check(Date.now() - t0 < 10000, 'statement_timeout was slow')
      check((await c.query('SELECT 6 AS x')).rows[0].x === 6, 'select after statement_timeout')
    },
    { statement_timeout: 500 }
  )
  // A real CancelRequest with the BackendKeyData pgnear handed out
  // (Client#cancel: what pg's native-free cancel path uses).
  await withClient(async (c) => {
    const t0 = Date.now()
    const q = c.query('SELECT pg_sleep(30)')
    const active = c.activeQuery
    await new Promise((r) => setTimeout(r, 700))
    const canceller = new pg.Client(CONFIG)
    canceller.on('error', () => {})
    canceller.cancel(c, c.activeQuery || active)
    await expectError(q, '57014', 'CancelRequest')
    check(Date.now() - t0 < 10000, `cancel took ${Date.now() - t0}ms`)
    check((await c.query('SELECT 7 AS x')).rows[0].x === 7, 'select after cancel')
    // Inside a transaction that wrote.
    await c.query('BEGIN')
    await c.query(`UPDATE ${TABLE} SET name = name WHERE id = 1`)
    const q2 = c.query('SELECT pg_sleep(30)')
    await new Promise((r) => setTimeout(r, 700))
    const canceller2 = new pg.Client(CONFIG)
    canceller2.on('error', () => {})
    canceller2.cancel(c, c.activeQuery)
    await expectError(q2, '57014', 'CancelRequest in a transaction')
    await c.query('ROLLBACK')
    check((await c.query('SELECT 8 AS x')).rows[0].x === 8, 'select after cancel in a transaction')
  })
}

async function poolUsage() {
  const pool = new pg.Pool({ ...CONFIG, max: 4 })
  pool.on('error', (err) => console.log(`  (pool error event: ${err.message})`))
  try {
    const work = async (i) => {
      const c = await pool.connect()
      try {
        await c.query('BEGIN')
        await c.query(`INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, [1000 + i, `pool ${i}`])
        await c.query('COMMIT')
        return (await c.query(`SELECT name FROM ${TABLE} WHERE id = $1`, [1000 + i])).rows[0].name
      } finally {
        c.release()
      }
    }
    const names = await Promise.all(Array.from({ length: 20 }, (_, i) => work(i)))
    check(names.every((n, i) => n === `pool ${i}`), `pool results ${names}`)
    const rs = await Promise.all(Array.from({ length: 12 }, () => pool.query(`SELECT count(*)::int AS n FROM ${TABLE} WHERE id >= $1`, [1000])))
    check(rs.every((r) => r.rows[0].n === 20), `pool.query counts ${rs.map((r) => r.rows[0].n)}`)
  } finally {
    await pool.end()
  }
}

async function cleanup() {
  await withClient((c) => c.query(`DROP TABLE ${TABLE}`))
}

function versionOf(name) {
  // Some packages do not export their package.json: find it from the entry point.
  const fs = require('fs')
  const path = require('path')
  let dir
  try {
    dir = path.dirname(require.resolve(name))
  } catch (e) {
    return 'missing'
  }
  for (; dir !== path.dirname(dir); dir = path.dirname(dir)) {
    const file = path.join(dir, 'package.json')
    if (fs.existsSync(file)) {
      const pkg = JSON.parse(fs.readFileSync(file, 'utf8'))
      if (pkg.name === name) return pkg.version
    }
  }
  return 'unknown'
}

async function main() {
  const versions = ['pg', 'pg-copy-streams', 'pg-cursor'].map((p) => `${p} ${versionOf(p)}`).join(', ')
  console.log(`  ${versions}, node ${process.version}`)
  const steps = [
    ['scram_login', scramLogin],
    ['wrong_password_refused', wrongPasswordRefused],
    ['create_table', createTable],
    ['insert_and_select_params', insertAndSelectParams],
    ['replica_read_then_write', replicaReadThenWrite],
    ['prepared_statements', preparedStatements],
    ['pipeline_mode', pipelineMode],
    ['transaction_rollback', transactionRollback],
    ['error_then_continue', errorThenContinue],
    ['copy_in_out', copyInOut],
    ['listen_notify', listenNotify],
    ['cancel_query', cancelQuery],
    ['pool_usage', poolUsage],
    ['cleanup', cleanup],
  ]
  for (const [name, fn] of steps) {
    await step(name, fn)
    if (name === 'create_table' && failures.length) break
  }
  if (failures.length) {
    console.log(`${DRIVER}: FAILED ${failures.length} step(s): ` + failures.map(([n, d]) => `${n}: ${d}`).join('; '))
    process.exit(1)
  }
  console.log(`${DRIVER}: ok`)
  process.exit(0)
}

main().catch((err) => {
  console.log(`${DRIVER}: FAILED: ${err.stack || err}`)
  process.exit(1)
})
