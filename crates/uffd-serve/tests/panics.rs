//! A panic in the thread that watches a VM (here: an engine whose
//! `is_finished` panics once, as a bug would) must not leave that VM waiting
//! on a fault nobody serves, nor disturb the other VMs: the worker is
//! caught, logs the panic with the VM, and drains the VM like a shutdown
//! does, so it runs on with every page installed.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use std::os::fd::OwnedFd;
use uffd::Uffd;

use uffd_pager::{FileMode, HandedOver, WorkingSet};
use uffd_serve::engine::{Engine, EngineError, PagerEngine, PagerEngineConfig, RunningVm};
use uffd_serve::protocol::Region;
use uffd_serve::stats::{DrainReport, Ended, EngineStats};

/// The pager engine, except that a VM's `is_finished` panics once after
/// `ARMED` is set.
#[derive(Debug)]
struct PanicsOnce(PagerEngine);

static ARMED: AtomicBool = AtomicBool::new(false);

struct PanickingVm(Box<dyn RunningVm>);

impl RunningVm for PanickingVm {
    fn is_finished(&self) -> bool {
        if ARMED.swap(false, Ordering::SeqCst) {
            panic!("injected: a bug in the engine");
        }
        self.0.is_finished()
    }
    fn stats(&self) -> EngineStats {
        self.0.stats()
    }
    fn working_set(&self) -> Option<WorkingSet> {
        self.0.working_set()
    }
    fn shutdown(&mut self) {
        self.0.shutdown()
    }
    fn hand_over(&mut self) -> Option<HandedOver> {
        self.0.hand_over()
    }
    fn detach(&mut self, timeout: Duration) -> DrainReport {
        self.0.detach(timeout)
    }
}

impl Engine for PanicsOnce {
    fn name(&self) -> &'static str {
        "panics-once"
    }
    fn start(
        &self,
        uffd: Uffd,
        regions: &[Region],
        pid: i32,
        pidfd: OwnedFd,
    ) -> Result<Box<dyn RunningVm>, EngineError> {
        Ok(Box::new(PanickingVm(
            self.0.start(uffd, regions, pid, pidfd)?,
        )))
    }
}

#[test]
fn a_panicking_worker_drains_its_vm_and_the_others_are_served() {
    if !uffd_testkit::vmm_uffd() {
        return;
    }
    let (dir, mem) = scratch_with_memory("panic", 8 << 20);
    let (source, _) = open_source(&mem, FileMode::Mmap);
    let engine = Arc::new(PanicsOnce(PagerEngine::new(
        source,
        PagerEngineConfig::default(),
    )));
    let server =
        TestServer::start_engine(dir.path("sock"), &mem, FileMode::Mmap, engine, None, None);
    let mut child = standin(&server.socket, &mem)
        .args([
            "--threads",
            "2",
            "--touch-percent",
            "10",
            "--pause-before-verify",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = read_line(&mut child, "the VM's touch phase", Duration::from_secs(60));
    assert_eq!(line.trim(), "touched");
    // The worker's next look at the VM panics.
    ARMED.store(true, Ordering::SeqCst);
    let report = server.wait_reports(1, Duration::from_secs(30)).remove(0);
    assert_eq!(report.ended, Ended::Panicked, "{report:?}");
    let drain = report.drain.as_ref().expect("the VM is drained");
    assert_eq!(drain.outcome, "released", "{drain:?}");
    // The VM reads every byte without anybody serving it.
    child.stdin.take().unwrap().write_all(b"verify\n").unwrap();
    let (ok, out) = finish(child, "the drained VM verifying", Duration::from_secs(60));
    assert!(ok && out.contains("\"mismatched_pages\":0"), "{out}");
    // And the server serves the next VM.
    good_vm_is_served(&server, &mem, 1);
}
