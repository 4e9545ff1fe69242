//! Classifier cost on a realistic OLTP corpus: a parse per statement
//! (uncached) against a lookup in the shared cache (warm).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgnear::router::cache::{ClassifyCache, RecentlyClassified};
use pgnear::router::classify::classify;

/// pgbench's TPC-B-like transaction, then the statements an ORM-backed web
/// application sends most.
const CORPUS: &[(&str, &str)] = &[
    ("pgbench_begin", "BEGIN;"),
    ("pgbench_update_accounts", "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"),
    ("pgbench_select", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"),
    ("pgbench_update_tellers", "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2;"),
    ("pgbench_update_branches", "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2;"),
    (
        "pgbench_insert_history",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
    ),
    ("pgbench_end", "END;"),
    (
        "orm_point_select",
        "SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"name\", \"users\".\"created_at\" \
         FROM \"users\" WHERE \"users\".\"id\" = $1 LIMIT $2",
    ),
    (
        "orm_join",
        "SELECT o.id, o.total, o.status, c.name, c.email FROM orders o \
         JOIN customers c ON c.id = o.customer_id \
         LEFT JOIN shipments s ON s.order_id = o.id \
         WHERE o.customer_id = $1 AND o.status IN ($2, $3, $4) AND o.created_at > now() - interval '30 days' \
         ORDER BY o.created_at DESC LIMIT 20 OFFSET $5",
    ),
    (
        "orm_in_list",
        "SELECT p.id, p.sku, p.price FROM products p \
         WHERE p.id IN ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
         AND p.deleted_at IS NULL",
    ),
    (
        "orm_count_group",
        "SELECT c.id, count(o.id) AS orders, coalesce(sum(o.total), 0) AS spent FROM customers c \
         LEFT JOIN orders o ON o.customer_id = c.id WHERE c.region = $1 GROUP BY c.id \
         HAVING count(o.id) > $2 ORDER BY spent DESC LIMIT 10",
    ),
    (
        "orm_exists",
        "SELECT 1 AS one FROM sessions WHERE sessions.token = $1 AND sessions.expires_at > $2 LIMIT 1",
    ),
    (
        "insert_returning",
        "INSERT INTO orders (customer_id, total, status, created_at) VALUES ($1, $2, $3, now()) RETURNING id",
    ),
    ("update_by_id", "UPDATE customers SET name = $1, email = $2, updated_at = now() WHERE id = $3"),
    ("delete_by_id", "DELETE FROM sessions WHERE id = $1"),
    (
        "upsert",
        "INSERT INTO carts (customer_id, product_id, quantity) VALUES ($1, $2, $3) \
         ON CONFLICT (customer_id, product_id) DO UPDATE SET quantity = carts.quantity + excluded.quantity",
    ),
    ("begin", "BEGIN"),
    ("begin_read_only", "BEGIN READ ONLY"),
    ("commit", "COMMIT"),
    ("set_search_path", "SET search_path TO app, public"),
    ("set_application_name", "SET application_name = 'web-7f9c'"),
    ("select_version", "SELECT version()"),
];

fn uncached(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    group.throughput(Throughput::Elements(CORPUS.len() as u64));
    group.bench_function("corpus", |b| {
        b.iter(|| {
            for (_, sql) in CORPUS {
                black_box(classify(black_box(sql)));
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    for (name, sql) in CORPUS.iter().filter(|(name, _)| REPRESENTATIVE.contains(name)) {
        group.bench_function(*name, |b| b.iter(|| classify(black_box(sql))));
    }
    group.finish();
}

/// Statements benchmarked one by one, besides the whole corpus.
const REPRESENTATIVE: &[&str] =
    &["pgbench_select", "orm_join", "orm_in_list", "insert_returning", "begin", "set_search_path"];

fn cached(c: &mut Criterion) {
    let cache = ClassifyCache::new(10_000);
    for (_, sql) in CORPUS {
        cache.classify(sql);
    }
    let mut group = c.benchmark_group("cache_hit");
    group.throughput(Throughput::Elements(CORPUS.len() as u64));
    group.bench_function("corpus", |b| {
        b.iter(|| {
            for (_, sql) in CORPUS {
                black_box(cache.classify(black_box(sql)));
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    let (_, join) = CORPUS.iter().find(|(name, _)| *name == "orm_join").copied().unwrap_or(CORPUS[0]);
    group.bench_function("orm_join", |b| b.iter(|| cache.classify(black_box(join))));
    // A session repeating its last text (a driver's Parse of the same
    // statement): answered in front of the shared cache.
    let mut last = RecentlyClassified::default();
    group.bench_function("orm_join_repeated_by_a_session", |b| {
        b.iter(|| last.classify(&cache, black_box(join.as_bytes())))
    });
    // A session sending one statement with a new literal each time (the
    // simple protocol's interpolated parameters): answered by its shape.
    let selects: Vec<String> = (0..64)
        .map(|aid| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", aid * 7919))
        .collect();
    let mut turn = 0;
    group.bench_function("pgbench_select_new_literal_in_a_session", |b| {
        b.iter(|| {
            turn = (turn + 1) % selects.len();
            last.classify(&cache, black_box(selects[turn].as_bytes()))
        })
    });
    group.finish();
}

criterion_group!(benches, uncached, cached);
criterion_main!(benches);
