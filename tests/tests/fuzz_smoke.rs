//! The fuzz targets' properties (`weft_tests::fuzz`, the same code cargo-fuzz
//! runs) as a seconds-long smoke in `cargo test`: every seed in
//! fuzz/seeds/<target>/, then seeded random mutations of them (bit flips,
//! byte insert/delete/duplicate, splices of two inputs, truncation,
//! interesting integers and tokens). No coverage feedback and no sanitizers,
//! so it is no substitute for `bash fuzz/run.sh`; it keeps the properties
//! compiling, true on the seeds and on their near neighbours, on every run.
//!
//! Reproducible: the mutations come from a fixed RNG seed, so every run
//! tries the same inputs in the same order. Each target stops after its
//! input count or [`TIME_BUDGET`], whichever comes first; the time only
//! bounds how far along that sequence a slow machine gets, nothing waits on
//! it or asserts it. A violation fails the test with the panic message and
//! the input, hex-dumped and written to a file that `cargo fuzz run <target>
//! <file>` replays; copied into fuzz/seeds/<target>/, it is replayed by this
//! smoke on every run.
//!
//! `cargo test -p weft-tests --test fuzz_smoke -- --nocapture` shows how many
//! inputs each target ran.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The RNG seed for the mutations ("WEFT").
const SEED: u64 = 0x5745_4654;
/// Wall time per target, whatever its input count: the targets run as
/// parallel tests on a shared machine, and the smoke should stay within
/// seconds. The counts below take about a second each on a 2-core machine
/// (debug build), so the count, not the clock, normally ends a run.
const TIME_BUDGET: Duration = Duration::from_millis(2500);
/// The longest input tried, as `-max_len` in fuzz/run.sh.
const MAX_LEN: usize = 8192;
/// Inputs the property accepted (past the parser) join the pool mutants are
/// made from, up to this many besides the seeds: a crude stand-in for
/// coverage feedback that lets mutations stack up on inputs that still parse.
const POOL_EXTRA: usize = 512;

#[test]
fn preamble() {
    smoke("preamble", 500_000);
}

#[test]
fn mesh_file() {
    smoke("mesh_file", 100_000);
}

#[test]
fn spiffe_id() {
    smoke("spiffe_id", 500_000);
}

#[test]
fn ca_csr() {
    smoke("ca_csr", 50_000);
}

/// Run `target`'s property over its seeds and their mutants; panic on a
/// violation, or if no seed gets past the parser (the round-trip checks
/// would then see next to nothing).
fn smoke(target: &str, max_inputs: usize) {
    let (_, property) = weft_tests::fuzz::TARGETS
        .into_iter()
        .find(|(name, _)| *name == target)
        .expect("a target in weft_tests::fuzz::TARGETS");
    let seeds = seeds(target);
    let budget = Budget {
        inputs: max_inputs,
        time: TIME_BUDGET,
    };
    let save_dir = std::env::temp_dir().join("weft-fuzz-smoke");
    let stats = run(target, &seeds, property, budget, SEED, &save_dir)
        .unwrap_or_else(|failure| panic!("{failure}"));
    println!(
        "fuzz smoke {target}: {} inputs ({} seeds, {} mutants) in {:.2?}; {} got past the parser",
        stats.executed,
        seeds.len(),
        stats.executed - seeds.len(),
        stats.elapsed,
        stats.accepted,
    );
    assert!(
        stats.seeds_accepted > 0,
        "no seed in fuzz/seeds/{target} gets past the parser any more; \
         the mutants would hardly reach the property's checks"
    );
}

/// The files of fuzz/seeds/<target>/, by name (read_dir's order is the
/// file system's, and the mutation sequence depends on the seeds' order).
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = weft_tests::repo_root().join("fuzz/seeds").join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("seed directory entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

// ---------------------------------------------------------------------------
// The driver and the mutator.

#[derive(Clone, Copy)]
struct Budget {
    inputs: usize,
    time: Duration,
}

#[derive(Debug)]
struct Stats {
    executed: usize,
    accepted: usize,
    seeds_accepted: usize,
    elapsed: Duration,
}

/// A property violation: the input, where it came from, and the panic.
#[derive(Debug)]
struct Failure {
    target: String,
    origin: String,
    input: Vec<u8>,
    message: String,
    saved: Result<PathBuf, String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fuzz smoke {}: property violated by {} ({} bytes): {}",
            self.target,
            self.origin,
            self.input.len(),
            self.message
        )?;
        match &self.saved {
            Ok(path) => writeln!(
                f,
                "input saved to {p}\nreplay: cd fuzz && cargo fuzz run {t} {p}\n\
                 (copied into fuzz/seeds/{t}/ it becomes a seed this smoke replays)",
                p = path.display(),
                t = self.target
            )?,
            Err(e) => writeln!(f, "input not saved: {e}")?,
        }
        f.write_str(&hex_dump(&self.input, 2048))
    }
}

