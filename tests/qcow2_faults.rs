// SPDX-License-Identifier: GPL-2.0-or-later

//! Fault injection: every write and every flush of each change to an image fails in turn, with
//! `ENOSPC` and with `EIO` (FailingIo, one-shot faults). After each fault the error carries the
//! OS error, the file holds exactly the old or exactly the new bitmaps (which one is fixed by
//! where the fault hit relative to the header write, the commit point), `qemu-img check` finds
//! no corruption (clusters leak exactly when the fault hit the header write or later), and the
//! same handle either retries the change successfully or refuses writes until the image is
//! reopened.
mod qcow2_util;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hbitmap::qcow2::io::{FailingIo, Faults, FileIo, ImageIo};
use hbitmap::qcow2::{BitmapFlags, Error, FindingKind, Image, OpenOptions};
use hbitmap::HBitmap;
use hbitmap_testkit::{Rng, RW};
use qcow2_util::*;

const SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 65536;

/// An I/O operation seen by [`Recorder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Write { offset: u64 },
    SetLen,
    Flush,
}

impl Event {
    /// FailingIo counts `pwrite` and `set_len` as writes.
    fn is_write(self) -> bool {
        matches!(self, Event::Write { .. } | Event::SetLen)
    }
}

/// Passes everything through and records the writes and flushes.
struct Recorder<I: ImageIo> {
    inner: I,
    events: Arc<Mutex<Vec<Event>>>,
}

impl<I: ImageIo> ImageIo for Recorder<I> {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.pread(offset, buf)
    }
    fn pwrite(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.events.lock().unwrap().push(Event::Write { offset });
        self.inner.pwrite(offset, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.events.lock().unwrap().push(Event::Flush);
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.events.lock().unwrap().push(Event::SetLen);
        self.inner.set_len(len)
    }
}

fn open_failing(path: &Path, faults: Faults) -> Image {
    let io = FailingIo::new(FileIo::new(rw_file(path)), faults);
    Image::open_io(Box::new(io), path, true).unwrap()
}

/// Per bitmap: (in_use, auto, granularity, dirty extents).
type State = BTreeMap<String, (bool, bool, u64, Vec<(u64, u64)>)>;

fn view(image: &Image) -> State {
    let mut out = BTreeMap::new();
    for info in image.bitmaps() {
        let content = extents(
            &image
                .inspect_bitmap(&info.name)
                .unwrap_or_else(|e| panic!("inspecting '{}': {e}", info.name)),
        );
        out.insert(
            info.name.to_string(),
            (info.in_use, info.auto, info.granularity, content),
        );
    }
    out
}

/// The bitmaps as a fresh read-only open sees them.
fn state(path: &Path) -> State {
    let image = Image::open(path, OpenOptions::default())
        .unwrap_or_else(|e| panic!("{} does not open: {e}", path.display()));
    view(&image)
}

fn names(state: &State) -> Vec<&str> {
    state.keys().map(String::as_str).collect()
}

/// Whether `error` is an I/O error carrying OS error `errno` (through `source`).
fn carries_errno(error: &Error, errno: i32) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            if io.raw_os_error() == Some(errno) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

fn is_poisoned(image: &Image) -> bool {
    image
        .check()
        .warnings()
        .any(|w| matches!(w.kind, FindingKind::WriteFailed { .. }))
}

type Run<'a> = Box<dyn Fn(&mut Image) -> Result<(), Error> + 'a>;

/// One mutating operation.
struct Op<'a> {
    name: &'static str,
    /// The bitmaps it changes: the others must stay as they were.
    touches: &'static [&'static str],
    run: Run<'a>,
    /// The error a repetition gives once the change is made (for operations that are not
    /// idempotent: adding, removing, loading).
    done: fn(&Error) -> bool,
}

#[derive(Default)]
struct Totals {
    faults: usize,
    writes: usize,
    flushes: usize,
    leaking: usize,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write(u64),
    Flush(u64),
}

