// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! AtomicHBitmap against vm-memory's AtomicBitmap, in one run, on a 1 TiB guest of 4 KiB pages
//! (2^28 pages): a migration pass at 0%, 0.01%, 10% and 100% of the pages dirty (uniformly
//! random pages), which for AtomicHBitmap is `harvest()` and for AtomicBitmap `get_and_reset()`
//! plus a walk of its words into the same runs; `get_and_reset` itself; marks of one page (one
//! hot page, random pages) and of 1 MiB; a 12 TiB guest with nothing dirty; memory. At the end it
//! prints each pair's median times and their ratio.
//!
//! Two threads marking random pages are timed apart from criterion, in rounds that alternate the
//! two bitmaps (see [`alternating`]): criterion times one side after the other, seconds apart,
//! and on a shared machine the load then differs between the two, which for this workload (two
//! threads on a 2-core machine) moved the ratio by more than the difference being measured.
//! `mark_two_threads_random` marks pages already marked (every summary bit found set),
//! `mark_two_threads_after_pass` marks a clean bitmap (the marks set the summary).
//!
//! `cargo bench -p atomic-hbitmap --bench harvest` (a filter, e.g. `-- mark_two`, selects groups
//! and the two-thread rows by name)

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use atomic_hbitmap::AtomicHBitmap;
use criterion::{BatchSize, Criterion, SamplingMode};
use vm_memory::bitmap::AtomicBitmap;

const PAGE: usize = 4096;
const GUEST: usize = 1 << 40;
const PAGES: usize = GUEST / PAGE;

fn page_size() -> NonZeroUsize {
    NonZeroUsize::new(PAGE).unwrap()
}

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (((z ^ (z >> 31)) as u128 * n as u128) >> 64) as usize
    }
}

fn random_pages(seed: u64, count: usize) -> Vec<usize> {
    let mut rng = Rng(seed);
    (0..count).map(|_| rng.below(PAGES)).collect()
}

/// The walk a VMM does over `get_and_reset`'s words: the dirty pages as runs, here counted
/// (runs, pages) as the harvest's are.
fn walk_words(words: &[u64]) -> (usize, usize) {
    let (mut runs, mut pages, mut run_end) = (0, 0, usize::MAX);
    for (index, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let offset = bits.trailing_zeros() as usize;
            let ones = (!(bits >> offset)).trailing_zeros() as usize;
            bits = if offset + ones == 64 {
                0
            } else {
                bits & (u64::MAX << (offset + ones))
            };
            let start = index * 64 + offset;
            if start != run_end {
                runs += 1;
            }
            run_end = start + ones;
            pages += ones;
        }
    }
    (runs, pages)
}

fn consume_harvest(bitmap: &AtomicHBitmap) -> (usize, usize) {
    let (mut runs, mut pages) = (0, 0);
    for run in bitmap.harvest() {
        runs += 1;
        pages += run.len();
    }
    (runs, pages)
}

/// The two bitmaps with the same pages dirty: `permille_hundredths` in 1/10000 of the pages.
fn templates(hundredths_of_percent: usize) -> (AtomicBitmap, AtomicHBitmap) {
    let theirs = AtomicBitmap::new(GUEST, page_size());
    let ours = AtomicHBitmap::new(GUEST, page_size());
    if hundredths_of_percent == 10_000 {
        theirs.set_addr_range(0, GUEST);
        ours.set_addr_range(0, GUEST);
    } else {
        for page in random_pages(7, PAGES / 10_000 * hundredths_of_percent) {
            theirs.set_bit(page);
            ours.set_bit(page);
        }
    }
    (theirs, ours)
}

fn flat<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sampling_mode(SamplingMode::Flat);
    group
}

