//! The guards of system-wide settings: what a case changes is restored
//! when it panics, and a file system that refuses swap is named in the
//! reason. Each test needs root and prints why it is skipped otherwise.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use uffd::SettingLock;
use uffd_selftest::harness::{in_child, Stop};
use uffd_selftest::system::{
    active_swap, create_swap_file, selected_choice, thp_size_dir, thp_sizes, Swap, SwapRefused,
    ThpSettings, SWAP_FILE_PREFIX, THP_JOURNAL, THP_SYSFS,
};

fn root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

/// Every per-size THP knob and the global shmem one, with its selection.
fn thp_knobs() -> Vec<(String, String)> {
    let mut knobs = Vec::new();
    let mut files = vec![Path::new(THP_SYSFS).join("shmem_enabled")];
    for size in thp_sizes() {
        files.push(thp_size_dir(size).join("enabled"));
        files.push(thp_size_dir(size).join("shmem_enabled"));
    }
    for f in files {
        if let Ok(text) = std::fs::read_to_string(&f) {
            let choice = selected_choice(&text).unwrap_or_default().to_string();
            knobs.push((f.display().to_string(), choice));
        }
    }
    knobs
}

#[test]
fn thp_knobs_are_restored_when_a_case_panics() {
    if !root() {
        return;
    }
    let Some(&size) = thp_sizes().first() else {
        eprintln!("skipped: the kernel offers no mTHP sizes");
        return;
    };
    let mut before = Vec::new();
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let mut settings = ThpSettings::lock().unwrap();
        // Read under the lock: no other process is mid-change.
        before = thp_knobs();
        settings.only(size, false).unwrap();
        let enabled = std::fs::read_to_string(thp_size_dir(size).join("enabled")).unwrap();
        assert_eq!(selected_choice(&enabled), Some("always"));
        panic!("a case failing while the knobs are changed");
    }));
    assert!(panicked.is_err());
    // Under the lock again: whoever holds it next has restored before
    // letting go, so this is the state every holder leaves behind.
    let _lock = SettingLock::acquire("thp").unwrap();
    assert_eq!(thp_knobs(), before, "THP knobs not restored after a panic");
}

#[test]
fn a_swap_file_is_disabled_and_removed_when_a_case_panics() {
    if !root() {
        return;
    }
    let mut created = None;
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let swap = Swap::enable().unwrap_or_else(|e| panic!("no swap: {e:?}"));
        created = swap.created().map(Path::to_path_buf);
        if let Some(path) = &created {
            assert!(
                active_swap().contains(&path.display().to_string()),
                "{} is not in /proc/swaps",
                path.display()
            );
        }
        panic!("a case failing while swap is on");
    }));
    assert!(panicked.is_err());
    let Some(path) = created else {
        eprintln!("skipped: the system has swap of its own; nothing was created");
        return;
    };
    assert!(
        !active_swap().contains(&path.display().to_string()),
        "{} is still in use as swap",
        path.display()
    );
    assert!(!path.exists(), "{} was not removed", path.display());
}

#[test]
fn a_swap_file_on_tmpfs_is_refused_with_the_reason() {
    if !root() {
        return;
    }
    let dir = Path::new("/dev/shm");
    if uffd_selftest::system::fs_name(dir) != "tmpfs" {
        eprintln!("skipped: /dev/shm is not a tmpfs here");
        return;
    }
    match create_swap_file(dir, 1 << 20) {
        Err(SwapRefused::FileSystem(why)) => {
            assert!(why.contains("swapon") && why.contains("tmpfs"), "{why}");
        }
        Ok(path) => panic!("tmpfs took a swap file at {}", path.display()),
        Err(other) => panic!("refused for another reason: {other:?}"),
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("uffd-selftest-swap-{}", std::process::id()))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "the refused swap file was left behind"
    );
}

#[test]
fn thp_knobs_left_by_a_killed_process_are_restored_by_the_next_one() {
    if !root() {
        return;
    }
    let Some(&size) = thp_sizes().first() else {
        eprintln!("skipped: the kernel offers no mTHP sizes");
        return;
    };
    let before = {
        let _settings = ThpSettings::lock().unwrap();
        thp_knobs()
    };
    // The child changes a knob and dies without running Drop, as under
    // SIGKILL; its lock goes with it, its journal stays.
    in_child("a THP holder that never restores", || {
        let mut settings = ThpSettings::lock().map_err(Stop::into_message)?;
        settings.only(size, false).map_err(Stop::into_message)?;
        std::mem::forget(settings);
        Ok(())
    })
    .unwrap();
    let _settings = ThpSettings::lock().unwrap();
    assert_eq!(
        thp_knobs(),
        before,
        "the next holder did not restore the knobs from {THP_JOURNAL}"
    );
    assert!(!Path::new(THP_JOURNAL).exists());
}

#[test]
fn a_swap_file_left_by_a_killed_process_is_taken_down_by_the_next_one() {
    if !root() {
        return;
    }
    if !active_swap().is_empty() {
        eprintln!("skipped: the system has swap of its own; no swap file is made");
        return;
    }
    in_child("a swap holder that never cleans up", || {
        let swap = Swap::enable().map_err(Stop::into_message)?;
        std::mem::forget(swap);
        Ok(())
    })
    .unwrap();
    let stale: Vec<String> = active_swap()
        .into_iter()
        .filter(|p| p.contains(SWAP_FILE_PREFIX))
        .collect();
    assert_eq!(
        stale.len(),
        1,
        "the child's swap file is not active: {stale:?}"
    );
    let swap = Swap::enable().unwrap();
    assert!(
        !active_swap().contains(&stale[0]),
        "{} is still active",
        stale[0]
    );
    assert!(
        !Path::new(&stale[0]).exists(),
        "{} was not removed",
        stale[0]
    );
    assert!(swap.created().is_some());
}
