// SPDX-License-Identifier: GPL-2.0-or-later

//! `qbitmap`: inspect and edit the persistent dirty bitmaps of qcow2 images.
//!
//! The work is done by the `hbitmap` library (`hbitmap::qcow2`); this binary parses arguments,
//! calls it and formats what it returns. Exit status: 0 on success, 1 on an error (reported on
//! stderr with the image it concerns), 2 on bad usage; `check` uses qemu-img check's.

// Everything unsafe lives in the library, behind its safe API.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod demo;
mod extents;
mod output;
mod size;
mod workload;

use hbitmap::qcow2;
use hbitmap::qcow2::BitmapName;

use std::ffi::OsStr;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.force_share && cli.command.writes() {
        usage_error(
            ErrorKind::ArgumentConflict,
            "-U/--force-share opens images read-only; it cannot be used with a command that \
             changes the image",
        );
    }
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let result = run(cli, &mut out).and_then(|ok| {
        out.flush()?;
        Ok(ok)
    });
    match result {
        Ok(status) => ExitCode::from(status),
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            drop(out);
            eprintln!("qbitmap: {}", render(&error));
            ExitCode::from(1)
        }
    }
}

/// A bitmap name argument: its bytes, or with `--escaped-names` the name its escaped form
/// stands for. A malformed escape is bad usage (exit 2).
fn name_arg(arg: &OsStr, escaped: bool) -> BitmapName {
    if escaped {
        let parsed = arg
            .to_str()
            .ok_or_else(|| "an escaped name is ASCII or UTF-8 text".to_string())
            .and_then(BitmapName::parse_escaped);
        return parsed.unwrap_or_else(|why| {
            usage_error(
                ErrorKind::InvalidValue,
                &format!("invalid escaped bitmap name: {why}"),
            )
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        BitmapName::from(arg.as_bytes())
    }
    #[cfg(not(unix))]
    match arg.to_str() {
        Some(text) => BitmapName::from(text),
        None => usage_error(
            ErrorKind::InvalidUtf8,
            "a bitmap name that is not UTF-8 must be given with --escaped-names",
        ),
    }
}

/// Runs a command; returns the exit status: nonzero when it ran but found something wrong
/// (check, demo).
fn run(cli: Cli, out: &mut impl Write) -> anyhow::Result<u8> {
    let share = cli.force_share;
    let escaped = cli.escaped_names;
    let name = |arg: &OsStr| name_arg(arg, escaped);
    match cli.command {
        Command::List { image, output } => commands::list(out, &image, share, output)?,
        Command::Dump {
            image,
            name: arg,
            force,
            output,
        } => commands::dump(out, &image, &name(&arg), force, share, output)?,
        Command::Add {
            image,
            name: arg,
            granularity,
            disabled,
            exist_ok,
        } => {
            if let Some(granularity) = granularity {
                check_granularity(granularity);
            }
            commands::add(&image, &name(&arg), granularity, disabled, exist_ok)?
        }
        Command::Remove {
            image,
            name: arg,
            missing_ok,
        } => commands::remove(&image, &name(&arg), missing_ok)?,
        Command::Clear { image, name: arg } => commands::clear(&image, &name(&arg))?,
        Command::Enable { image, name: arg } => commands::set_enabled(&image, &name(&arg), true)?,
        Command::Disable { image, name: arg } => commands::set_enabled(&image, &name(&arg), false)?,
        Command::Merge {
            image,
            source,
            target,
            source_image,
        } => commands::merge(
            &image,
            &name(&source),
            &name(&target),
            source_image.as_deref(),
            share,
        )?,
        Command::Set(range) => commands::set_range(
            &range.image,
            &name(&range.name),
            range.offset,
            range.length,
            true,
        )?,
        Command::Reset(range) => commands::set_range(
            &range.image,
            &name(&range.name),
            range.offset,
            range.length,
            false,
        )?,
        Command::Import {
            image,
            name: arg,
            granularity,
            disabled,
            file,
        } => {
            if let Some(granularity) = granularity {
                check_granularity(granularity);
            }
            commands::import(&image, &name(&arg), granularity, disabled, file.as_deref())?
        }
        Command::Check {
            image,
            repair,
            output,
        } => return commands::check(out, &image, share, repair, output),
        Command::Create {
            image,
            size,
            options,
        } => {
            let cluster_size = cli::cluster_size_option(&options)
                .unwrap_or_else(|why| usage_error(ErrorKind::InvalidValue, &why));
            commands::create(&image, size, cluster_size)?
        }
        Command::Demo(args) => return Ok(if demo::run(&args, out)? { 0 } else { 1 }),
        Command::Generate { what, dir } => generate(what, dir.as_deref(), out)?,
    }
    Ok(0)
}

/// The manual pages (qbitmap.1 and one page per command, as git's) or a shell's completions,
/// from the clap definition, so that they cannot drift from the command line.
fn generate(
    what: cli::Generated,
    dir: Option<&std::path::Path>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use clap_complete::Shell;
    let command = Cli::command();
    let shell = match what {
        cli::Generated::Man => {
            let dir = dir.expect("clap requires DIR for man");
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(command, dir)?;
            return Ok(());
        }
        cli::Generated::Bash => Shell::Bash,
        cli::Generated::Zsh => Shell::Zsh,
        cli::Generated::Fish => Shell::Fish,
    };
    // Completions list hidden commands too: offer only the visible ones.
    let mut visible = clap::Command::new("qbitmap")
        .version(env!("CARGO_PKG_VERSION"))
        .args(
            command
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .cloned(),
        )
        .subcommands(
            command
                .get_subcommands()
                .filter(|c| !c.is_hide_set())
                .cloned(),
        );
    clap_complete::generate(shell, &mut visible, "qbitmap", out);
    Ok(())
}

impl Command {
    /// Whether the command opens an image for writing.
    /// (`merge -b` opens its source image read-only: -U applies to that one.)
    fn writes(&self) -> bool {
        !matches!(
            self,
            Command::List { .. }
                | Command::Dump { .. }
                | Command::Check { repair: None, .. }
                | Command::Demo(_)
                | Command::Generate { .. }
                | Command::Merge {
                    source_image: Some(_),
                    ..
                }
        )
    }
}

/// qcow2 bitmaps have granularities from 512 bytes to 2 GiB.
fn check_granularity(granularity: u64) {
    if !(512..=1 << 31).contains(&granularity) {
        usage_error(
            ErrorKind::InvalidValue,
            &format!("granularity {granularity} is out of range: it must be from 512 to 2G"),
        );
    }
}

/// Reports bad usage the way clap does, and exits with status 2.
fn usage_error(kind: ErrorKind, message: &str) -> ! {
    Cli::command().error(kind, message).exit()
}

/// An error and its causes, `: `-separated, without repeating what a later message already
/// says (the image's path) or what the previous one ended with (a wrapped OS error).
fn render(error: &anyhow::Error) -> String {
    let messages: Vec<String> = error.chain().map(|cause| cause.to_string()).collect();
    let mut text = String::new();
    for (index, message) in messages.iter().enumerate() {
        let said_later = messages[index + 1..]
            .iter()
            .any(|m| m.contains(message.as_str()));
        if message.is_empty() || said_later || text.ends_with(message.as_str()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(message);
    }
    text
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn renders_errors_without_repeating_them() {
        let os = io::Error::from(io::ErrorKind::NotFound);
        let error = Err::<(), _>(anyhow::Error::new(os).context(format!(
            "opening x.qcow2: {}",
            io::Error::from(io::ErrorKind::NotFound)
        )))
        .context("x.qcow2")
        .unwrap_err();
        assert_eq!(render(&error), "opening x.qcow2: entity not found");
        let error = anyhow::anyhow!("no bitmap named 'b'").context("x.qcow2");
        assert_eq!(render(&error), "x.qcow2: no bitmap named 'b'");
    }
}
