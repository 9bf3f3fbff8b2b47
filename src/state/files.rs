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

/// How many settle periods a change waits at most for the files to stop changing.
const SETTLE_AT_MOST: u32 = 5;

/// What `poll` reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// The files changed and have been stable since: read them.
    Changed,
    /// These files are gone (deleted, or a mount lost): whatever was read from them stays in
    /// force; reported once each time they go missing.
    Missing(Vec<PathBuf>),
}

/// Reports each change to any of `paths`, checking every `interval`, forever. A change is
/// reported only once the files have looked the same for `settle`: a writer that truncates
/// and then writes (`cmd > file`), or copies several files one by one, is never read half
/// done (issue 13). Files that never stop changing are read anyway after `SETTLE_AT_MOST`
/// settle periods, so a busy writer cannot freeze what is in force. The first state seen is
/// the one at the call.
pub async fn poll(
    paths: Vec<PathBuf>,
    interval: Duration,
    settle: Duration,
    mut on_change: impl FnMut(Change),
) {
    let all = |paths: &[PathBuf]| paths.iter().map(|p| fingerprint(p)).collect::<Vec<_>>();
    let mut acted_on = all(&paths);
    let mut seen = acted_on.clone();
    let mut seen_since = tokio::time::Instant::now();
    // When the files first differed from what was last acted on.
    let mut pending_since = None;
    loop {
        tokio::time::sleep(interval).await;
        let now = all(&paths);
        if now != seen {
            seen = now;
            seen_since = tokio::time::Instant::now();
        }
        if seen == acted_on {
            pending_since = None;
            continue;
        }
        let pending = *pending_since.get_or_insert_with(tokio::time::Instant::now);
        if seen_since.elapsed() < settle && pending.elapsed() < settle * SETTLE_AT_MOST {
            continue;
        }
        pending_since = None;
        let missing: Vec<PathBuf> = paths
            .iter()
            .zip(&seen)
            .filter(|(_, f)| f.0.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        on_change(match missing.is_empty() {
            true => Change::Changed,
            false => Change::Missing(missing),
        });
        acted_on = seen.clone();
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

    /// A torn write (truncate, then the content a moment later) is reported once, whole; a
    /// deletion is reported as such, once.
    #[tokio::test(start_paused = true)]
    async fn changes_are_reported_once_settled_and_deletions_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, "old").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watched = file.clone();
        tokio::spawn(poll(
            vec![watched.clone()],
            Duration::from_millis(100),
            Duration::from_millis(1000),
            move |c| {
                let text = std::fs::read_to_string(&watched).unwrap_or_default();
                let _ = tx.send((c, text));
            },
        ));
        let step = |ms| tokio::time::sleep(Duration::from_millis(ms));
        step(250).await;
        std::fs::write(&file, "").unwrap(); // truncated...
        step(300).await;
        std::fs::write(&file, "new content").unwrap(); // ...then written
        step(3000).await;
        assert_eq!(
            rx.recv().await,
            Some((Change::Changed, "new content".into()))
        );
        assert!(
            rx.try_recv().is_err(),
            "the empty moment was never reported"
        );
        std::fs::remove_file(&file).unwrap();
        step(3000).await;
        assert_eq!(
            rx.recv().await,
            Some((Change::Missing(vec![file.clone()]), String::new()))
        );
        assert!(rx.try_recv().is_err(), "reported once");
        std::fs::write(&file, "back").unwrap();
        step(3000).await;
        assert_eq!(rx.recv().await, Some((Change::Changed, "back".into())));
    }

    /// A file that never stops changing is still read, after at most `SETTLE_AT_MOST` periods.
    #[tokio::test(start_paused = true)]
    async fn a_file_that_never_settles_is_read_anyway() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, "0").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(poll(
            vec![file.clone()],
            Duration::from_millis(100),
            Duration::from_secs(1),
            move |c| {
                let _ = tx.send(c);
            },
        ));
        // Rewritten every 300 ms for 8 s: never stable for the 1 s settle time.
        for i in 1..=26 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(&file, i.to_string()).unwrap();
        }
        let mut changes = 0;
        while rx.try_recv().is_ok() {
            changes += 1;
        }
        assert!((1..=2).contains(&changes), "{changes} changes reported");
    }
}
