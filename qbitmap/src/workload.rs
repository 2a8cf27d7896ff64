// SPDX-License-Identifier: GPL-2.0-or-later

//! The simulated guest of `qbitmap demo`: the writes a VM with a filesystem makes to its disk.
//!
//! Small writes (4 KiB to 64 KiB, 4 KiB-aligned, mostly 4 KiB) go to the places a filesystem
//! keeps busy: its metadata at the start of the disk, a circular journal, a few dozen hot files
//! (databases, logs, images) spread over the disk, and now and then anywhere at all. A few large
//! sequential streams (a restored VM image, a copied video, a backup archive…) are written in
//! 1 MiB requests, interleaved with the small writes. Everything follows from the seed.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// How often [`generate`] reports progress.
const PROGRESS_STEP: usize = 1 << 16;

/// What [`generate`] reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    Total(u64),
    Done(u64),
}

/// One guest write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub offset: u64,
    pub length: u64,
}

/// A generated workload and what it is made of.
pub struct Workload {
    pub writes: Vec<Write>,
    pub small_writes: u64,
    pub streams: usize,
    pub stream_bytes: u64,
}

impl Workload {
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|w| w.length).sum()
    }
}

/// A region of the disk that a kind of small write lands in.
struct Region {
    start: u64,
    len: u64,
}

/// Generates `small_writes` small writes plus the sequential streams for a disk of
/// `disk_size` bytes (at least 64 GiB), reproducibly from `seed`. `progress` is told the
/// total number of writes first, then how many more were generated, every 65536.
pub fn generate(
    seed: u64,
    disk_size: u64,
    small_writes: u64,
    progress: &mut dyn FnMut(Progress),
) -> Workload {
    assert!(
        disk_size >= 64 * GIB,
        "the simulated guest needs a disk of 64 GiB or more"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    // The filesystem's layout.
    let metadata = Region {
        start: 0,
        len: 2 * GIB,
    };
    let journal = Region {
        start: 2 * GIB,
        len: GIB,
    };
    let hot_files: Vec<Region> = (0..32)
        .map(|_| {
            let len = rng.random_range(16..=1024u64) * MIB;
            let start = rng.random_range(4 * GIB / MIB..(disk_size - len) / MIB) * MIB;
            Region { start, len }
        })
        .collect();

    // Large sequential streams, 1 MiB a request.
    let streams: Vec<Region> = [4 * GIB, 2 * GIB, 1536 * MIB, GIB, 512 * MIB, 256 * MIB]
        .into_iter()
        .map(|len| {
            let start = rng.random_range(4 * GIB / MIB..(disk_size - len) / MIB) * MIB;
            Region { start, len }
        })
        .collect();
    let stream_bytes: u64 = streams.iter().map(|s| s.len).sum();
    let mut stream_pos: Vec<u64> = vec![0; streams.len()];
    let mut large_left = stream_bytes / MIB;

    let total = small_writes + large_left;
    progress(Progress::Total(total));
    let mut writes = Vec::with_capacity(total as usize);
    let mut small_left = small_writes;
    let mut journal_head = 0;
    let mut reported = 0;
    while small_left + large_left > 0 {
        if writes.len() - reported >= PROGRESS_STEP {
            progress(Progress::Done((writes.len() - reported) as u64));
            reported = writes.len();
        }
        if rng.random_range(0..small_left + large_left) < large_left {
            // The next request of a stream that has not finished.
            let mut stream = rng.random_range(0..streams.len());
            while stream_pos[stream] >= streams[stream].len {
                stream = (stream + 1) % streams.len();
            }
            writes.push(Write {
                offset: streams[stream].start + stream_pos[stream],
                length: MIB,
            });
            stream_pos[stream] += MIB;
            large_left -= 1;
            continue;
        }
        small_left -= 1;
        // Mostly 4 KiB, sometimes up to 64 KiB.
        let length = match rng.random_range(0..100) {
            0..60 => 4 * KIB,
            60..80 => 8 * KIB,
            80..92 => 16 * KIB,
            92..97 => 32 * KIB,
            _ => 64 * KIB,
        };
        let offset = match rng.random_range(0..100) {
            // Inodes, allocation bitmaps, directories.
            0..20 => random_in(&mut rng, &metadata, length),
            // The journal is appended to, circularly.
            20..30 => {
                let offset = journal.start + journal_head;
                journal_head = (journal_head + length) % (journal.len - 64 * KIB);
                offset
            }
            // Hot files, the first ones hotter.
            30..92 => {
                let a = rng.random_range(0..hot_files.len());
                let b = rng.random_range(0..hot_files.len());
                random_in(&mut rng, &hot_files[a.min(b)], length)
            }
            // Anywhere.
            _ => random_in(
                &mut rng,
                &Region {
                    start: 0,
                    len: disk_size,
                },
                length,
            ),
        };
        writes.push(Write { offset, length });
    }
    progress(Progress::Done((writes.len() - reported) as u64));
    Workload {
        writes,
        small_writes,
        streams: streams.len(),
        stream_bytes,
    }
}

/// A 4 KiB-aligned offset in `region` where `length` bytes fit.
fn random_in(rng: &mut StdRng, region: &Region, length: u64) -> u64 {
    region.start + rng.random_range(0..=(region.len - length) / (4 * KIB)) * 4 * KIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_inside_the_disk() {
        let disk = 1 << 40;
        let mut reported = 0;
        let a = generate(7, disk, 20_000, &mut |p| match p {
            Progress::Total(n) => assert_eq!(n, 20_000 + 9 * 1024 + 256),
            Progress::Done(n) => reported += n,
        });
        assert_eq!(reported, a.writes.len() as u64);
        let b = generate(7, disk, 20_000, &mut |_| {});
        assert_eq!(a.writes, b.writes);
        assert_ne!(a.writes, generate(8, disk, 20_000, &mut |_| {}).writes);
        assert_eq!(a.writes.len() as u64, 20_000 + a.stream_bytes / MIB);
        assert!(a.writes.iter().all(|w| w.offset + w.length <= disk));
        assert!(a.writes.iter().all(|w| w.offset % (4 * KIB) == 0));
        let large = a.writes.iter().filter(|w| w.length == MIB).count() as u64;
        assert_eq!(large, a.stream_bytes / MIB);
        assert_eq!(a.bytes(), a.writes.iter().map(|w| w.length).sum::<u64>());
    }
}
