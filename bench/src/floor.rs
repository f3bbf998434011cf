//! `floor`: what this machine charges for the steps a durable submit → start cannot skip,
//! measured without a queen, so a latency figure can be read against them:
//!
//! * `journal_sync`: appending a 300-byte record to a file and `sync_file_range` over it
//!   (`WAIT_BEFORE | WRITE | WAIT_AFTER`): what the queen's flusher does for each group
//!   commit under the default `[storage] sync = false`.
//! * `journal_sync_overwrite`: the same record and sync over a file written out
//!   beforehand: what a journal of pre-written (or recycled) files would pay, with no block
//!   to allocate and no end of file to move per sync.
//! * `fdatasync_append`: the same append, then `fdatasync` (the file grows, so its size is
//!   journaled too), what `[storage] sync = true` adds per group.
//! * `fdatasync_overwrite`: writing 300 bytes over a file already written out, then
//!   `fdatasync`: no metadata changes, the least an `fdatasync` costs here (beanstalkd's
//!   binlog is sized with `ftruncate`, sparse, so its `-f 0` pays between this and
//!   `fdatasync_append` per put).
//! * `direct_append`: the same 300-byte append written with `O_DIRECT` (the 4 KiB block
//!   that ends at it, rewritten in place) into a file written out beforehand: a durable
//!   append in one syscall, the device write without the page cache (no cache flush, as
//!   `journal_sync`), what a journal on `O_DIRECT` would pay instead. Left out, with a
//!   note, where the file system refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE
//!   mounts); one that takes it but writes through its cache (btrfs, ZFS before 2.3)
//!   measures a buffered write instead.
//! * `thread_wake`: one thread handing a message to another that is blocked waiting, and
//!   the answer coming back, halved: one hand-off between threads (the queen's core,
//!   writer, flusher and connection tasks are such hand-offs).
//! * `tcp_rtt`: a 100-byte message over loopback TCP and its 100-byte answer, between two
//!   blocked threads: a client's request and answer, or a frame to a drone and back.
//!
//! The two hand-offs are measured twice: back to back (`_busy`: the other side has only
//! just gone to sleep, as under load) and after [`IDLE`] of quiet (`_idle`: its core has
//! gone idle, as between tasks at low load, where a virtual machine pays most to wake it).
//!
//! Each figure is the p50 and p99 of `--samples` runs, in the directory `--dir` (default:
//! the current one, where a queen's `data_dir` would usually be).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::report::{quantile, Machine, Reporter};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Timed repetitions of each step.
    #[arg(long, default_value_t = 3_000)]
    pub samples: usize,
    /// Where the test files go (a temporary directory is made inside it and removed).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

const RECORD: usize = 300;
/// The quiet before each `_idle` hand-off (a pause in the measuring thread that paces
/// the samples; nothing waits on it).
const IDLE: std::time::Duration = std::time::Duration::from_millis(1);
const MESSAGE: usize = 100;

pub fn run(json_only: bool, machine: &Machine, a: &Args) -> Result<()> {
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let dir = tempfile::tempdir_in(&a.dir)
        .with_context(|| format!("making a temporary directory in {}", a.dir.display()))?;
    let mut report = Reporter::new(
        "floor",
        machine,
        json!({"samples": a.samples, "dir": a.dir.display().to_string()}),
        json_only,
    );
    report.note("each step alone, no queen: p50 and p99 of one step, in ms");
    let mut steps: Vec<(&str, Vec<f64>)> = vec![
        (
            "journal_sync",
            append_and_sync(&dir.path().join("sfr"), a.samples, Sync::Range)?,
        ),
        (
            "fdatasync_append",
            append_and_sync(&dir.path().join("append"), a.samples, Sync::Data)?,
        ),
        (
            "journal_sync_overwrite",
            overwrite_and_sync(&dir.path().join("sfr-overwrite"), a.samples, Sync::Range)?,
        ),
        (
            "fdatasync_overwrite",
            overwrite_and_sync(&dir.path().join("overwrite"), a.samples, Sync::Data)?,
        ),
        ("thread_wake_busy", thread_wake(a.samples, false)?),
        ("thread_wake_idle", thread_wake(a.samples, true)?),
        ("tcp_rtt_busy", tcp_rtt(a.samples, false)?),
        ("tcp_rtt_idle", tcp_rtt(a.samples, true)?),
    ];
    match direct_append(&dir.path().join("direct"), a.samples)? {
        Some(us) => steps.insert(4, ("direct_append", us)),
        None => report.note("direct_append: this file system refuses O_DIRECT; left out"),
    }
    for (name, mut us) in steps {
        us.sort_by(f64::total_cmp);
        report.value(
            1,
            &format!("{name}_p50"),
            "ms",
            quantile(&us, 0.50) / 1000.0,
        );
        report.value(
            1,
            &format!("{name}_p99"),
            "ms",
            quantile(&us, 0.99) / 1000.0,
        );
    }
    report.summary();
    Ok(())
}