/// Run `property` on every seed, then on mutants until `budget` runs out.
/// Stops at the first panic and returns it with its input, which is also
/// written to `save_dir`.
fn run(
    target: &str,
    seeds: &[(String, Vec<u8>)],
    mut property: impl FnMut(&[u8]) -> bool,
    budget: Budget,
    rng_seed: u64,
    save_dir: &Path,
) -> Result<Stats, Box<Failure>> {
    let start = Instant::now();
    let mut seeds_accepted = 0;
    let mut pool: Vec<Vec<u8>> = Vec::new();
    for (name, seed) in seeds {
        let origin = || format!("seed fuzz/seeds/{target}/{name}");
        if check(target, &mut property, seed, origin, save_dir)? {
            seeds_accepted += 1;
        }
        pool.push(seed.clone());
    }
    let mut accepted = seeds_accepted;
    let mut rng = StdRng::seed_from_u64(rng_seed);
    let mut input = Vec::new();
    let mut n = seeds.len();
    while n < budget.inputs && start.elapsed() < budget.time {
        mutate(&mut rng, &pool, &mut input);
        let origin = || format!("input #{n}, a mutant of the seeds (RNG seed {rng_seed:#x})");
        if check(target, &mut property, &input, origin, save_dir)? {
            accepted += 1;
            if pool.len() < seeds.len() + POOL_EXTRA {
                pool.push(input.clone());
            } else {
                let i = rng.random_range(seeds.len()..pool.len());
                pool[i].clone_from(&input);
            }
        }
        n += 1;
    }
    Ok(Stats {
        executed: n,
        accepted,
        seeds_accepted,
        elapsed: start.elapsed(),
    })
}

/// One input: whether the property accepted it, or the panic it caused.
fn check(
    target: &str,
    property: &mut impl FnMut(&[u8]) -> bool,
    input: &[u8],
    origin: impl FnOnce() -> String,
    save_dir: &Path,
) -> Result<bool, Box<Failure>> {
    panic::catch_unwind(AssertUnwindSafe(|| property(input))).map_err(|payload| {
        Box::new(Failure {
            target: target.to_string(),
            origin: origin(),
            input: input.to_vec(),
            message: panic_message(payload.as_ref()),
            saved: save(save_dir, target, input),
        })
    })
}

/// Replace `out` with a mutant of a random pool entry: one to four stacked
/// mutations, at most [`MAX_LEN`] bytes.
fn mutate(rng: &mut StdRng, pool: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clone_from(&pool[rng.random_range(0..pool.len())]);
    for _ in 0..rng.random_range(1..=4) {
        mutate_once(rng, pool, out);
    }
    out.truncate(MAX_LEN);
}

