// SPDX-License-Identifier: GPL-2.0-or-later

//! `qbitmap demo`: a self-checking tour of persistent dirty bitmaps, with no QEMU needed.
//!
//! Creates a sparse 1 TiB qcow2 image, tracks a simulated guest's writes in an HBitmap, stores
//! it (and a frozen copy taken half-way) as persistent bitmaps, reopens the image, reads them
//! back and compares, then shows the bitmaps, the first extents, the totals and how fast each
//! phase ran. When qemu-img is installed, QEMU has to agree with what was written.

mod qemu;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::qcow2::{self, BitmapFlags, Image, OpenOptions};
use anyhow::{Context, Result};
use hbitmap::HBitmap;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::DemoArgs;
use crate::commands::{dump_report, image_report};
use crate::output::{self, percent, Align, Table};
use crate::size::{format_rate, format_size, group_digits};
use crate::workload;

const VIRTUAL_SIZE: u64 = 1 << 40;
const CLUSTER_SIZE: u64 = 64 << 10;
const GRANULARITY_BITS: u32 = 16;
const ACTIVE: &str = "demo";
const FROZEN: &str = "demo-first-half";
const EXTENTS_SHOWN: usize = 10;

/// Runs the demo; Ok(false) when a check failed (the reason is printed).
pub fn run(args: &DemoArgs, out: &mut impl Write) -> Result<bool> {
    // `_temp` removes the temporary directory when the demo ends.
    let (path, _temp) = image_path(args)?;
    let mut phases = Phases::default();
    writeln!(
        out,
        "qbitmap demo: persistent dirty bitmaps in a qcow2 image\n"
    )?;

    create_image(&path, &mut phases)?;
    let tracked = track_guest_writes(args, &mut phases)?;
    store_bitmaps(&path, &tracked, &mut phases)?;
    let loaded = load_bitmaps(&path, tracked.bitmap_bytes(), &mut phases)?;

    write_summary(out, args, &path, &tracked, &loaded)?;
    writeln!(out, "\nChecks:")?;
    let mut ok = check_read_back(out, &tracked, &loaded)?;
    ok &= check_with_qemu(out, args, &path, &loaded.report, &mut phases)?;

    writeln!(out, "\nThroughput:")?;
    phases.table().write(out, "  ")?;
    if args.dir.is_some() {
        writeln!(
            out,
            "\nThe image is kept: try `qbitmap list {0}` or `qbitmap dump {0} {ACTIVE}`.",
            path.display()
        )?;
    }
    writeln!(out, "\n{}", if ok { "PASS" } else { "FAIL" })?;
    Ok(ok)
}

/// The image's path, in `--dir` or a new temporary directory (returned so that it lives as
/// long as the demo); an image left there by an earlier run is removed.
fn image_path(args: &DemoArgs) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    let (dir, temp) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("qbitmap-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let path = dir.join("demo.qcow2");
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| path.display().to_string())?;
    }
    Ok((path, temp))
}

/// Step 1: a sparse 1 TiB image.
fn create_image(path: &Path, phases: &mut Phases) -> Result<()> {
    let started = Instant::now();
    let image = Image::create(path, VIRTUAL_SIZE, CLUSTER_SIZE)
        .with_context(|| path.display().to_string())?;
    phases.add("create image", started, format_size(VIRTUAL_SIZE), None);
    drop(image);
    Ok(())
}

/// The guest's writes and the bitmaps that tracked them.
struct Tracked {
    workload: workload::Workload,
    active: HBitmap,
    /// `active` after the first half of the writes.
    frozen: HBitmap,
    /// Writes made before `frozen` was taken.
    half: usize,
}

impl Tracked {
    /// Bytes of one bitmap's data on disk.
    fn bitmap_bytes(&self) -> u64 {
        self.active.groups().div_ceil(8)
    }
}

