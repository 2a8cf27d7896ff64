// SPDX-License-Identifier: GPL-2.0-or-later

//! The demo's cross-check with QEMU: `qemu-img check` must find no errors, and `qemu-img info`
//! must list the same virtual size, cluster size and bitmaps as qbitmap does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::output;

/// Compares `qemu-img check` and `qemu-img info` with what this tool sees.
pub fn qemu_agrees(
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
}
