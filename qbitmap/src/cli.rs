// SPDX-License-Identifier: GPL-2.0-or-later

//! The command line: clap's derive structures and the value parsers they use.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size::{parse_power_of_two, parse_size};

/// Inspect and edit the persistent dirty bitmaps of qcow2 images.
///
/// Sizes and offsets take qemu-img's suffixes: 512, 64K, 1M, 2G, 1T (binary units), or plain
/// bytes. Bitmap names are bytes: an argument is the name's exact bytes (UTF-8 or not), or with
/// --escaped-names the escaped form that list and dump print. Exit status: 0 on success, 1 on
/// an error, 2 on bad usage; `check` exits as `qemu-img check` does (0 consistent, 1 check
/// error, 2 corruptions, 3 leaks only).
#[derive(Debug, Parser)]
#[command(name = "qbitmap", version, max_term_width = 100)]
pub struct Cli {
    /// Open images read-only without taking QEMU's locks, to read an image that another
    /// process (a running VM) has open. What is read may be stale or in-use.
    #[arg(short = 'U', long, global = true)]
    pub force_share: bool,

    /// Read NAME, SOURCE and TARGET in the escaped form that list and dump print: \\ for a
    /// backslash, \t, \n, \r, \0 and \xHH for any byte; other characters stand for
    /// themselves. The way to name a bitmap whose name holds a NUL byte, which no argument can
    /// carry.
    #[arg(long, global = true)]
    pub escaped_names: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the bitmaps of an image: name, granularity, flags and dirty bytes.
    List {
        /// The qcow2 image.
        image: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print the dirty extents of one bitmap.
    ///
    /// --output=nbdinfo prints exactly what `nbdinfo --json --map=qemu:dirty-bitmap:NAME`
    /// prints for the image exported by `qemu-nbd -B NAME`: dirty (type 1) and clean (type 0)
    /// extents covering the whole disk, without starting a server.
    Dump {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: OsString,
        /// Dump a bitmap even though it is marked in-use (its content may be inconsistent).
        #[arg(short, long, visible_alias = "inspect")]
        force: bool,
        #[command(flatten)]
        output: DumpOutputArgs,
    },
    /// Add a new, empty persistent bitmap.
    Add {
        /// The qcow2 image.
        image: PathBuf,
        /// The new bitmap's name: 1 to 1023 bytes, no NUL (what QEMU accepts).
        name: OsString,
        /// Bytes per bit: a power of two from 512 to 2G. Default: QEMU's, the cluster size
        /// clamped to 4K..64K.
        #[arg(short, long, value_parser = parse_power_of_two)]
        granularity: Option<u64>,
        /// Add it disabled: without the auto flag, QEMU does not track writes in it.
        #[arg(long)]
        disabled: bool,
        /// Succeed without changing anything when a bitmap of this name already exists with
        /// the same granularity and enabled state and is not in use (a retry after a failure).
        #[arg(long)]
        exist_ok: bool,
    },
    /// Remove a bitmap, also one marked in-use.
    #[command(visible_alias = "rm")]
    Remove {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: OsString,
        /// Succeed without changing anything when there is no bitmap of this name (a retry).
        #[arg(long)]
        missing_ok: bool,
    },
    /// Mark a whole bitmap clean.
    Clear {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: OsString,
    },
    /// Set a bitmap's auto flag: QEMU tracks guest writes in it.
    Enable {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: OsString,
    },
    /// Drop a bitmap's auto flag: QEMU keeps it as it is.
    Disable {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap.
        name: OsString,
    },
    /// Merge bitmap SOURCE into bitmap TARGET (TARGET |= SOURCE).
    Merge {
        /// The qcow2 image holding TARGET (and SOURCE, unless -b is given).
        image: PathBuf,
        /// The bitmap to merge from.
        source: OsString,
        /// The bitmap to merge into.
        target: OsString,
        /// Take SOURCE from this other qcow2 image (opened read-only; -U applies to it).
        #[arg(short = 'b', long = "source-image", value_name = "SOURCE_IMAGE")]
        source_image: Option<PathBuf>,
    },
    /// Mark a byte range dirty (whole granules are marked).
    Set(RangeArgs),
    /// Mark a byte range clean; it must start and end on granule boundaries.
    Reset(RangeArgs),
    /// Create or replace a bitmap from extents JSON (the schema `dump --output=json` prints).
    Import {
        /// The qcow2 image.
        image: PathBuf,
        /// The bitmap to create or replace.
        name: OsString,
        /// Bytes per bit; default: the JSON's "granularity", else the existing bitmap's, else QEMU's default (the cluster size clamped to 4K..64K).
        #[arg(short, long, value_parser = parse_power_of_two)]
        granularity: Option<u64>,
        /// Create it without the auto flag (an existing bitmap keeps its flag otherwise).
        #[arg(long)]
        disabled: bool,
        /// The JSON file; standard input when absent or "-".
        file: Option<PathBuf>,
    },
    /// Check an image as `qemu-img check` does (refcounts of every cluster, the bitmaps), and
    /// repair it with -r.
    ///
    /// Without -r nothing is changed. Exit status as qemu-img check's: 0 consistent (bitmaps
    /// in use or a stale bitmaps extension are states, not damage), 1 the check could not be
    /// completed (or the repair was refused), 2 corruptions, 3 leaked clusters only. With -r
    /// the status is that of the check made after the repair.
    Check {
        /// The qcow2 image.
        image: PathBuf,
        /// Repair: "leaks" frees leaked clusters; "all" also removes every bitmap that cannot
        /// be trusted (in use, damaged, cross-linked) and a stale or unreadable bitmaps
        /// extension. Holds QEMU's write lock; every change is named.
        #[arg(short = 'r', long = "repair", value_enum, value_name = "leaks|all")]
        repair: Option<Repair>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Create a new, empty qcow2 (v3) image.
    Create {
        /// The image to create.
        image: PathBuf,
        /// Its virtual size.
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Creation options, as qemu-img's: cluster_size=SIZE (default 64K).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Run a self-checking demonstration: a 1 TiB sparse image, a simulated guest, bitmaps
    /// stored, reloaded and compared (and checked by qemu-img when it is installed).
    Demo(DemoArgs),
    /// Write the manual pages or a shell's completions, generated from this definition (used
    /// by the build; hidden from the help).
    #[command(hide = true)]
    Generate {
        /// What: man (the pages, into DIR), bash, zsh or fish (on standard output).
        #[arg(value_enum)]
        what: Generated,
        /// Where the manual pages go.
        #[arg(required_if_eq("what", "man"))]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generated {
    Man,
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct RangeArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// The bitmap.
    pub name: OsString,
    /// First byte of the range.
    #[arg(value_parser = parse_size)]
    pub offset: u64,
    /// Bytes in the range.
    #[arg(value_parser = parse_size)]
    pub length: u64,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to put the image (kept afterwards); a temporary directory, removed at the end,
    /// when absent.
    pub dir: Option<PathBuf>,
    /// Seed of the simulated guest's writes.
    #[arg(long, default_value_t = 0x0051_b17a)]
    pub seed: u64,
    /// Number of small random writes the guest makes.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pub writes: u64,
    /// Skip the comparison with qemu-img even when it is installed.
    #[arg(long)]
    pub no_qemu: bool,
}

#[derive(Debug, Args, Clone, Copy)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub output: Format,
    /// Same as --output=json.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
}

impl OutputArgs {
    pub fn json(self) -> bool {
        self.json || self.output == Format::Json
    }
}

/// `check -r`: what to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Free leaked clusters.
    Leaks,
    /// Also remove untrusted bitmaps and a stale or unreadable bitmaps extension.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Debug, Args, Clone, Copy)]
pub struct DumpOutputArgs {
    /// Output format (nbdinfo: the map `nbdinfo --json` prints for the bitmap over NBD).
    #[arg(long, value_enum, default_value_t = DumpFormat::Human)]
    pub output: DumpFormat,
    /// Same as --output=json.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
}

impl DumpOutputArgs {
    pub fn format(self) -> DumpFormat {
        if self.json {
            DumpFormat::Json
        } else {
            self.output
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    Human,
    Json,
    Nbdinfo,
}

/// Parses `-o` options (`cluster_size=64K,...`, possibly repeated) into the cluster size.
pub fn cluster_size_option(options: &[String]) -> Result<u64, String> {
    let mut cluster_size = 64 * 1024;
    for option in options.iter().flat_map(|o| o.split(',')) {
        if option.is_empty() {
            continue;
        }
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| format!("option '{option}' needs a value: KEY=VALUE"))?;
        match key {
            "cluster_size" => cluster_size = parse_power_of_two(value)?,
            // Accepted for qemu-img compatibility: this tool only writes what they select.
            "compat" if value == "1.1" || value == "v3" => {}
            _ => {
                return Err(format!(
                    "unsupported option '{option}' (supported: cluster_size=SIZE, compat=1.1)"
                ))
            }
        }
    }
    if !(512..=2 << 20).contains(&cluster_size) {
        return Err(format!(
            "cluster size {cluster_size} is out of range: it must be from 512 to 2M"
        ));
    }
    Ok(cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cluster_size_options() {
        assert_eq!(cluster_size_option(&[]), Ok(65536));
        assert_eq!(cluster_size_option(&["cluster_size=4K".into()]), Ok(4096));
        assert_eq!(
            cluster_size_option(&["compat=1.1,cluster_size=2M".into()]),
            Ok(2 << 20)
        );
        assert!(cluster_size_option(&["cluster_size=3000".into()]).is_err());
        assert!(cluster_size_option(&["cluster_size=4M".into()]).is_err());
        assert!(cluster_size_option(&["preallocation=full".into()]).is_err());
        assert!(cluster_size_option(&["cluster_size".into()]).is_err());
    }
}