/// Step 2: the guest writes, tracked in a bitmap; a copy is frozen half-way.
fn track_guest_writes(args: &DemoArgs, phases: &mut Phases) -> Result<Tracked> {
    let progress = bar(0, "generating guest writes");
    let started = Instant::now();
    let workload = workload::generate(args.seed, VIRTUAL_SIZE, args.writes, &mut |p| match p {
        workload::Progress::Total(total) => progress.set_length(total),
        workload::Progress::Done(done) => progress.inc(done),
    });
    progress.finish_and_clear();
    phases.add(
        "generate workload",
        started,
        format!("{} writes", group_digits(workload.writes.len() as u64)),
        None,
    );
    let progress = bar(workload.writes.len() as u64, "tracking guest writes");
    let mut active = HBitmap::new(VIRTUAL_SIZE, GRANULARITY_BITS)?;
    let half = workload.writes.len() / 2;
    let mut frozen = None;
    let mut tracking = Duration::ZERO;
    for writes in [&workload.writes[..half], &workload.writes[half..]] {
        let started = Instant::now();
        for chunk in writes.chunks(1 << 16) {
            for write in chunk {
                active.set(write.offset, write.length);
            }
            progress.inc(chunk.len() as u64);
        }
        tracking += started.elapsed();
        frozen.get_or_insert_with(|| active.clone());
    }
    progress.finish_and_clear();
    let frozen = frozen.expect("frozen half-way");
    phases.add_rate(
        "track writes",
        tracking,
        format!("{} ops", group_digits(workload.writes.len() as u64)),
        format_ops(workload.writes.len() as f64 / tracking.as_secs_f64().max(1e-9)),
    );
    Ok(Tracked {
        workload,
        active,
        frozen,
        half,
    })
}

/// Step 3: store both bitmaps and close the image.
fn store_bitmaps(path: &Path, tracked: &Tracked, phases: &mut Phases) -> Result<()> {
    let bitmap_bytes = tracked.bitmap_bytes();
    let spinner = spin("storing bitmaps");
    let started = Instant::now();
    let mut image = Image::open(
        path,
        OpenOptions {
            write: true,
            force_share: false,
        },
    )
    .with_context(|| path.display().to_string())?;
    let auto = BitmapFlags {
        in_use: false,
        auto: true,
    };
    let disabled = BitmapFlags {
        in_use: false,
        auto: false,
    };
    image
        .store_bitmap(ACTIVE, &tracked.active, auto)
        .with_context(|| format!("{}: storing '{ACTIVE}'", path.display()))?;
    image
        .store_bitmap(FROZEN, &tracked.frozen, disabled)
        .with_context(|| format!("{}: storing '{FROZEN}'", path.display()))?;
    image.close().with_context(|| path.display().to_string())?;
    spinner.finish_and_clear();
    let elapsed = started.elapsed();
    phases.add_rate(
        "store bitmaps",
        elapsed,
        format!("2 x {} bitmap", format_size(bitmap_bytes)),
        format_rate(2 * bitmap_bytes, elapsed.as_secs_f64()),
    );
    Ok(())
}

/// What reading the image back gave.
struct Loaded {
    active: HBitmap,
    frozen: HBitmap,
    report: output::ImageReport,
    dump: output::DumpReport,
    check: qcow2::CheckReport,
}

/// Step 4: reopen the image read-only, read both bitmaps back, list them, take the extents of
/// the active one and check the image.
fn load_bitmaps(path: &Path, bitmap_bytes: u64, phases: &mut Phases) -> Result<Loaded> {
    let spinner = spin("loading bitmaps");
    let started = Instant::now();
    let mut image =
        Image::open(path, OpenOptions::default()).with_context(|| path.display().to_string())?;
    let active = image
        .load_bitmap(ACTIVE)
        .with_context(|| format!("{}: loading '{ACTIVE}'", path.display()))?;
    let frozen = image
        .load_bitmap(FROZEN)
        .with_context(|| format!("{}: loading '{FROZEN}'", path.display()))?;
    spinner.finish_and_clear();
    let elapsed = started.elapsed();
    phases.add_rate(
        "load bitmaps",
        elapsed,
        format!("2 x {} bitmap", format_size(bitmap_bytes)),
        format_rate(2 * bitmap_bytes, elapsed.as_secs_f64()),
    );

    let started = Instant::now();
    let report = image_report(&image, path)?;
    let dump = dump_report(&ACTIVE.into(), 1 << GRANULARITY_BITS, &active);
    let check = image.check();
    phases.add("list, extents, check", started, String::new(), None);
    image.close().with_context(|| path.display().to_string())?;
    Ok(Loaded {
        active,
        frozen,
        report,
        dump,
        check,
    })
}

