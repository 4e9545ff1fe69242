//! Framing cost on recorded-shaped traffic: splitting frames off a read
//! buffer (what `FrameReader` does for every server and client message),
//! relaying them into an output buffer (what the session does with each
//! server frame), building the frames pgnear writes itself, and parsing the
//! client messages routing looks inside.
//!
//! The byte streams are built message by message with the layouts
//! PostgreSQL 15 and libpq put on the wire for pgbench's statements:
//! `-M prepared` sends Bind/Describe(portal)/Execute/Sync per statement
//! (PQsendQueryPrepared), `-M extended` adds an unnamed Parse
//! (PQsendQueryParams), `-M simple` a Query.

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgnear::protocol::backend::{self, ErrorFields, Severity};
use pgnear::protocol::frame::decode;
use pgnear::protocol::frontend;
use pgnear::protocol::{Frame, SqlState};

const LIMIT: usize = 256 * 1024 * 1024;

/// The SELECT pgbench -S sends.
const SELECT_ONLY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn msg(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
}

/// RowDescription of `pgbench_accounts` (aid int4, bid int4, abalance
/// int4, filler char(84)), as PostgreSQL 15 sends it.
fn accounts_row_description() -> Vec<u8> {
    let mut b = BytesMut::new();
    let columns: [(&str, i16, u32, i16, i32); 4] = [
        ("aid", 1, 23, 4, -1),
        ("bid", 2, 23, 4, -1),
        ("abalance", 3, 23, 4, -1),
        ("filler", 4, 1042, -1, 88),
    ];
    b.put_i16(columns.len() as i16);
    for (name, attnum, oid, len, typmod) in columns {
        cstr(&mut b, name);
        b.put_u32(16_397); // pgbench_accounts' oid
        b.put_i16(attnum);
        b.put_u32(oid);
        b.put_i16(len);
        b.put_i32(typmod);
        b.put_i16(0);
    }
    b.to_vec()
}

fn accounts_data_row(aid: u32) -> Vec<u8> {
    let mut b = BytesMut::new();
    let filler = " ".repeat(84);
    let values = [aid.to_string(), (aid / 100_000 + 1).to_string(), "0".to_string(), filler];
    b.put_i16(values.len() as i16);
    for v in &values {
        b.put_i32(v.len() as i32);
        b.put_slice(v.as_bytes());
    }
    b.to_vec()
}

/// The server's answer to `SELECT * FROM pgbench_accounts LIMIT 100`:
/// RowDescription, 100 DataRows, CommandComplete, ReadyForQuery.
fn result_set_100() -> BytesMut {
    let mut out = BytesMut::new();
    msg(&mut out, b'T', &accounts_row_description());
    for aid in 1..=100 {
        msg(&mut out, b'D', &accounts_data_row(aid));
    }
    msg(&mut out, b'C', b"SELECT 100\0");
    msg(&mut out, b'Z', b"I");
    out
}

/// The server's answer to one pgbench -S transaction in simple mode
/// (RowDescription, DataRow, CommandComplete, ReadyForQuery), 100 times.
fn select_only_simple_responses() -> BytesMut {
    let mut out = BytesMut::new();
    let mut t = BytesMut::new();
    t.put_i16(1);
    cstr(&mut t, "abalance");
    t.put_u32(16_397);
    t.put_i16(3);
    t.put_u32(23);
    t.put_i16(4);
    t.put_i32(-1);
    t.put_i16(0);
    for _ in 0..100 {
        msg(&mut out, b'T', &t);
        msg(&mut out, b'D', b"\0\x01\0\0\0\x01\x30");
        msg(&mut out, b'C', b"SELECT 1\0");
        msg(&mut out, b'Z', b"I");
    }
    out
}

/// Bind (one text parameter), Describe portal, Execute, Sync.
fn bind_execute_sync(out: &mut BytesMut, statement: &str, aid: u32) {
    let mut b = BytesMut::new();
    cstr(&mut b, "");
    cstr(&mut b, statement);
    b.put_i16(0); // parameter formats: all text
    b.put_i16(1);
    let value = aid.to_string();
    b.put_i32(value.len() as i32);
    b.put_slice(value.as_bytes());
    b.put_i16(0); // result formats: all text
    msg(out, b'B', &b);
    msg(out, b'D', b"P\0");
    msg(out, b'E', b"\0\0\0\0\0");
    msg(out, b'S', b"");
}

/// What a pgbench -S -M prepared client sends for 100 transactions.
fn prepared_client_stream() -> BytesMut {
    let mut out = BytesMut::new();
    for aid in 0..100 {
        bind_execute_sync(&mut out, "P_0", 1 + aid * 9_973 % 1_000_000);
    }
    out
}

fn parse_frame(name: &str, sql: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.put_i16(0);
    Frame::new(b'P', &b)
}

/// What a pgbench -S -M extended client sends for 100 transactions.
fn extended_client_stream() -> BytesMut {
    let mut out = BytesMut::new();
    let parse = parse_frame("", SELECT_ONLY);
    for aid in 0..100 {
        out.put_slice(parse.raw());
        bind_execute_sync(&mut out, "", 1 + aid * 9_973 % 1_000_000);
    }
    out
}

