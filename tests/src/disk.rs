//! Filling the filesystem under a queen's data dir (a small tmpfs, see
//! [`crate::HiveBuilder::data_on_tmpfs`]) with real bytes, and measuring what it holds.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The name of the file [`fill_until`] writes, in the dir it is given.
pub const FILLER: &str = "filler";

/// Free bytes on the filesystem holding `path`, as `df` reports them.
pub fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("run df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df gave no free space for {}: {out:?}", path.display()))
}

/// Writes real bytes (a sparse file would take no space) into `dir/`[`FILLER`] until
/// `leave` bytes are free; returns its path.
pub fn fill_until(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join(FILLER);
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let chunk = vec![0x5a_u8; 1 << 20];
    while free_bytes(dir) > leave + chunk.len() as u64 {
        file.write_all(&chunk).expect("write the filler");
        file.sync_data().expect("sync the filler");
    }
    path
}

/// The bytes the files under `dir` take on disk (blocks, as `du` counts them), leaving
/// out a top-level [`FILLER`]. Files that vanish while it walks are skipped.
pub fn usage(dir: &Path) -> u64 {
    fn walk(dir: &Path, top: bool) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for e in entries.flatten() {
            if top && e.file_name() == FILLER {
                continue;
            }
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                total += walk(&e.path(), false);
            }
        }
        total
    }
    walk(dir, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_real_blocks_and_leaves_the_filler_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("db");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(sub.join("a"), vec![1u8; 64 << 10]).expect("write");
        let with_data = usage(dir.path());
        assert!(with_data >= 64 << 10, "{with_data}");
        std::fs::write(dir.path().join(FILLER), vec![1u8; 256 << 10]).expect("write");
        assert_eq!(usage(dir.path()), with_data, "the filler is not the data's");
        std::fs::write(sub.join(FILLER), vec![1u8; 64 << 10]).expect("write");
        assert!(
            usage(dir.path()) >= with_data + (64 << 10),
            "only a top-level filler is left out"
        );
    }
}
