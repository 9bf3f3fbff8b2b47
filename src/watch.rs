//! Live reload: notices when a file changes. Polls, because Kubernetes updates mounted
//! ConfigMaps and Secrets by atomically swapping a `..data` symlink, which inotify on the file
//! itself never sees; comparing the resolved path, inode, size and mtime catches every way the
//! file can change, including in-place writes and renames over it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What identifies one version of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Option<(PathBuf, u64, u64, i64, i64, u64)>);

/// The file's current fingerprint; `None` inside when it cannot be read (being replaced).
pub fn fingerprint(path: &Path) -> Fingerprint {
    let resolved = std::fs::canonicalize(path).ok();
    let meta = std::fs::metadata(path).ok();
    Fingerprint(
        resolved
            .zip(meta)
            .map(|(p, m)| (p, m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size())),
    )
}

/// Calls `on_change` each time any of `paths` changes, checking every `interval`, forever. The
/// first state seen is the one at the call; while a file is missing (being replaced) nothing is
/// reported, and its return is a change.
pub async fn poll(paths: Vec<PathBuf>, interval: Duration, mut on_change: impl FnMut()) {
    let all = |paths: &[PathBuf]| paths.iter().map(|p| fingerprint(p)).collect::<Vec<_>>();
    let mut last = all(&paths);
    loop {
        tokio::time::sleep(interval).await;
        let now = all(&paths);
        if now.iter().any(|f| f.0.is_none()) {
            continue;
        }
        if now != last {
            on_change();
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_writes_renames_and_symlink_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, "a").unwrap();
        let first = fingerprint(&file);
        std::fs::write(&file, "ab").unwrap();
        assert_ne!(fingerprint(&file), first, "in-place write");

        let before = fingerprint(&file);
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "ab").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert_ne!(fingerprint(&file), before, "rename over");

        // Kubernetes: policy.yaml -> ..data/policy.yaml, ..data -> ..v1, then ..data -> ..v2.
        for v in ["..v1", "..v2"] {
            std::fs::create_dir(dir.path().join(v)).unwrap();
            std::fs::write(dir.path().join(v).join("p.yaml"), "same size").unwrap();
        }
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink("..data/p.yaml", &link).unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        let v1 = fingerprint(&link);
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_ne!(fingerprint(&link), v1, "..data swap");
        assert!(fingerprint(&dir.path().join("absent")).0.is_none());
    }
}
