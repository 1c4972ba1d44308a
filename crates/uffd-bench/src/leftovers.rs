//! What an interrupted bench would leave behind: the scratch files and
//! directories it made (a snapshot of up to gigabytes) and the processes
//! it started (page servers, restore servers, VMMs, which would run on,
//! holding their ports and memory, after their bench is gone).
//!
//! A bench holds a [`Held`] for each while it lives; the usual path (a
//! drop) removes or stops them as before. A signal's default action runs
//! no destructor, so a command that runs a bench calls
//! [`clean_up_on_interrupt`] first: on SIGINT or SIGTERM it kills every
//! process still held, removes every path still held, says so on stderr
//! and exits with 128 + the signal's number, as the signal would have.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

enum Thing {
    Path(PathBuf),
    Process(u32),
}

struct Registry {
    next: u64,
    held: Vec<(u64, Thing)>,
    /// Set once an interrupt is being handled: whatever is registered
    /// after it is cleaned up at once (the process is about to exit).
    interrupted: bool,
}

type Shared = Mutex<Registry>;

static REGISTRY: Shared = Registry::new();

impl Registry {
    const fn new() -> Shared {
        Mutex::new(Registry {
            next: 0,
            held: Vec::new(),
            interrupted: false,
        })
    }

    fn add(&mut self, thing: Thing, registry: &'static Shared) -> Held {
        let id = self.next;
        self.next += 1;
        self.held.push((id, thing));
        Held { id, registry }
    }
}

fn lock(r: &'static Shared) -> MutexGuard<'static, Registry> {
    r.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A path or a process an interrupt cleans up while this lives; dropping
/// it only forgets it (its owner removes or stops it as usual).
#[must_use = "what is not held is not cleaned up on an interrupt"]
pub struct Held {
    id: u64,
    registry: &'static Shared,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Held").field(&self.id).finish()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        lock(self.registry).held.retain(|(id, _)| *id != self.id);
    }
}

fn hold(registry: &'static Shared, thing: Thing) -> Held {
    let mut r = lock(registry);
    if r.interrupted {
        clean(&thing);
    }
    r.add(thing, registry)
}

/// Holds a scratch file or directory (removed whole on an interrupt),
/// before it is made: once an interrupt is being handled this never
/// returns, so nothing is made after the clean-up.
pub fn path(p: &Path) -> Held {
    let held = hold(&REGISTRY, Thing::Path(p.to_path_buf()));
    wait_if_interrupted();
    held
}

/// Starts `cmd` and holds the child (killed on an interrupt), under the
/// registry's lock, so that no child is ever started and not yet held
/// while an interrupt cleans up; once one is being handled this never
/// returns. Drop the `Held` only after the child has been waited for, so
/// that its pid is not reused while held.
pub fn spawn(cmd: &mut std::process::Command) -> std::io::Result<(std::process::Child, Held)> {
    let mut r = lock(&REGISTRY);
    if r.interrupted {
        drop(r);
        park_forever();
    }
    let child = cmd.spawn()?;
    let held = r.add(Thing::Process(child.id()), &REGISTRY);
    Ok((child, held))
}

fn clean(thing: &Thing) {
    match thing {
        Thing::Process(pid) => {
            if let Some(pid) = i32::try_from(*pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        Thing::Path(p) => {
            let _ = match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
                Ok(_) => std::fs::remove_file(p),
                Err(_) => Ok(()),
            };
        }
    }
}

/// Kills every held process and removes every held path; returns how many
/// of each there were.
fn clean_up_all(registry: &'static Shared) -> (usize, usize) {
    let held = {
        let mut r = lock(registry);
        r.interrupted = true;
        std::mem::take(&mut r.held)
    };
    // Processes first: a server must not be left serving a file that is
    // about to go.
    let (processes, paths): (Vec<_>, Vec<_>) = held
        .into_iter()
        .map(|(_, t)| t)
        .partition(|t| matches!(t, Thing::Process(_)));
    processes.iter().for_each(clean);
    paths.iter().for_each(clean);
    (processes.len(), paths.len())
}

/// Returns at once unless an interrupt is being handled; then never, so
/// that the interrupt's thread, not a bench that failed because its
/// children were killed under it, ends the process and says why.
pub fn wait_if_interrupted() {
    if lock(&REGISTRY).interrupted {
        park_forever();
    }
}

/// For a thread of a process the interrupt's thread is ending.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Starts the thread that cleans up on SIGINT or SIGTERM and then exits
/// the process; `command` names it in what it says on stderr. Call it
/// once, before the bench starts anything.
pub fn clean_up_on_interrupt(command: &'static str) -> std::io::Result<()> {
    on_stop_signal("uffd-interrupt", move |signo| {
        let (processes, paths) = clean_up_all(&REGISTRY);
        eprintln!(
            "{command}: interrupted; stopped {processes} process(es) it had started \
             and removed {paths} scratch path(s)"
        );
        std::process::exit(128 + signo);
    })
}

/// Catches SIGINT and SIGTERM from now on (registered before this
/// returns, so a signal that comes while the command starts up is caught
/// too) and, on the first, calls `then` with its number on a thread named
/// `thread`.
pub fn on_stop_signal(
    thread: &str,
    then: impl FnOnce(i32) + Send + 'static,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = {
        let _entered = runtime.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            let signo = runtime.block_on(async {
                tokio::select! {
                    _ = int.recv() => rustix::process::Signal::INT.as_raw(),
                    _ = term.recv() => rustix::process::Signal::TERM.as_raw(),
                }
            });
            then(signo);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_removes_what_is_held_and_nothing_released() {
        // A registry of its own: the process-wide one is other tests'.
        let registry: &'static Shared = Box::leak(Box::new(Registry::new()));
        let path = |p: &Path| hold(registry, Thing::Path(p.to_path_buf()));
        let dir = std::env::temp_dir().join(format!("uffd-leftovers-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).unwrap();
        std::fs::write(dir.join("inner/file"), b"x").unwrap();
        let kept = std::env::temp_dir().join(format!("uffd-leftovers-kept-{}", std::process::id()));
        std::fs::write(&kept, b"y").unwrap();
        let held = path(&dir);
        drop(path(&kept));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let child_held = hold(registry, Thing::Process(child.id()));
        let (processes, paths) = clean_up_all(registry);
        assert_eq!((processes, paths), (1, 1));
        assert!(!dir.exists());
        assert!(kept.exists(), "a released path was removed");
        let status = child.wait().unwrap();
        assert!(!status.success(), "the held process was not killed");
        // Held after the interrupt: cleaned up at once.
        let late = std::env::temp_dir().join(format!("uffd-leftovers-late-{}", std::process::id()));
        std::fs::write(&late, b"z").unwrap();
        let late_held = path(&late);
        assert!(!late.exists());
        drop((held, child_held, late_held));
        std::fs::remove_file(&kept).unwrap();
    }
}