/// What the user came for: the image, the guest's writes, the bitmaps, the first extents and
/// the totals.
fn write_summary(
    out: &mut impl Write,
    args: &DemoArgs,
    path: &Path,
    tracked: &Tracked,
    loaded: &Loaded,
) -> Result<()> {
    let workload = &tracked.workload;
    let dump = &loaded.dump;
    let physical = allocated_bytes(path);
    writeln!(
        out,
        "Image:    {}{}",
        path.display(),
        if args.dir.is_some() {
            ""
        } else {
            " (temporary)"
        }
    )?;
    writeln!(
        out,
        "          {} virtual, {} clusters, {} allocated on the host",
        format_size(VIRTUAL_SIZE),
        format_size(CLUSTER_SIZE),
        format_size(physical)
    )?;
    writeln!(
        out,
        "Guest:    {} small random writes (4-64 KiB)\n          \
         + {} sequential streams, {} in 1 MiB writes",
        group_digits(workload.small_writes),
        workload.streams,
        format_size(workload.stream_bytes),
    )?;
    writeln!(
        out,
        "          = {} in {} requests (seed {:#x}); '{FROZEN}' frozen after {}",
        format_size(workload.bytes()),
        group_digits(workload.writes.len() as u64),
        args.seed,
        group_digits(tracked.half as u64)
    )?;
    writeln!(out, "\nBitmaps:")?;
    output::write_bitmap_table(out, &loaded.report.bitmaps, VIRTUAL_SIZE, "  ")?;
    writeln!(
        out,
        "\nFirst extents of '{ACTIVE}' ({} in all, `qbitmap dump` prints every one):",
        group_digits(dump.extents.len() as u64)
    )?;
    let shown = &dump.extents[..dump.extents.len().min(EXTENTS_SHOWN)];
    output::write_extent_table(out, shown, "  ")?;
    if dump.extents.len() > shown.len() {
        writeln!(out, "  ...")?;
    }

    writeln!(out, "\nTotals:")?;
    let dirty = dump.dirty_bytes.unwrap_or(0);
    writeln!(
        out,
        "  dirty: {} in {} extents ({} of the disk; {} granules of 64 KiB)",
        format_size(dirty),
        group_digits(dump.extents.len() as u64),
        percent(dirty, VIRTUAL_SIZE),
        group_digits(loaded.active.dirty_groups())
    )?;
    Ok(())
}

/// The bitmaps read back equal the tracked ones, with the flags they were stored with, and
/// qbitmap's own check finds nothing. Ok(false) when one of these fails.
fn check_read_back(out: &mut impl Write, tracked: &Tracked, loaded: &Loaded) -> Result<bool> {
    let mut ok = true;
    for (name, tracked, loaded) in [
        (ACTIVE, &tracked.active, &loaded.active),
        (FROZEN, &tracked.frozen, &loaded.frozen),
    ] {
        if tracked == loaded {
            writeln!(
                out,
                "  ok    '{name}' read back equal to what was tracked ({} dirty granules)",
                group_digits(loaded.dirty_groups())
            )?;
        } else {
            ok = false;
            writeln!(
                out,
                "  FAIL  '{name}' read back differs from what was tracked: {}",
                describe_difference(tracked, loaded)
            )?;
        }
    }
    let bitmaps = &loaded.report.bitmaps;
    let flags_ok = bitmaps.len() == 2
        && bitmaps
            .iter()
            .any(|b| b.name.0 == ACTIVE && b.flags == ["auto"])
        && bitmaps
            .iter()
            .any(|b| b.name.0 == FROZEN && b.flags.is_empty());
    if flags_ok {
        writeln!(out, "  ok    flags: '{ACTIVE}' auto, '{FROZEN}' disabled")?;
    } else {
        ok = false;
        writeln!(out, "  FAIL  unexpected bitmaps or flags: {bitmaps:?}")?;
    }
    let check = &loaded.check;
    if check.is_clean() {
        writeln!(out, "  ok    qbitmap check: no errors")?;
    } else {
        ok = false;
        for problem in check.errors().chain(check.warnings()) {
            writeln!(out, "  FAIL  qbitmap check: {problem}")?;
        }
    }
    Ok(ok)
}

