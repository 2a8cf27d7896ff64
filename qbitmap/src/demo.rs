//! `qbitmap demo`: a self-checking tour of persistent dirty bitmaps, with no QEMU needed.
//!
//! Creates a sparse 1 TiB qcow2 image, tracks a simulated guest's writes in an HBitmap, stores
//! it (and a frozen copy taken half-way) as persistent bitmaps, reopens the image, reads them
//! back and compares, then shows the bitmaps, the first extents, the totals and how fast each
//! phase ran. When qemu-img is installed, QEMU has to agree with what was written.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::qcow2::{BitmapFlags, Image, OpenOptions};
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
    let (dir, _temp) = match &args.dir {
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
    let mut ok = true;
    let mut phases = Phases::default();

    writeln!(
        out,
        "qbitmap demo: persistent dirty bitmaps in a qcow2 image\n"
    )?;

    // 1. A sparse 1 TiB image.
    let started = Instant::now();
    let image = Image::create(&path, VIRTUAL_SIZE, CLUSTER_SIZE)
        .with_context(|| path.display().to_string())?;
    phases.add("create image", started, format_size(VIRTUAL_SIZE), None);
    drop(image);

    // 2. The guest writes, tracked in a bitmap; a copy is frozen half-way.
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

    // 3. Store both bitmaps and close the image.
    let bitmap_bytes = active.groups().div_ceil(8);
    let spinner = spin("storing bitmaps");
    let started = Instant::now();
    let mut image = Image::open(
        &path,
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
        .store_bitmap(ACTIVE, &active, auto)
        .with_context(|| format!("{}: storing '{ACTIVE}'", path.display()))?;
    image
        .store_bitmap(FROZEN, &frozen, disabled)
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

    // 4. Reopen read-only and read them back.
    let spinner = spin("loading bitmaps");
    let started = Instant::now();
    let mut image =
        Image::open(&path, OpenOptions::default()).with_context(|| path.display().to_string())?;
    let loaded_active = image
        .load_bitmap(ACTIVE)
        .with_context(|| format!("{}: loading '{ACTIVE}'", path.display()))?;
    let loaded_frozen = image
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
    let report = image_report(&image, &path)?;
    let dump = dump_report(&ACTIVE.into(), 1 << GRANULARITY_BITS, &loaded_active);
    let check = image.check();
    phases.add("list, extents, check", started, String::new(), None);
    image.close().with_context(|| path.display().to_string())?;

    // What the user came for.
    let physical = allocated_bytes(&path);
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
        group_digits(half as u64)
    )?;
    writeln!(out, "\nBitmaps:")?;
    output::write_bitmap_table(out, &report.bitmaps, VIRTUAL_SIZE, "  ")?;
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
        group_digits(loaded_active.dirty_groups())
    )?;

    // Checks.
    writeln!(out, "\nChecks:")?;
    for (name, tracked, loaded) in [
        (ACTIVE, &active, &loaded_active),
        (FROZEN, &frozen, &loaded_frozen),
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
    let flags_ok = report.bitmaps.len() == 2
        && report
            .bitmaps
            .iter()
            .any(|b| b.name.0 == ACTIVE && b.flags == ["auto"])
        && report
            .bitmaps
            .iter()
            .any(|b| b.name.0 == FROZEN && b.flags.is_empty());
    if flags_ok {
        writeln!(out, "  ok    flags: '{ACTIVE}' auto, '{FROZEN}' disabled")?;
    } else {
        ok = false;
        writeln!(
            out,
            "  FAIL  unexpected bitmaps or flags: {:?}",
            report.bitmaps
        )?;
    }
    if check.is_clean() {
        writeln!(out, "  ok    qbitmap check: no errors")?;
    } else {
        ok = false;
        for problem in check.errors.iter().chain(&check.warnings) {
            writeln!(out, "  FAIL  qbitmap check: {problem}")?;
        }
    }
    if args.no_qemu {
        writeln!(out, "  -     qemu-img: skipped (--no-qemu)")?;
    } else if let Some(qemu_img) = find_program("qemu-img") {
        let started = Instant::now();
        ok &= qemu_agrees(out, &qemu_img, &path, &report)?;
        phases.add("qemu-img check + info", started, String::new(), None);
    } else {
        writeln!(
            out,
            "  -     qemu-img: not installed, QEMU's view not compared"
        )?;
    }

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

/// Compares `qemu-img check` and `qemu-img info` with what this tool sees.
fn qemu_agrees(
    out: &mut impl Write,
    qemu_img: &Path,
    image: &Path,
    report: &output::ImageReport,
) -> Result<bool> {
    let mut ok = true;
    let check = Command::new(qemu_img)
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .context("running qemu-img check")?;
    let stdout = String::from_utf8_lossy(&check.stdout);
    if check.status.success() && stdout.contains("No errors were found") {
        writeln!(
            out,
            "  ok    qemu-img check: No errors were found on the image"
        )?;
    } else {
        ok = false;
        writeln!(
            out,
            "  FAIL  qemu-img check ({}): {}{}",
            check.status,
            stdout.trim(),
            String::from_utf8_lossy(&check.stderr).trim()
        )?;
    }

    let info = Command::new(qemu_img)
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(image)
        .output()
        .context("running qemu-img info")?;
    if !info.status.success() {
        writeln!(
            out,
            "  FAIL  qemu-img info ({}): {}",
            info.status,
            String::from_utf8_lossy(&info.stderr).trim()
        )?;
        return Ok(false);
    }
    let theirs = match qemu_bitmaps(&info.stdout) {
        Ok(theirs) => theirs,
        Err(why) => {
            writeln!(out, "  FAIL  qemu-img info: {why:#}")?;
            return Ok(false);
        }
    };
    let mut ours: Vec<(String, u64, Vec<String>)> = report
        .bitmaps
        .iter()
        .map(|b| {
            (
                b.name.0.to_string(),
                b.granularity,
                b.flags.iter().map(|f| f.to_string()).collect(),
            )
        })
        .collect();
    ours.sort();
    if ours == theirs.bitmaps
        && theirs.virtual_size == report.virtual_size
        && theirs.cluster_size == report.cluster_size
    {
        writeln!(
            out,
            "  ok    qemu-img info: same virtual size, cluster size and {} bitmaps (names, \
             flags, granularities)",
            theirs.bitmaps.len()
        )?;
    } else {
        ok = false;
        writeln!(
            out,
            "  FAIL  qemu-img info disagrees: it sees {} bytes, {}-byte clusters, bitmaps {:?}; \
             qbitmap sees {} bytes, {}-byte clusters, bitmaps {:?}",
            theirs.virtual_size,
            theirs.cluster_size,
            theirs.bitmaps,
            report.virtual_size,
            report.cluster_size,
            ours
        )?;
    }
    Ok(ok)
}

/// What `qemu-img info --output=json` says about an image's bitmaps.
pub struct QemuInfo {
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// (name, granularity, flags), sorted.
    pub bitmaps: Vec<(String, u64, Vec<String>)>,
}

/// Parses `qemu-img info --output=json`.
pub fn qemu_bitmaps(json: &[u8]) -> Result<QemuInfo> {
    let info: serde_json::Value = serde_json::from_slice(json).context("invalid JSON")?;
    let number = |value: &serde_json::Value, what: &str| {
        value
            .as_u64()
            .with_context(|| format!("no \"{what}\" in its output"))
    };
    let virtual_size = number(&info["virtual-size"], "virtual-size")?;
    let cluster_size = number(&info["cluster-size"], "cluster-size")?;
    let mut bitmaps = Vec::new();
    if let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() {
        for bitmap in list {
            let name = bitmap["name"].as_str().unwrap_or_default().to_string();
            let granularity = number(&bitmap["granularity"], "granularity")?;
            let flags = bitmap["flags"]
                .as_array()
                .map(|flags| {
                    flags
                        .iter()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            bitmaps.push((name, granularity, flags));
        }
    }
    bitmaps.sort();
    Ok(QemuInfo {
        virtual_size,
        cluster_size,
        bitmaps,
    })
}

/// A program on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
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
    fn parses_qemu_img_info() {
        let json = br#"{
            "virtual-size": 67108864, "filename": "x.qcow2", "cluster-size": 65536,
            "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                "bitmaps": [
                    {"flags": [], "name": "b2", "granularity": 131072},
                    {"flags": ["in-use", "auto"], "name": "b1", "granularity": 65536}
                ]}}}"#;
        let info = qemu_bitmaps(json).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.cluster_size, 65536);
        assert_eq!(
            info.bitmaps,
            vec![
                ("b1".into(), 65536, vec!["in-use".into(), "auto".into()]),
                ("b2".into(), 131072, vec![]),
            ]
        );
        assert!(qemu_bitmaps(b"{}").is_err());
    }

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
