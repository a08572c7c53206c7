//! The watch on real files (inotify) and on a paused clock.

use super::*;
use std::fs;
use std::time::Duration;

const WEB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}\n";
const SERVICE_AND_SLICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec: {clusterIP: 10.96.1.2, ports: [{port: 53}]}\n";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("writing test manifest");
    path
}

fn watch(paths: &[PathBuf], debounce: Duration) -> Result<ManifestWatch, WatchError> {
    ManifestWatch::new(paths, debounce)
}

/// Generous: this VM can pause for 500 ms.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
const DEBOUNCE: Duration = Duration::from_millis(100);

async fn expect_change(watch: &mut ManifestWatch, what: &str) {
    if tokio::time::timeout(EVENT_TIMEOUT, watch.changed())
        .await
        .is_err()
    {
        panic!("no change reported within {EVENT_TIMEOUT:?} after {what}");
    }
    watch.take_hints();
}

/// Waits until no change has been reported for `quiet`; bounded to 10 rounds.
async fn settle(watch: &mut ManifestWatch, quiet: Duration) {
    for _ in 0..10 {
        if tokio::time::timeout(quiet, watch.changed()).await.is_err() {
            return;
        }
        watch.take_hints();
    }
    panic!("the watch kept reporting changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_write_rename_replace_delete_and_create() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let confd = dir.path().join("conf.d");
    fs::create_dir(&files).unwrap();
    fs::create_dir(&confd).unwrap();
    let svc = write(&files, "svc.yaml", WEB_SERVICE);
    let mut watch = watch(&[svc.clone(), confd.clone()], DEBOUNCE).unwrap();
    let dirs: Vec<&Path> = watch.dirs().collect();
    assert_eq!(dirs, [confd.as_path(), files.as_path()]);

    fs::write(&svc, SERVICE_AND_SLICES).unwrap();
    expect_change(&mut watch, "an in-place write").await;
    settle(&mut watch, Duration::from_millis(500)).await;

    let tmp = write(&files, ".svc.yaml.tmp", WEB_SERVICE);
    fs::rename(&tmp, &svc).unwrap();
    expect_change(&mut watch, "a rename-replace").await;
    settle(&mut watch, Duration::from_millis(500)).await;

    fs::remove_file(&svc).unwrap();
    expect_change(&mut watch, "a delete").await;
    settle(&mut watch, Duration::from_millis(500)).await;

    write(&confd, "new.yaml", WEB_SERVICE);
    expect_change(&mut watch, "a file created in a watched directory").await;
    settle(&mut watch, Duration::from_millis(500)).await;

    write(&files, "svc.yaml", WEB_SERVICE);
    expect_change(&mut watch, "re-creating a deleted watched file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_files_next_to_a_watched_file_do_not_trigger_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
    let paths = [dir.path().join("svc.yaml")];
    let mut watch = watch(&paths, DEBOUNCE).unwrap();
    settle(&mut watch, Duration::from_millis(300)).await;

    write(dir.path(), "agent.log", "a log line");
    write(dir.path(), "other.yaml", SERVICE_AND_SLICES);
    let quiet = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
    assert!(
        quiet.is_err(),
        "a neighbour of the watched file reported a change"
    );

    write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
    expect_change(&mut watch, "rewriting the watched file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_does_not_trigger_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
    let paths = [dir.path().to_path_buf()];
    let mut watch = watch(&paths, DEBOUNCE).unwrap();

    for _ in 0..3 {
        let set = super::super::load(&paths);
        assert_eq!(set.services.len(), 1);
    }

    let quiet = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
    assert!(quiet.is_err(), "reading the manifests reported a change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let paths = [dir.path().to_path_buf()];
    // Longer than the VM's pauses, so the burst cannot split in two.
    let mut watch = watch(&paths, Duration::from_secs(1)).unwrap();

    for i in 0..5 {
        write(dir.path(), &format!("{i}.yaml"), WEB_SERVICE);
    }

    expect_change(&mut watch, "five writes").await;
    let again = tokio::time::timeout(Duration::from_secs(2), watch.changed()).await;
    assert!(again.is_err(), "one burst was reported twice");
}

#[tokio::test(start_paused = true)]
async fn changes_made_while_nobody_waits_are_reported_by_the_next_call() {
    let dir = tempfile::tempdir().unwrap();
    let paths = [dir.path().to_path_buf()];
    let mut watch = watch(&paths, DEBOUNCE).unwrap();
    // Injected: the paused clock must not race a real inotify thread.
    watch.inject(false);
    let start = tokio::time::Instant::now();

    // A cancelled call keeps the burst pending...
    let cancelled = tokio::time::timeout(DEBOUNCE / 2, watch.changed()).await;
    assert!(cancelled.is_err());
    // ...and the next call completes it, after the quiet period.
    watch.changed().await;
    assert!(start.elapsed() >= DEBOUNCE);
    assert!(start.elapsed() < DEBOUNCE * 2);
}

#[tokio::test(start_paused = true)]
async fn a_completed_write_is_reported_at_once_without_the_debounce() {
    let dir = tempfile::tempdir().unwrap();
    let mut watch = watch(&[dir.path().to_path_buf()], Duration::from_secs(10)).unwrap();
    watch.inject(false);
    let start = tokio::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_millis(10), watch.changed()).await;
    watch.inject(true);
    watch.changed().await;
    assert!(
        start.elapsed() < Duration::from_millis(20),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_into_place_is_complete_and_an_open_write_is_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("svc.yaml");
    // A debounce far longer than the timeout: only a completed write can resolve.
    let mut watch = watch(&[dir.path().to_path_buf()], Duration::from_secs(30)).unwrap();

    let tmp = write(dir.path(), ".svc.yaml.tmp", WEB_SERVICE);
    fs::rename(&tmp, &target).unwrap();
    tokio::time::timeout(EVENT_TIMEOUT, watch.changed())
        .await
        .expect("a rename into place waited for the debounce");
    let hints = watch.take_hints();
    assert!(hints.complete.contains(&target), "{hints:?}");

    use std::io::Write as _;
    let mut writer = fs::OpenOptions::new().append(true).open(&target).unwrap();
    writer.write_all(b"# more\n").unwrap();
    writer.flush().unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), watch.changed()).await;
    assert!(
        quiet.is_err(),
        "a write in progress was reported as complete"
    );
    assert!(watch.take_hints().writing.contains_key(&target));

    drop(writer);
    tokio::time::timeout(EVENT_TIMEOUT, watch.changed())
        .await
        .expect("closing after writing waited for the debounce");
    let hints = watch.take_hints();
    assert!(
        hints.complete.contains(&target) && !hints.writing.contains_key(&target),
        "{hints:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_created_later_or_re_created_is_watched() {
    let dir = tempfile::tempdir().unwrap();
    let confd = dir.path().join("later").join("conf.d");
    let mut watch = watch(std::slice::from_ref(&confd), DEBOUNCE).unwrap();
    let dirs: Vec<&Path> = watch.dirs().collect();
    assert_eq!(dirs, [dir.path()]);

    fs::create_dir_all(&confd).unwrap();
    expect_change(&mut watch, "creating the directory's parent").await;
    settle(&mut watch, Duration::from_millis(500)).await;
    assert!(watch.dirs().any(|d| d == confd));

    write(&confd, "svc.yaml", WEB_SERVICE);
    expect_change(&mut watch, "a file created in the new directory").await;
    settle(&mut watch, Duration::from_millis(500)).await;

    fs::remove_dir_all(&confd).unwrap();
    expect_change(&mut watch, "deleting the directory").await;
    settle(&mut watch, Duration::from_millis(500)).await;
    fs::create_dir(&confd).unwrap();
    expect_change(&mut watch, "re-creating the directory").await;
    settle(&mut watch, Duration::from_millis(500)).await;

    write(&confd, "svc.yaml", WEB_SERVICE);
    expect_change(&mut watch, "a file created in the re-created directory").await;
}

#[test]
fn a_missing_path_is_watched_through_its_nearest_existing_ancestor() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "svc.yaml", WEB_SERVICE);

    assert_eq!(watched_dir(dir.path()), dir.path());
    assert_eq!(watched_dir(&file), dir.path());
    assert_eq!(watched_dir(&dir.path().join("a/b/c.yaml")), dir.path());
    assert_eq!(watched_dir(&file.join("under-a-file.yaml")), dir.path());
    assert_eq!(
        watched_dir(Path::new("no-such-relative/x.yaml")),
        Path::new(".")
    );
}