/// Runs `op` once to learn its writes and flushes, then once per fault.
fn inject_each(op: &Op, base: &Path, dir: &Path, qemu: bool, totals: &mut Totals) {
    let started = Instant::now();
    let work = dir.join(format!("{}.qcow2", op.name));
    let old = state(base);

    // The fault-free run, through a FailingIo without faults, recording the I/O.
    std::fs::copy(base, &work).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let io = Recorder {
        inner: FailingIo::new(FileIo::new(rw_file(&work)), Faults::default()),
        events: Arc::clone(&events),
    };
    let mut image = Image::open_io(Box::new(io), &work, true).unwrap();
    (op.run)(&mut image).unwrap_or_else(|e| panic!("{}: {e}", op.name));
    drop(image);
    let events = events.lock().unwrap().clone();
    let new = state(&work);
    assert_ne!(old, new, "{}: the operation changed nothing", op.name);
    for (name, entry) in &old {
        if !op.touches.contains(&name.as_str()) {
            assert_eq!(new.get(name), Some(entry), "{}: changed '{name}'", op.name);
        }
    }
    if qemu {
        qemu_check(&work, false);
    }
    let writes: Vec<Event> = events.iter().copied().filter(|e| e.is_write()).collect();
    let flushes = events.iter().filter(|e| **e == Event::Flush).count() as u64;
    // The commit point: the one write of the header cluster and the flush after it.
    let header_writes: Vec<usize> = writes
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == Event::Write { offset: 0 })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(header_writes.len(), 1, "{}: {events:?}", op.name);
    let header_write = header_writes[0] as u64;
    let at = events
        .iter()
        .position(|e| *e == Event::Write { offset: 0 })
        .unwrap();
    let header_flush = events[..at].iter().filter(|e| **e == Event::Flush).count() as u64;
    assert_eq!(
        header_flush + 1,
        flushes,
        "{}: the header flush is not the last one: {events:?}",
        op.name
    );

    let faults: Vec<Fault> = (0..writes.len() as u64)
        .map(Fault::Write)
        .chain((0..flushes).map(Fault::Flush))
        .collect();
    let (mut ok_after_commit, mut new_after_error, mut retried, mut poisoned, mut leaking) =
        (0, 0, 0, 0, 0);
    for errno in [libc::ENOSPC, libc::EIO] {
        for &fault in &faults {
            let case = format!("{} with {fault:?} failing (errno {errno})", op.name);
            std::fs::copy(base, &work).unwrap();
            let mut spec = Faults {
                errno: Some(errno),
                ..Faults::default()
            };
            let (expect_ok, expect_new, expect_leak) = match fault {
                Fault::Write(i) => {
                    spec.write = Some(i);
                    (i > header_write, i > header_write, i >= header_write)
                }
                Fault::Flush(i) => {
                    spec.flush = Some(i);
                    (false, i >= header_flush, i >= header_flush)
                }
            };
            let mut image = open_failing(&work, spec);
            let result = (op.run)(&mut image);

            // The result: an error carrying the OS error, or success after the commit point
            // (then freeing the old clusters failed: they are leaked, with a warning).
            match &result {
                Ok(()) => {
                    assert!(expect_ok, "{case}: succeeded");
                    ok_after_commit += 1;
                    assert!(
                        image.warnings().iter().any(|w| w.contains("leaked")),
                        "{case}: no warning about the leaked clusters: {:?}",
                        image.warnings()
                    );
                }
                Err(error) => {
                    assert!(!expect_ok, "{case}: failed: {error}");
                    assert_eq!(error.errno(), errno, "{case}: {error:?}");
                    assert!(carries_errno(error, errno), "{case}: {error:?}");
                    if errno == libc::ENOSPC {
                        assert!(
                            error.to_string().contains("No space left on device"),
                            "{case}: {error}"
                        );
                    }
                }
            }

            // The file: exactly the old or the new bitmaps, per the commit point.
            let now = state(&work);
            let expected = if expect_new { &new } else { &old };
            assert!(
                &now == expected,
                "{case}: expected the {} bitmaps {:?}, found {:?}",
                if expect_new { "new" } else { "old" },
                names(expected),
                names(&now)
            );
            if expect_new && result.is_err() {
                new_after_error += 1;
            }
            for (name, entry) in &old {
                if !op.touches.contains(&name.as_str()) {
                    assert_eq!(now.get(name), Some(entry), "{case}: changed '{name}'");
                }
            }
            let report = Image::check_file(&work, OpenOptions::default()).unwrap();
            assert!(
                report.errors().next().is_none(),
                "{case}: {:?}",
                texts(report.errors())
            );
            if qemu {
                let text = qemu_check(&work, true);
                let leaked = text.contains("leaked cluster");
                // Before the header write the handle frees what it allocated; from the header
                // write on, what was allocated (header write failed) or replaced (later) leaks.
                assert_eq!(leaked, expect_leak, "{case}: qemu-img check says:\n{text}");
                if leaked {
                    leaking += 1;
                }
            }

            // The same handle: it reloaded the state from the file and a retry works, or it
            // is poisoned and refuses writes with a message saying to reopen.
            if is_poisoned(&image) {
                poisoned += 1;
                match (op.run)(&mut image) {
                    Err(Error::ReadOnly(message)) => {
                        assert!(message.contains("reopen the image"), "{case}: {message}")
                    }
                    other => panic!("{case}: a poisoned handle did not refuse: {other:?}"),
                }
            } else {
                assert!(
                    view(&image) == now,
                    "{case}: the handle's view is not the file's"
                );
                match (op.run)(&mut image) {
                    Ok(()) => {}
                    Err(error) if expect_new && (op.done)(&error) => {}
                    Err(error) => panic!("{case}: the retry on the same handle failed: {error}"),
                }
                retried += 1;
                assert!(
                    state(&work) == new,
                    "{case}: the retry did not make the change"
                );
            }
            drop(image);

            // A fresh open and a retry make the change.
            let mut image = Image::open(&work, RW).unwrap();
            match (op.run)(&mut image) {
                Ok(()) => {}
                Err(error) if (op.done)(&error) && view(&image) == new => {}
                Err(error) => panic!("{case}: the retry after reopening failed: {error}"),
            }
            image.close().unwrap();
            assert!(
                state(&work) == new,
                "{case}: the retry after reopening did not make the change"
            );
        }
    }
    let injected = 2 * faults.len();
    totals.faults += injected;
    totals.writes += 2 * writes.len();
    totals.flushes += 2 * flushes as usize;
    totals.leaking += leaking;
    println!(
        "{:<24} {:>2} writes, {} flushes: {injected:>2} faults injected, {ok_after_commit} \
         succeeded after the commit point, {new_after_error} failed with the change made, \
         {retried} retried on the same handle, {poisoned} poisoned, {} leaking clusters \
         ({:.2} s)",
        op.name,
        writes.len(),
        flushes,
        if qemu {
            leaking.to_string()
        } else {
            "n/a".into()
        },
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn every_write_and_flush_fails_in_turn() {
    let s = Scratch::new("faults");
    // Without qemu-img (where the test command does not require it), our own checks still run.
    let qemu = have("qemu-img");
    let base = s.path("base.qcow2");
    let mut rng = Rng::new(21);
    let a = random_bitmap(&mut rng, SIZE, 9, 60);
    let b = random_bitmap(&mut rng, SIZE, 12, 40);
    let c = random_bitmap(&mut rng, SIZE, 16, 20);
    let mut image = Image::create(&base, SIZE, CLUSTER).unwrap();
    image.store_bitmap("a", &a, AUTO).unwrap();
    image.store_bitmap("b", &b, BitmapFlags::default()).unwrap();
    image.store_bitmap("c", &c, AUTO).unwrap();
    image.close().unwrap();

    // The source of merge_bitmap_from: another image of the same virtual size.
    let other = s.path("other.qcow2");
    let x = random_bitmap(&mut rng, SIZE, 10, 50);
    let mut image = Image::create(&other, SIZE, 4096).unwrap();
    image.store_bitmap("x", &x, AUTO).unwrap();
    image.close().unwrap();
    let source = Image::open(&other, OpenOptions::default()).unwrap();

    let e = random_bitmap(&mut rng, SIZE, 10, 30);
    let a2 = random_bitmap(&mut rng, SIZE, 9, 60);
    let idempotent: fn(&Error) -> bool = |_| false;
    let ops: Vec<Op> = vec![
        Op {
            name: "add_bitmap",
            touches: &["d"],
            run: Box::new(|image| image.add_bitmap("d", 65536, true)),
            done: |e| matches!(e, Error::Exists(_)),
        },
        Op {
            name: "store_bitmap (new)",
            touches: &["e"],
            run: Box::new(|image| image.store_bitmap("e", &e, BitmapFlags::default())),
            done: idempotent,
        },
        Op {
            name: "store_bitmap (replace)",
            touches: &["a"],
            run: Box::new(|image| image.store_bitmap("a", &a2, AUTO)),
            done: idempotent,
        },
        Op {
            name: "clear_bitmap",
            touches: &["b"],
            run: Box::new(|image| image.clear_bitmap("b")),
            done: idempotent,
        },
        Op {
            name: "merge_bitmap",
            touches: &["a"],
            run: Box::new(|image| image.merge_bitmap("c", "a")),
            done: idempotent,
        },
        Op {
            name: "merge_bitmap_from",
            touches: &["b"],
            run: Box::new(|image| image.merge_bitmap_from(&source, "x", "b")),
            done: idempotent,
        },
        Op {
            name: "remove_bitmap",
            touches: &["c"],
            run: Box::new(|image| image.remove_bitmap("c")),
            done: |e| matches!(e, Error::NotFound(_)),
        },
        Op {
            name: "set_enabled",
            touches: &["a"],
            run: Box::new(|image| image.set_enabled("a", false)),
            done: idempotent,
        },
        Op {
            name: "load_bitmap",
            touches: &["b"],
            run: Box::new(|image| {
                let loaded: HBitmap = image.load_bitmap("b")?;
                assert_eq!(loaded, b, "load_bitmap returned other content");
                Ok(())
            }),
            done: |e| matches!(e, Error::InUse(_)),
        },
    ];
    let started = Instant::now();
    let mut totals = Totals::default();
    for op in &ops {
        inject_each(op, &base, &s.dir, qemu, &mut totals);
    }
    println!(
        "faults injected: {} (writes {}, flushes {}), cases leaking clusters: {} ({:.1} s)",
        totals.faults,
        totals.writes,
        totals.flushes,
        if qemu {
            totals.leaking.to_string()
        } else {
            "n/a (no qemu-img)".into()
        },
        started.elapsed().as_secs_f64()
    );
}