fn passes(c: &mut Criterion) {
    for (label, hundredths) in [
        ("0pct", 0),
        ("0.01pct", 1),
        ("10pct", 1000),
        ("100pct", 10_000),
    ] {
        let (theirs, ours) = templates(hundredths);
        let expected = walk_words(&theirs.clone().get_and_reset());
        assert_eq!(consume_harvest(&ours.clone()), expected);
        let mut group = flat(c, &format!("pass_{label}"));
        group.bench_function("AtomicBitmap", |b| {
            b.iter_batched(
                || theirs.clone(),
                |bitmap| {
                    black_box(walk_words(&bitmap.get_and_reset()));
                    bitmap
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function("AtomicHBitmap", |b| {
            b.iter_batched(
                || ours.clone(),
                |bitmap| {
                    black_box(consume_harvest(&bitmap));
                    bitmap
                },
                BatchSize::PerIteration,
            )
        });
        group.finish();
        if label == "0.01pct" || label == "100pct" {
            let mut group = flat(c, &format!("get_and_reset_{label}"));
            group.bench_function("AtomicBitmap", |b| {
                b.iter_batched(
                    || theirs.clone(),
                    |bitmap| (black_box(bitmap.get_and_reset()), bitmap),
                    BatchSize::PerIteration,
                )
            });
            group.bench_function("AtomicHBitmap", |b| {
                b.iter_batched(
                    || ours.clone(),
                    |bitmap| (black_box(bitmap.get_and_reset()), bitmap),
                    BatchSize::PerIteration,
                )
            });
            group.finish();
        }
    }
    let huge = AtomicHBitmap::new(12 << 40, page_size());
    let mut group = c.benchmark_group("pass_12TiB_clean");
    group.bench_function("AtomicHBitmap", |b| b.iter(|| consume_harvest(&huge)));
    group.finish();
}

/// Marks: the same call on both, cycling through precomputed addresses.
fn marks(c: &mut Criterion) {
    let theirs = AtomicBitmap::new(GUEST, page_size());
    let ours = AtomicHBitmap::new(GUEST, page_size());
    let random: Vec<usize> = random_pages(11, 1 << 20)
        .into_iter()
        .map(|p| p * PAGE)
        .collect();
    let cases: [(&str, usize, bool); 3] = [
        ("mark_page_hot", PAGE, false),
        ("mark_page_random", PAGE, true),
        ("mark_1MiB_random", 1 << 20, true),
    ];
    for (name, len, spread) in cases {
        let mut group = c.benchmark_group(name);
        let mut i = 0;
        group.bench_function("AtomicBitmap", |b| {
            b.iter(|| {
                i = (i + 1) & ((1 << 20) - 1);
                let addr = if spread { random[i] } else { 5 << 30 };
                theirs.set_addr_range(black_box(addr), len)
            })
        });
        group.bench_function("AtomicHBitmap", |b| {
            b.iter(|| {
                i = (i + 1) & ((1 << 20) - 1);
                let addr = if spread { random[i] } else { 5 << 30 };
                ours.set_addr_range(black_box(addr), len)
            })
        });
        group.finish();
    }
}

/// The time the calling thread has run on a CPU, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_ns() -> u64 {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

/// Two threads marking random pages of one bitmap, 2^18 pages each (the same two page lists on
/// both sides): the wall time for both (thread start included), and the CPU time of the two
/// threads summed (the marks only), which time spent waiting for a CPU does not inflate.
fn two_threads(lists: &[Vec<usize>; 2], mark: &(impl Fn(usize) + Sync)) -> (f64, f64) {
    let cpu = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for list in lists {
            let cpu = &cpu;
            s.spawn(move || {
                let before = thread_cpu_ns();
                list.iter().for_each(|&p| mark(p));
                cpu.fetch_add(thread_cpu_ns() - before, Ordering::Relaxed);
            });
        }
    });
    let wall = start.elapsed().as_secs_f64() * 1e9;
    (wall, cpu.into_inner() as f64)
}

/// Rounds of the two-thread marks, and what the report prints of them.
const ROUNDS: usize = 41;

/// Medians over [`ROUNDS`] rounds of AtomicBitmap's time, AtomicHBitmap's, and the per-round
/// ratios (theirs / ours): wall time, and CPU time.
struct Alternating {
    wall: [f64; 3],
    cpu: [f64; 3],
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn medians(pairs: &[(f64, f64)]) -> [f64; 3] {
    let mut theirs: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let mut ours: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let mut ratios: Vec<f64> = pairs.iter().map(|p| p.0 / p.1).collect();
    [median(&mut theirs), median(&mut ours), median(&mut ratios)]
}

/// The two-thread marks, timed outside criterion so that both sides share the same moments of
/// this shared machine: each round times both bitmaps one after the other (which one first
/// alternates), so a change of load hits both. `after_pass`: each round starts on clean bitmaps
/// (an untimed `reset` of both, as after a migration pass), so that the marks set the summary;
/// otherwise the pages are those of the previous rounds and every mark finds its summary bits
/// set. Both bitmaps are created before (AtomicBitmap's written, ours zeroed by the allocator)
/// and go through two untimed rounds first, so every page of both is faulted in.
fn alternating(after_pass: bool) -> Alternating {
    let theirs = AtomicBitmap::new(GUEST, page_size());
    let ours = AtomicHBitmap::new(GUEST, page_size());
    let lists = [random_pages(21, 1 << 18), random_pages(22, 1 << 18)];
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS + 2 {
        if after_pass {
            theirs.reset();
            ours.reset();
        }
        let time_theirs = || two_threads(&lists, &|p| theirs.set_bit(p));
        let time_ours = || two_threads(&lists, &|p| ours.set_bit(p));
        let (a, b) = if round % 2 == 0 {
            let a = time_theirs();
            (a, time_ours())
        } else {
            let b = time_ours();
            (time_theirs(), b)
        };
        if round >= 2 {
            wall.push((a.0, b.0));
            cpu.push((a.1, b.1));
        }
    }
    assert_eq!(
        walk_words(&theirs.get_and_reset()),
        consume_harvest(&ours),
        "both bitmaps hold the same pages"
    );
    Alternating {
        wall: medians(&wall),
        cpu: medians(&cpu),
    }
}

/// Whether the command line's filter (criterion's positional argument), if any, selects `name`.
fn selected(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .all(|filter| name.contains(&filter))
}

fn output_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion-atomic-hbitmap")
}

fn median_ns(group: &str, function: &str) -> Option<f64> {
    let path = output_dir()
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn human(ns: f64) -> String {
    match ns {
        ns if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.2} µs", ns / 1e3),
        ns => format!("{ns:.2} ns"),
    }
}

fn report(two_threads: &[(&str, Alternating)]) {
    println!(
        "\n{:<26} {:>14} {:>14} {:>10}",
        "workload (1 TiB, 4 KiB)", "AtomicBitmap", "AtomicHBitmap", "speedup"
    );
    let groups = [
        "pass_0pct",
        "pass_0.01pct",
        "pass_10pct",
        "pass_100pct",
        "get_and_reset_0.01pct",
        "get_and_reset_100pct",
        "mark_page_hot",
        "mark_page_random",
        "mark_1MiB_random",
    ];
    for group in groups {
        if let (Some(theirs), Some(ours)) = (
            median_ns(group, "AtomicBitmap"),
            median_ns(group, "AtomicHBitmap"),
        ) {
            println!(
                "{group:<26} {:>14} {:>14} {:>9.2}x",
                human(theirs),
                human(ours),
                theirs / ours
            );
        }
    }
    for (name, times) in two_threads {
        let [theirs, ours, ratio] = times.wall;
        println!(
            "{name:<26} {:>14} {:>14} {ratio:>9.2}x (wall, median of {ROUNDS} alternating rounds)",
            human(theirs),
            human(ours),
        );
        let [theirs, ours, ratio] = times.cpu;
        println!(
            "{:<26} {:>14} {:>14} {ratio:>9.2}x (CPU time of both threads, same rounds)",
            "",
            human(theirs),
            human(ours),
        );
    }
    if let Some(ours) = median_ns("pass_12TiB_clean", "AtomicHBitmap") {
        println!("{:<26} {:>14} {:>14}", "pass_12TiB_clean", "-", human(ours));
    }
    let theirs = AtomicBitmap::new(GUEST, page_size()).get_and_reset().len() * 8;
    let ours = AtomicHBitmap::new(GUEST, page_size()).heap_bytes();
    println!(
        "{:<26} {:>11} KiB {:>10} KiB {:>9.4}x (AtomicHBitmap / AtomicBitmap)",
        "memory",
        theirs >> 10,
        ours >> 10,
        ours as f64 / theirs as f64
    );
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    passes(&mut c);
    marks(&mut c);
    c.final_summary();
    let two_threads: Vec<_> = [
        ("mark_two_threads_random", false),
        ("mark_two_threads_after_pass", true),
    ]
    .into_iter()
    .filter(|&(name, _)| selected(name))
    .map(|(name, after_pass)| (name, alternating(after_pass)))
    .collect();
    report(&two_threads);
}
