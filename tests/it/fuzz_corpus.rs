//! The fuzz targets on stable Rust: every committed seed in
//! `fuzz/corpus/<target>/` goes through the same checks as
//! `cargo +nightly fuzz run <target>` (shared in `fuzz/checks.rs`), then
//! 20,000 inputs per target mutated from those seeds with a fixed seed, so
//! a failure reproduces. No input may panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../../fuzz/checks.rs"]
mod checks;

const MUTATED_PER_TARGET: usize = 20_000;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 3] = [
    ("frame_decode", checks::frame_decode),
    ("startup_parse", checks::startup_parse),
    ("classify", checks::classify),
];

/// The committed seeds of one target, in name order.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| !path.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files.into_iter().map(|path| (path.display().to_string(), std::fs::read(&path).unwrap())).collect()
}

/// Runs `check`, naming the input if it panics.
fn run(check: Check, target: &str, what: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        panic!("{target} panicked on {what}: {input:02x?}");
    }
}

#[test]
fn every_corpus_seed_passes_its_target() {
    for (target, check) in TARGETS {
        let seeds = corpus(target);
        assert!(seeds.len() >= 5, "{target} has only {} seeds", seeds.len());
        for (name, input) in &seeds {
            run(check, target, name, input);
        }
    }
}

#[test]
fn mutated_frames_never_panic() {
    mutate_and_check(0, 0xf4a3e)
}

#[test]
fn mutated_startup_packets_never_panic() {
    mutate_and_check(1, 0x57a47)
}

#[test]
fn mutated_sql_never_panics() {
    mutate_and_check(2, 0x5e1ec7)
}

fn mutate_and_check(index: usize, seed: u64) {
    let (target, check) = TARGETS[index];
    let seeds: Vec<Vec<u8>> = corpus(target).into_iter().map(|(_, input)| input).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..MUTATED_PER_TARGET {
        let input = mutate(&mut rng, &seeds, target == "classify");
        run(check, target, &format!("mutation {i} (seed {seed:#x})"), &input);
    }
}

/// Words that make mutated SQL reach deeper into the parser.
const SQL_WORDS: &[&str] = &[
    "SELECT ",
    "(",
    ")",
    ";",
    ",",
    " UNION ",
    " FOR UPDATE",
    "$$",
    "'",
    "\"",
    "/*",
    "*/",
    "--",
    "\n",
    "WITH ",
    "AS ",
    "nextval('s')",
    "INSERT INTO t ",
    "VALUES ",
    " WHERE ",
    "BEGIN ",
    "READ ONLY",
    "SET ",
    "pgnear.",
    "/* pgnear:replica */",
    "$1",
    "::",
    "E'\\\\",
    "COPY ",
    "EXPLAIN ANALYZE ",
    "LISTEN x",
    "ARRAY[",
    "]",
];

/// Boundary values for length and code fields.
const INTERESTING: &[i32] =
    &[0, -1, 1, 4, 5, 8, 16, 127, 128, 255, 10_000, 65_536, i32::MAX, i32::MIN, 196_608];

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>], sql: bool) -> Vec<u8> {
    if rng.random_ratio(1, 10) {
        let len = rng.random_range(0..64);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut data = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=data.len());
        match rng.random_range(0..8) {
            0 if !data.is_empty() => {
                let i = rng.random_range(0..data.len());
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 => data.insert(at, rng.random()),
            2 if at < data.len() => {
                let end = rng.random_range(at..=data.len());
                data.drain(at..end);
            }
            3 => data.truncate(at),
            4 if at + 4 <= data.len() => {
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                data[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            5 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let from = rng.random_range(0..=other.len());
                data.splice(at..at, other[from..].iter().copied());
            }
            6 if sql => {
                let word = SQL_WORDS[rng.random_range(0..SQL_WORDS.len())];
                data.splice(at..at, word.bytes());
            }
            _ if at < data.len() => {
                let end = rng.random_range(at..=data.len());
                let copy = data[at..end].to_vec();
                data.splice(at..at, copy);
            }
            _ => {}
        }
    }
    data
}