/// What a pgbench -S -M simple client sends for 100 transactions.
fn simple_client_stream() -> BytesMut {
    let mut out = BytesMut::new();
    for aid in 0..100 {
        msg(
            &mut out,
            b'Q',
            format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};\0", 1 + aid * 9_973).as_bytes(),
        );
    }
    out
}

fn streams() -> Vec<(&'static str, BytesMut)> {
    vec![
        ("server_result_100_rows", result_set_100()),
        ("server_select_only_x100", select_only_simple_responses()),
        ("client_prepared_x100", prepared_client_stream()),
        ("client_extended_x100", extended_client_stream()),
        ("client_simple_x100", simple_client_stream()),
    ]
}

fn count_frames(stream: &BytesMut) -> u64 {
    let mut buf = stream.clone();
    let mut n = 0;
    while let Ok(Some(_)) = decode(&mut buf, LIMIT) {
        n += 1;
    }
    assert!(buf.is_empty(), "stream must hold whole frames only");
    n
}

/// Splitting every frame off a buffer holding the whole stream.
fn decoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, stream) in streams() {
        group.throughput(Throughput::Elements(count_frames(&stream)));
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || stream.clone(),
                |buf| {
                    while let Some(frame) = decode(buf, LIMIT).expect("valid stream") {
                        black_box(frame);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Decoding each frame and copying it into an output buffer, as the session
/// relays server frames to the client (`Client::queue`), then clearing the
/// output as a flush would.
fn relaying(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay");
    for (name, stream) in streams().into_iter().filter(|(n, _)| n.starts_with("server")) {
        group.throughput(Throughput::Elements(count_frames(&stream)));
        let mut out = BytesMut::with_capacity(64 * 1024);
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || stream.clone(),
                |buf| {
                    while let Some(frame) = decode(buf, LIMIT).expect("valid stream") {
                        if frame.tag() == b'Z' {
                            black_box(backend::ready_status(&frame).expect("valid status"));
                        }
                        out.extend_from_slice(frame.raw());
                    }
                    black_box(out.len());
                    out.clear();
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Building the frames pgnear writes itself.
fn encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    let row = accounts_data_row(42);
    group.bench_function("frame_new_data_row", |b| b.iter(|| Frame::new(b'D', black_box(&row))));
    group.bench_function("ready_for_query", |b| {
        b.iter(|| backend::ready_for_query(black_box(backend::TxStatus::Idle)))
    });
    group.bench_function("command_complete", |b| b.iter(|| backend::command_complete(black_box("SELECT 1"))));
    group.bench_function("parameter_status", |b| {
        b.iter(|| backend::parameter_status(black_box("pgnear.write_lsn"), black_box("0/3000148")))
    });
    group.bench_function("row_description_2", |b| {
        b.iter(|| backend::row_description(black_box(&["name", "setting"])))
    });
    group.bench_function("data_row_2", |b| b.iter(|| backend::data_row(black_box(&["route", "auto"]))));
    group.bench_function("error_response", |b| {
        b.iter(|| {
            backend::error_response(
                Severity::Error,
                SqlState::ConnectionFailure,
                black_box("connection to replica eu-replica was lost; the statement did not complete"),
            )
        })
    });
    group.finish();
}

/// Looking inside the client messages routing reads, and the server
/// messages the session reads.
fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1));
    let parse = parse_frame("P_0", SELECT_ONLY);
    let mut stream = BytesMut::new();
    bind_execute_sync(&mut stream, "P_0", 123_456);
    let bind = decode(&mut stream, LIMIT).expect("valid").expect("whole");
    let describe = decode(&mut stream, LIMIT).expect("valid").expect("whole");
    let execute = decode(&mut stream, LIMIT).expect("valid").expect("whole");
    let query = Frame::new(b'Q', b"SELECT abalance FROM pgbench_accounts WHERE aid = 123456;\0");
    let ready = backend::ready_for_query(backend::TxStatus::Idle);
    let error = Frame::new(
        b'E',
        b"SERROR\0VERROR\0C23505\0Mduplicate key value violates unique constraint \"pgbench_accounts_pkey\"\0\
          DKey (aid)=(1) already exists.\0spublic\0tpgbench_accounts\0npgbench_accounts_pkey\0Fnbtinsert.c\0\
          L664\0R_bt_check_unique\0\0",
    );
    group.bench_function("frontend_parse", |b| {
        b.iter(|| frontend::parse(black_box(&parse)).map(|p| p.query.len()))
    });
    group.bench_function("frontend_bind", |b| {
        b.iter(|| frontend::bind(black_box(&bind)).map(|p| p.statement.len()))
    });
    group.bench_function("frontend_target", |b| b.iter(|| frontend::target(black_box(&describe)).is_ok()));
    group.bench_function("frontend_execute_portal", |b| {
        b.iter(|| frontend::execute_portal(black_box(&execute)).map(str::len))
    });
    group.bench_function("frontend_query_text", |b| {
        b.iter(|| frontend::query_text(black_box(&query)).map(<[u8]>::len))
    });
    group.bench_function("backend_ready_status", |b| b.iter(|| backend::ready_status(black_box(&ready))));
    group.bench_function("backend_error_fields", |b| b.iter(|| ErrorFields::parse(black_box(&error))));
    group.finish();
}

criterion_group!(benches, decoding, relaying, encoding, parsing);
criterion_main!(benches);