/// Integers that sit on boundaries: lengths, signs, varint and DER forms.
const INTERESTING: [u64; 14] = [
    0,
    1,
    0x3f,
    0x40,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x3fff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

/// Byte strings that mean something to the text parsers (TOML, SPIFFE IDs,
/// PEM) or to UTF-8.
const TOKENS: [&[u8]; 24] = [
    b"\n",
    b"\r\n",
    b"\"",
    b"'''",
    b"[",
    b"[[",
    b"]",
    b"=",
    b",",
    b".",
    b"/",
    b"//",
    b":",
    b"%2F",
    b"#",
    b"\\u",
    b"..",
    b"-1",
    b"65536",
    b"spiffe://",
    b"-----",
    b"\x00",
    b"\xc3\xa9",
    b"\xf0\x9f\x98",
];

fn mutate_once(rng: &mut StdRng, pool: &[Vec<u8>], data: &mut Vec<u8>) {
    let len = data.len();
    match rng.random_range(0..9) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] ^= 1 << rng.random_range(0..8);
        }
        // Replace one byte.
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = rng.random();
        }
        // Insert one to four random bytes.
        2 => {
            let at = rng.random_range(0..=len);
            let n = rng.random_range(1..=4);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(at..at, bytes);
        }
        // Delete a range.
        3 if len > 0 => {
            let (start, n) = range(rng, len);
            data.drain(start..start + n);
        }
        // Duplicate a range: insert a copy elsewhere, or copy over.
        4 if len > 0 => {
            let (start, n) = range(rng, len);
            let part = data[start..start + n].to_vec();
            let at = rng.random_range(0..=len);
            if rng.random_bool(0.5) {
                data.splice(at..at, part);
            } else {
                let end = (at + n).min(len);
                data.splice(at..end, part);
            }
        }
        // Splice with another pool entry: this one's head and its tail, or
        // a range of it inserted here.
        5 => {
            let other = &pool[rng.random_range(0..pool.len())];
            if other.is_empty() {
                return;
            }
            if rng.random_bool(0.5) {
                let head = rng.random_range(0..=len);
                let tail = rng.random_range(0..other.len());
                data.truncate(head);
                data.extend_from_slice(&other[tail..]);
            } else {
                let (start, n) = range(rng, other.len());
                let at = rng.random_range(0..=len);
                data.splice(at..at, other[start..start + n].iter().copied());
            }
        }
        // Truncate.
        6 if len > 0 => data.truncate(rng.random_range(0..len)),
        // An interesting integer, 1, 2, 4 or 8 bytes, either byte order,
        // written over the input or inserted.
        7 => {
            let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
            let width = 1 << rng.random_range(0..4);
            let bytes = if rng.random_bool(0.5) {
                value.to_be_bytes()[8 - width..].to_vec()
            } else {
                value.to_le_bytes()[..width].to_vec()
            };
            put(rng, data, &bytes);
        }
        // A token, written over the input or inserted.
        8 => {
            let token = TOKENS[rng.random_range(0..TOKENS.len())];
            put(rng, data, token);
        }
        // A byte mutation drawn on an empty input: grow it instead.
        _ => data.push(rng.random()),
    }
}

/// A random non-empty range of `0..len` (`len > 0`) as (start, length),
/// short more often than long.
fn range(rng: &mut StdRng, len: usize) -> (usize, usize) {
    let start = rng.random_range(0..len);
    let rest = len - start;
    let max = if rng.random_bool(0.75) {
        rest.min(8)
    } else {
        rest
    };
    (start, rng.random_range(1..=max))
}

/// Write `bytes` at a random place in `data`, over what is there or inserted.
fn put(rng: &mut StdRng, data: &mut Vec<u8>, bytes: &[u8]) {
    let at = rng.random_range(0..=data.len());
    let end = if rng.random_bool(0.5) {
        (at + bytes.len()).min(data.len())
    } else {
        at
    };
    data.splice(at..end, bytes.iter().copied());
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

/// Write `input` to `dir`, named after the target and a hash of the bytes.
fn save(dir: &Path, target: &str, input: &[u8]) -> Result<PathBuf, String> {
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{hash:016x}"));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, input))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// `xxd`-style lines, 16 bytes each, at most `limit` bytes of `data`.
fn hex_dump(data: &[u8], limit: usize) -> String {
    let mut out = String::new();
    for (i, line) in data[..data.len().min(limit)].chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:08x}: {:<47}  {text}\n", i * 16, hex.join(" ")));
    }
    if data.len() > limit {
        out.push_str(&format!(
            "… {} more bytes in the file\n",
            data.len() - limit
        ));
    }
    out
}

// ---------------------------------------------------------------------------
// The driver itself: it must find and report what a broken property does.

/// Generous, so these checks never depend on the machine's speed: they stop
/// on the first failure or at the input count.
const NO_TIME_LIMIT: Budget = Budget {
    inputs: 200_000,
    time: Duration::from_secs(3600),
};

fn named(seeds: &[&[u8]]) -> Vec<(String, Vec<u8>)> {
    seeds
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("s{i}"), s.to_vec()))
        .collect()
}