/// QEMU's view of the image, when qemu-img is installed and not turned off (`--no-qemu`).
/// Ok(false) when QEMU disagrees.
fn check_with_qemu(
    out: &mut impl Write,
    args: &DemoArgs,
    path: &Path,
    report: &output::ImageReport,
    phases: &mut Phases,
) -> Result<bool> {
    if args.no_qemu {
        writeln!(out, "  -     qemu-img: skipped (--no-qemu)")?;
        return Ok(true);
    }
    let Some(qemu_img) = qemu::find_program("qemu-img") else {
        writeln!(
            out,
            "  -     qemu-img: not installed, QEMU's view not compared"
        )?;
        return Ok(true);
    };
    let started = Instant::now();
    let ok = qemu::qemu_agrees(out, &qemu_img, path, report)?;
    phases.add("qemu-img check + info", started, String::new(), None);
    Ok(ok)
}

/// Where two bitmaps of the same geometry first differ.
fn describe_difference(tracked: &HBitmap, loaded: &HBitmap) -> String {
    if tracked.size() != loaded.size() || tracked.granularity() != loaded.granularity() {
        return format!(
            "size/granularity {}/{} instead of {}/{}",
            loaded.size(),
            loaded.granularity(),
            tracked.size(),
            tracked.granularity()
        );
    }
    let mut a = tracked.extents();
    let mut b = loaded.extents();
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => continue,
            (x, y) => {
                return format!(
                    "{} dirty bytes instead of {}; first different extent: {:?} instead of {:?}",
                    loaded.count(),
                    tracked.count(),
                    y,
                    x
                )
            }
        }
    }
}

/// Bytes the image occupies on the host (it is sparse).
fn allocated_bytes(path: &Path) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

/// A progress bar on a terminal; nothing when stderr is piped.
fn bar(len: u64, message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(message);
    bar.set_style(
        ProgressStyle::with_template("{msg:24} [{bar:40}] {human_pos}/{human_len} ({eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A spinner for a phase whose progress the library does not report.
fn spin(message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

/// Phases and their timings, for the throughput table.
#[derive(Default)]
struct Phases {
    rows: Vec<(String, Duration, String, String)>,
}

impl Phases {
    fn add(&mut self, name: &str, started: Instant, what: String, rate: Option<String>) {
        self.rows.push((
            name.to_string(),
            started.elapsed(),
            what,
            rate.unwrap_or_default(),
        ));
    }

    fn add_rate(&mut self, name: &str, elapsed: Duration, what: String, rate: String) {
        self.rows.push((name.to_string(), elapsed, what, rate));
    }

    fn table(&self) -> Table {
        let mut table = Table::new(&[
            ("PHASE", Align::Left),
            ("WORK", Align::Right),
            ("TIME", Align::Right),
            ("RATE", Align::Right),
        ]);
        for (name, elapsed, what, rate) in &self.rows {
            table.row(vec![
                name.clone(),
                what.clone(),
                format_duration(*elapsed),
                rate.clone(),
            ]);
        }
        table
    }
}

/// Operations per second, in millions from a million on.
fn format_ops(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.1} M ops/s", rate / 1e6)
    } else {
        format!("{} ops/s", group_digits(rate as u64))
    }
}

fn format_duration(elapsed: Duration) -> String {
    let ms = elapsed.as_secs_f64() * 1000.0;
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(format_ops(55_099_765.0), "55.1 M ops/s");
        assert_eq!(format_ops(12_345.6), "12,345 ops/s");
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::from_micros(1500)), "1.50 ms");
        assert_eq!(format_duration(Duration::from_millis(150)), "150 ms");
        assert_eq!(format_duration(Duration::from_millis(2500)), "2.50 s");
    }
}