#[derive(Clone, Copy)]
enum Sync {
    Range,
    Data,
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

/// Appends a record and syncs it, `samples` times; the time of each, in µs.
fn append_and_sync(path: &std::path::Path, samples: usize, sync: Sync) -> Result<Vec<f64>> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let record = [0x5au8; RECORD];
    let mut at = 0u64;
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        file.write_all_at(&record, at)?;
        match sync {
            Sync::Range => sync_range(&file, at, RECORD as u64)?,
            Sync::Data => file.sync_data()?,
        }
        out.push(micros(started));
        at += RECORD as u64;
    }
    Ok(out)
}

/// Writes a record over a file already written and synced (so no write allocates a block
/// or moves the file's end), then syncs it, `samples` times; the time of each, in µs.
fn overwrite_and_sync(path: &std::path::Path, samples: usize, sync: Sync) -> Result<Vec<f64>> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let block = vec![0u8; RECORD * 1024];
    let mut left = samples
        .checked_mul(RECORD)
        .context("--samples is too large")?;
    while left > 0 {
        let n = left.min(block.len());
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.sync_all()?;
    let record = [0x5au8; RECORD];
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = Instant::now();
        let at = (i * RECORD) as u64;
        file.write_all_at(&record, at)?;
        match sync {
            Sync::Range => sync_range(&file, at, RECORD as u64)?,
            Sync::Data => file.sync_data()?,
        }
        out.push(micros(started));
    }
    Ok(out)
}

/// The block size `O_DIRECT` writes are aligned to.
const BLOCK: usize = 4096;

/// Appends records with `O_DIRECT` into a file written out and synced beforehand (so no
/// write changes its metadata): each rewrites, in place, the aligned block that ends at
/// the record, `samples` times; the time of each, in µs. `None` if the file system
/// refuses `O_DIRECT`.
fn direct_append(path: &std::path::Path, samples: usize) -> Result<Option<Vec<f64>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let size = samples
        .checked_mul(RECORD)
        .and_then(|n| n.checked_add(BLOCK))
        .context("--samples is too large")?;
    {
        let mut file =
            File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len());
            file.write_all(&zeros[..n])?;
            left -= n;
        }
        file.sync_all()?;
    }
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("opening {} with O_DIRECT", path.display()))
        }
    };
    // An aligned block inside a buffer twice its size.
    let mut buf = vec![0x5au8; 2 * BLOCK];
    let skip = buf.as_ptr().align_offset(BLOCK);
    let block = &mut buf[skip..skip + BLOCK];
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let end = (i + 1) * RECORD;
        let start = (end - 1) / BLOCK * BLOCK;
        block[0] = i as u8;
        let started = Instant::now();
        match file.write_all_at(block, start as u64) {
            Ok(()) => {}
            // Opened, but the writes are refused (alignment the file system wants larger).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && i == 0 => return Ok(None),
            Err(e) => return Err(e).context("an O_DIRECT write"),
        }
        out.push(micros(started));
    }
    Ok(Some(out))
}

fn sync_range(file: &File, offset: u64, len: u64) -> Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        bail!("offset out of range");
    };
    // SAFETY: a plain syscall on a file descriptor this function borrows.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sync_file_range");
    }
    Ok(())
}

/// Ping-pong between this thread and another over two channels, each side blocked while
/// it waits; half of each round trip, in µs.
fn thread_wake(samples: usize, idle: bool) -> Result<Vec<f64>> {
    let (to_tx, to_rx) = mpsc::channel::<u64>();
    let (back_tx, back_rx) = mpsc::channel::<u64>();
    let echo = std::thread::spawn(move || {
        while let Ok(n) = to_rx.recv() {
            if back_tx.send(n).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples as u64 {
        if idle {
            std::thread::sleep(IDLE);
        }
        let started = Instant::now();
        to_tx.send(i).context("the echo thread stopped")?;
        back_rx.recv().context("the echo thread stopped")?;
        out.push(micros(started) / 2.0);
    }
    drop(to_tx);
    let _ = echo.join();
    Ok(out)
}

/// A message over loopback TCP to a thread that answers it, each side blocked while it
/// waits; each round trip, in µs.
fn tcp_rtt(samples: usize, idle: bool) -> Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut buf = [0u8; MESSAGE];
        loop {
            match conn.read_exact(&mut buf) {
                Ok(()) => conn.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    let mut buf = [0x5au8; MESSAGE];
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        if idle {
            std::thread::sleep(IDLE);
        }
        let started = Instant::now();
        conn.write_all(&buf)?;
        conn.read_exact(&mut buf)?;
        out.push(micros(started));
    }
    drop(conn);
    match echo.join() {
        Ok(result) => result.context("the echo thread")?,
        Err(_) => bail!("the echo thread panicked"),
    }
    Ok(out)
}