#[test]
fn a_violation_is_reported_with_its_input_saved_and_dumped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seeds = named(&[b"hello, world", b"\x01\x02\x03"]);
    let failure = run(
        "broken",
        &seeds,
        |data| {
            assert!(!data.contains(&0xab), "found 0xab");
            true
        },
        NO_TIME_LIMIT,
        SEED,
        dir.path(),
    )
    .expect_err("the smoke must find an input with a 0xab byte");
    assert!(failure.input.contains(&0xab));
    assert_eq!(failure.message, "found 0xab");
    assert!(failure.origin.contains("mutant"), "{}", failure.origin);
    let saved = failure.saved.as_ref().expect("saved");
    assert!(saved.starts_with(dir.path()));
    assert_eq!(
        std::fs::read(saved).expect("read saved input"),
        failure.input
    );
    let report = failure.to_string();
    assert!(report.contains("found 0xab"), "{report}");
    assert!(report.contains(" ab"), "no hex dump in:\n{report}");
    assert!(report.contains("cargo fuzz run broken"), "{report}");
}

#[test]
fn a_failing_seed_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seeds = named(&[b"fine", b"bad"]);
    let failure = run(
        "broken",
        &seeds,
        |data| {
            assert_ne!(data, b"bad");
            true
        },
        NO_TIME_LIMIT,
        SEED,
        dir.path(),
    )
    .expect_err("the second seed fails");
    assert_eq!(failure.input, b"bad");
    assert_eq!(failure.origin, "seed fuzz/seeds/broken/s1");
}

/// The bug libFuzzer found first (commit 77b6280): the spiffe_id target
/// expected `parse_in` to accept every parsed ID in its own trust domain,
/// but an ID without a path (`spiffe://examplepayment`) is valid and is not
/// a workload ID. From the seeds of that time (none without a path), the
/// smoke must find such an input too.
#[test]
fn the_first_spiffe_id_bug_is_found_again() {
    use weft_transport::spiffe::SpiffeId;
    let dir = tempfile::tempdir().expect("tempdir");
    let seeds: Vec<_> = seeds("spiffe_id")
        .into_iter()
        .filter(|(name, _)| name != "no-path")
        .collect();
    assert!(!seeds.is_empty());
    let failure = run(
        "spiffe_id",
        &seeds,
        |data| {
            let Ok(text) = std::str::from_utf8(data) else {
                return false;
            };
            let Ok(id) = SpiffeId::parse(text) else {
                return false;
            };
            assert!(SpiffeId::parse_in(text, id.trust_domain()).is_ok());
            true
        },
        NO_TIME_LIMIT,
        SEED,
        dir.path(),
    )
    .expect_err("the old spiffe_id property fails on an ID without a path");
    let text = std::str::from_utf8(&failure.input).expect("UTF-8");
    assert!(SpiffeId::parse(text).expect("valid").path().is_empty());
}

#[test]
fn runs_are_reproducible_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seeds = named(&[b"0123456789abcdef", b"[x]\ny = 1\n"]);
    let record = |rng_seed: u64, budget: Budget| {
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let stats = run(
            "record",
            &seeds,
            |data| {
                seen.push(data.to_vec());
                data.len() % 2 == 0
            },
            budget,
            rng_seed,
            dir.path(),
        )
        .expect("no property to violate");
        (stats, seen)
    };
    let budget = Budget {
        inputs: 5_000,
        ..NO_TIME_LIMIT
    };
    let (stats, first) = record(SEED, budget);
    assert_eq!(stats.executed, 5_000);
    assert_eq!(first.len(), 5_000);
    assert_eq!(record(SEED, budget).1, first, "same RNG seed, same inputs");
    assert_ne!(record(SEED + 1, budget).1, first);

    // The mutants grow, shrink and stay within MAX_LEN.
    let shortest = seeds.iter().map(|(_, s)| s.len()).min().expect("seeds");
    let longest = seeds.iter().map(|(_, s)| s.len()).max().expect("seeds");
    assert!(first.iter().any(|i| i.is_empty()));
    assert!(first.iter().any(|i| i.len() < shortest));
    assert!(first.iter().any(|i| i.len() > 4 * longest));
    assert!(first.iter().all(|i| i.len() <= MAX_LEN));

    // However little time there is, every seed runs.
    let none = Budget {
        inputs: 5_000,
        time: Duration::ZERO,
    };
    let (stats, seen) = record(SEED, none);
    assert_eq!(stats.executed, seeds.len());
    assert_eq!(seen.len(), seeds.len());
}
