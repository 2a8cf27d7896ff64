// SPDX-License-Identifier: GPL-2.0-or-later

//! The engine of the differential tests (against the original C, `tests/differential.rs`, and
//! against QEMU 10's, `tests/differential_qemu10.rs`): each test describes its subject (the same
//! bitmaps in two implementations, the operations on them, how to generate one) as a
//! [`Subject`]; this module runs scenarios of random operations, ends each with the subject's
//! full comparisons, minimizes a failing sequence by delta debugging and reports it with the
//! environment variables that reproduce it, runs seeds on threads and prints the statistics.
//!
//! Environment: `HBITMAP_DIFF_OPS` (operations over all seeds), `HBITMAP_DIFF_SEED`
//! (comma-separated seeds, decimal or 0x hex), `HBITMAP_DIFF_SCENARIO` (only that scenario of
//! each seed, whole).

use std::fmt::Debug;
use std::ops::AddAssign;
use std::time::Instant;

use crate::Rng;

/// One scenario's bitmaps in both implementations, and what can be done to them.
pub trait Subject: Sized {
    /// What a scenario's bitmaps are created with.
    type Geometry: Debug;
    /// One operation, applied to both implementations.
    type Op: Clone + Debug;

    fn new(geometry: &Self::Geometry) -> Self;
    /// Whether `op` may run in the current state (both implementations accept it).
    fn valid(&self, op: &Self::Op) -> bool;
    /// Runs `op` on both and compares what they return and leave: the first difference.
    fn apply(&mut self, op: &Self::Op) -> Result<(), String>;
    /// A random operation valid in the current state.
    fn generate(&self, rng: &mut Rng) -> Self::Op;
    /// The operations that end a scenario: full comparisons of every bitmap.
    fn final_checks(&self, rng: &mut Rng) -> Vec<Self::Op>;
    /// Results compared so far.
    fn calls(&self) -> u64;
}

/// What ran.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub ops: u64,
    pub calls: u64,
    pub scenarios: u64,
}

impl AddAssign for Stats {
    fn add_assign(&mut self, other: Stats) {
        self.ops += other.ops;
        self.calls += other.calls;
        self.scenarios += other.scenarios;
    }
}

/// The first mismatch of a replay: the index of the operation and the difference.
pub struct Failure {
    pub index: usize,
    pub message: String,
}

/// Runs `ops` on a fresh subject, skipping those not valid there: the first mismatch.
pub fn replay<S: Subject>(geometry: &S::Geometry, ops: &[S::Op]) -> Result<(), Failure> {
    let mut subject = S::new(geometry);
    for (index, op) in ops.iter().enumerate() {
        if subject.valid(op) {
            subject
                .apply(op)
                .map_err(|message| Failure { index, message })?;
        }
    }
    Ok(())
}

/// Delta debugging over the operations: a shorter sequence that still mismatches.
pub fn minimize<S: Subject>(geometry: &S::Geometry, ops: Vec<S::Op>) -> Vec<S::Op> {
    let mut ops = ops;
    let mut parts = 2usize;
    let mut budget = 3000;
    while ops.len() >= 2 && budget > 0 {
        let chunk = ops.len().div_ceil(parts);
        // The first chunk whose removal still fails, as the failing prefix without it.
        let shorter = (0..parts).find_map(|index| {
            let (from, to) = (index * chunk, ((index + 1) * chunk).min(ops.len()));
            if from >= to || budget == 0 {
                return None;
            }
            budget -= 1;
            let candidate: Vec<S::Op> = ops[..from].iter().chain(&ops[to..]).cloned().collect();
            let failure = replay::<S>(geometry, &candidate).err()?;
            Some(candidate[..=failure.index].to_vec())
        });
        match shorter {
            Some(shorter) => {
                ops = shorter;
                parts = (parts - 1).max(2);
            }
            None if parts >= ops.len() => break,
            None => parts = (parts * 2).min(ops.len()),
        }
    }
    ops
}

