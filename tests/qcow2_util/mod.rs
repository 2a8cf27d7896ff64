// SPDX-License-Identifier: GPL-2.0-or-later

//! Helpers shared by the qcow2 tests: scratch directories, QEMU's tools, a tiny QMP client and
//! random bitmaps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hbitmap::HBitmap;
use hbitmap_testkit::Rng;

/// A scratch directory removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

/// The flags of an enabled, consistent bitmap.
#[allow(dead_code)]
pub const AUTO: hbitmap::qcow2::BitmapFlags = hbitmap::qcow2::BitmapFlags {
    in_use: false,
    auto: true,
};

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hbq-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens an image file for reading and writing (to wrap it in a fault-injecting `ImageIo`).
pub fn rw_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// Whether a tool is installed, for a test's extra checks with it (skipped without it, or
/// failing where the test command requires the tools).
pub fn have(tool: &str) -> bool {
    hbitmap_testkit::tools::have(&format!("the checks with {tool}"), &[tool])
}

/// True when every tool is installed; otherwise the test is skipped, or fails where the test
/// command requires the tools.
pub fn have_all(test: &str, tools: &[&str]) -> bool {
    hbitmap_testkit::tools::have(test, tools)
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    if !output.status.success() {
        panic!(
            "{program} {args:?} failed: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

pub fn qemu_img(args: &[&str]) -> String {
    String::from_utf8_lossy(&run("qemu-img", args).stdout).into_owned()
}

/// `qemu-img check`: panics unless it reports no corruption, and (with `leaks_ok` false) no
/// leaks either. Returns its output.
pub fn qemu_check(path: &Path, leaks_ok: bool) -> String {
    let output = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("running qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let code = output.status.code().unwrap_or(-1);
    // 0: clean, 3: leaks only.
    let ok = code == 0 || (leaks_ok && code == 3);
    assert!(
        ok,
        "qemu-img check {} exited {code}:\n{text}",
        path.display()
    );
    text
}

#[allow(unused_imports)] // not every test crate that includes this module lists bitmaps
pub use hbitmap_testkit::tools::qemu_bitmaps;

/// Waits for a unix socket to accept connections.
fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server for {} exited early: {status}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The dirty extents QEMU reports for a bitmap: qemu-nbd -B exports it, nbdinfo --map reads it.
/// Adjacent extents are merged.
pub fn qemu_extents(dir: &Path, image: &Path, name: &str) -> Vec<(u64, u64)> {
    let socket = dir.join(format!("nbd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-B", name, "-k"])
        .arg(&socket)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-nbd");
    wait_for_socket(&socket, &mut child);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let output = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(&uri)
        .output()
        .expect("running nbdinfo");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&socket);
    assert!(
        output.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        let (offset, length, kind): (u64, u64, u64) = (
            fields[0].parse().unwrap(),
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
        );
        if kind & 1 == 0 || length == 0 {
            continue;
        }
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += length,
            _ => extents.push((offset, length)),
        }
    }
    extents
}

/// Our extents of a bitmap, as (offset, length).
pub fn extents(bitmap: &HBitmap) -> Vec<(u64, u64)> {
    bitmap
        .extents()
        .map(|r| (r.start, r.end - r.start))
        .collect()
}

/// A qemu-storage-daemon serving a qcow2 image writable over NBD, with a QMP monitor.
pub struct Qsd {
    child: Child,
    qmp: BufReader<UnixStream>,
    pub nbd_uri: String,
}

impl Qsd {
    pub fn start(dir: &Path, image: &Path) -> Qsd {
        let qmp_path = dir.join("qmp.sock");
        let nbd_path = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&nbd_path);
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                image.display()
            ))
            .args(["--blockdev", "driver=qcow2,file=file0,node-name=fmt0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd_path.display()))
            .args([
                "--export",
                "type=nbd,id=e0,node-name=fmt0,writable=on,name=disk",
            ])
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qmp0",
                qmp_path.display()
            ))
            .args(["--monitor", "chardev=qmp0"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-storage-daemon");
        wait_for_socket(&qmp_path, &mut child);
        wait_for_socket(&nbd_path, &mut child);
        let stream = UnixStream::connect(&qmp_path).expect("connecting to QMP");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qsd = Qsd {
            child,
            qmp: BufReader::new(stream),
            nbd_uri: format!("nbd+unix:///disk?socket={}", nbd_path.display()),
        };
        let mut greeting = String::new();
        qsd.qmp.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "QMP greeting: {greeting}");
        qsd.qmp_ok(r#"{"execute":"qmp_capabilities"}"#);
        qsd
    }

    /// Sends a command; returns its reply line (events skipped).
    pub fn qmp(&mut self, command: &str) -> String {
        self.qmp.get_mut().write_all(command.as_bytes()).unwrap();
        self.qmp.get_mut().write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            let n = self.qmp.read_line(&mut line).unwrap();
            assert!(n > 0, "QMP connection closed after {command}");
            if line.contains("\"event\"") {
                continue;
            }
            return line;
        }
    }

    pub fn qmp_ok(&mut self, command: &str) {
        let reply = self.qmp(command);
        assert!(reply.contains("\"return\""), "{command} -> {reply}");
    }

    /// Writes `length` bytes at `offset` of the guest disk through NBD.
    pub fn write(&self, offset: u64, length: u64) {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P 0x5a {offset} {length}"),
                &self.nbd_uri,
            ],
        );
    }

    /// Quits cleanly (QEMU stores its persistent bitmaps).
    pub fn quit(mut self) {
        let _ = self.qmp(r#"{"execute":"quit"}"#);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not quit"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A bitmap over `size` bytes at granularity `2^bits` with `runs` random dirty runs.
pub fn random_bitmap(rng: &mut Rng, size: u64, bits: u32, runs: u64) -> HBitmap {
    let mut bitmap = HBitmap::new(size, bits).unwrap();
    for _ in 0..runs {
        let start = rng.below(size);
        let max = (size - start).min(1 << (bits + 1 + rng.below(12) as u32));
        let len = 1 + rng.below(max);
        bitmap.set(start, len);
    }
    bitmap
}

/// SHA-256-free fingerprint of a file (FNV-1a over its bytes), for "unchanged" checks.
pub fn file_hash(path: &Path) -> (u64, u64) {
    let data = std::fs::read(path).unwrap();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in &data {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (data.len() as u64, hash)
}

/// The text of each finding, as the CLI prints it (for messages and substring checks).
pub fn texts<'a>(findings: impl Iterator<Item = &'a hbitmap::qcow2::Finding>) -> Vec<String> {
    findings.map(ToString::to_string).collect()
}