/// Runs `budget` random operations on a fresh subject of `geometry`, then its final
/// comparisons; on a mismatch, a report with a minimized reproduction.
pub fn run_ops<S: Subject>(
    label: &str,
    geometry: &S::Geometry,
    rng: &mut Rng,
    budget: u64,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut subject = S::new(geometry);
    let mut ops = Vec::new();
    let mut failed = None;
    for _ in 0..budget {
        let op = subject.generate(rng);
        ops.push(op.clone());
        if let Err(message) = subject.apply(&op) {
            failed = Some((ops.len() - 1, op, message));
            break;
        }
        stats.ops += 1;
    }
    if failed.is_none() {
        for op in subject.final_checks(rng) {
            ops.push(op.clone());
            if let Err(message) = subject.apply(&op) {
                failed = Some((ops.len() - 1, op, message));
                break;
            }
        }
    }
    stats.calls += subject.calls();
    stats.scenarios += 1;
    drop(subject);
    let Some((index, op, message)) = failed else {
        return Ok(());
    };
    let minimized = minimize::<S>(geometry, ops);
    let again = match replay::<S>(geometry, &minimized) {
        Err(failure) => failure.message,
        Ok(()) => "(the minimized sequence no longer fails)".into(),
    };
    Err(format!(
        "MISMATCH: {label}, op {index}: {op:?}\n  {message}\n\
         geometry: {geometry:?}\n\
         minimized to {} operations:\n{}\n  -> {again}",
        minimized.len(),
        minimized
            .iter()
            .map(|op| format!("    {op:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    ))
}

/// A number from the environment, decimal or 0x hex; a malformed one fails the test.
pub fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(parse_u64(name, text.trim()))
}

fn parse_u64(name: &str, text: &str) -> u64 {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .unwrap_or_else(|_| panic!("{name}: {text} is not a number"))
}

/// `HBITMAP_DIFF_SEED`'s seeds, or `defaults`.
pub fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("HBITMAP_DIFF_SEED") {
        Ok(list) => list
            .split(',')
            .map(|seed| parse_u64("HBITMAP_DIFF_SEED", seed.trim()))
            .collect(),
        Err(_) => defaults.to_vec(),
    }
}

/// Scenario `index` of `seed`: its geometry, its number of operations and the generator that
/// continues with them. Deterministic, so that a failure reproduces from the two numbers.
pub type Scenario<S> = fn(seed: u64, index: u64) -> (<S as Subject>::Geometry, u64, Rng);

/// Runs scenarios of `seed` until `budget` operations ran (or, with `HBITMAP_DIFF_SCENARIO`,
/// that scenario only, whole).
pub fn run_seed<S: Subject>(
    seed: u64,
    budget: u64,
    scenario: Scenario<S>,
) -> Result<Stats, String> {
    let mut stats = Stats::default();
    let only = env_u64("HBITMAP_DIFF_SCENARIO");
    let mut index = only.unwrap_or(0);
    while stats.ops < budget || only.is_some() {
        let (geometry, length, mut rng) = scenario(seed, index);
        let length = if only.is_some() {
            length
        } else {
            length.min(budget - stats.ops)
        };
        let label = format!(
            "seed {seed:#x} scenario {index} (reproduce with HBITMAP_DIFF_SEED={seed:#x} \
             HBITMAP_DIFF_SCENARIO={index})"
        );
        run_ops::<S>(&label, &geometry, &mut rng, length, &mut stats)?;
        if only.is_some() {
            break;
        }
        index += 1;
    }
    Ok(stats)
}

/// The random-operations test: `HBITMAP_DIFF_OPS` operations (else `default_ops`) spread over
/// the seeds, one thread per seed; prints what ran and fails with every seed's report.
pub fn random_operations<S: Subject>(
    name: &str,
    default_ops: u64,
    default_seeds: &[u64],
    scenario: Scenario<S>,
) where
    S::Geometry: Send,
{
    let total = env_u64("HBITMAP_DIFF_OPS").unwrap_or(default_ops);
    let seeds = seeds(default_seeds);
    let per_seed = total.div_ceil(seeds.len() as u64);
    let begun = Instant::now();
    let results: Vec<Result<Stats, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = seeds
            .iter()
            .map(|&seed| scope.spawn(move || run_seed::<S>(seed, per_seed, scenario)))
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("a seed's thread panicked".into()))
            })
            .collect()
    });
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(seed_stats) => stats += seed_stats,
            Err(report) => failures.push(report),
        }
    }
    say(format_args!(
        "{name}: {} operations in {} scenarios over seeds {:x?}, {} results compared, {:.1?}",
        stats.ops,
        stats.scenarios,
        seeds,
        stats.calls,
        begun.elapsed()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Scenarios of chosen geometries (boundaries, large sizes), run one after the other; `finish`
/// prints what ran and fails with every report.
pub struct Batch {
    name: String,
    stats: Stats,
    failures: Vec<String>,
    begun: Instant,
}

impl Batch {
    pub fn new(name: &str) -> Batch {
        Batch {
            name: name.into(),
            stats: Stats::default(),
            failures: Vec::new(),
            begun: Instant::now(),
        }
    }

    /// One scenario of `budget` operations on `geometry`.
    pub fn run<S: Subject>(
        &mut self,
        label: &str,
        geometry: &S::Geometry,
        rng: &mut Rng,
        budget: u64,
    ) {
        if let Err(report) = run_ops::<S>(label, geometry, rng, budget, &mut self.stats) {
            self.failures.push(report);
        }
    }

    pub fn finish(self) {
        say(format_args!(
            "{}: {} operations in {} geometries, {} results compared, {:.1?}",
            self.name,
            self.stats.ops,
            self.stats.scenarios,
            self.stats.calls,
            self.begun.elapsed()
        ));
        assert!(self.failures.is_empty(), "{}", self.failures.join("\n\n"));
    }
}

/// Prints a line on stderr even while the test harness captures output.
pub fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subject whose two "implementations" disagree once operation 3 and then operation 7
    /// have run, whatever ran around them.
    struct Disagrees {
        seen_three: bool,
        calls: u64,
    }

    impl Subject for Disagrees {
        type Geometry = ();
        type Op = u64;

        fn new(_: &()) -> Self {
            Disagrees {
                seen_three: false,
                calls: 0,
            }
        }
        fn valid(&self, _: &u64) -> bool {
            true
        }
        fn apply(&mut self, op: &u64) -> Result<(), String> {
            self.calls += 1;
            self.seen_three |= *op == 3;
            if self.seen_three && *op == 7 {
                return Err("7 after 3".into());
            }
            Ok(())
        }
        fn generate(&self, rng: &mut Rng) -> u64 {
            rng.below(10)
        }
        fn final_checks(&self, _: &mut Rng) -> Vec<u64> {
            vec![]
        }
        fn calls(&self) -> u64 {
            self.calls
        }
    }

    #[test]
    fn a_mismatch_is_reported_minimized() {
        let mut stats = Stats::default();
        let report = run_ops::<Disagrees>("label", &(), &mut Rng::new(1), 10_000, &mut stats)
            .expect_err("the subject disagrees");
        assert!(report.starts_with("MISMATCH: label, op "), "{report}");
        assert!(
            report.contains("minimized to 2 operations:\n    3\n    7\n  -> 7 after 3"),
            "{report}"
        );
        assert_eq!(stats.scenarios, 1);
    }

    #[test]
    fn agreeing_runs_count_what_ran() {
        struct Agrees(u64);
        impl Subject for Agrees {
            type Geometry = ();
            type Op = u64;
            fn new(_: &()) -> Self {
                Agrees(0)
            }
            fn valid(&self, _: &u64) -> bool {
                true
            }
            fn apply(&mut self, _: &u64) -> Result<(), String> {
                self.0 += 2;
                Ok(())
            }
            fn generate(&self, rng: &mut Rng) -> u64 {
                rng.below(10)
            }
            fn final_checks(&self, _: &mut Rng) -> Vec<u64> {
                vec![0]
            }
            fn calls(&self) -> u64 {
                self.0
            }
        }
        let mut stats = Stats::default();
        run_ops::<Agrees>("label", &(), &mut Rng::new(1), 100, &mut stats).unwrap();
        assert_eq!((stats.ops, stats.calls, stats.scenarios), (100, 202, 1));
    }
}
