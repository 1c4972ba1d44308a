//! One VM's worker: its handshake, serving it with the engine until the
//! VMM exits or the server stops, its working set and its report.

use super::*;

pub(super) struct VmWorker {
    pub(super) id: u64,
    pub(super) policy: HandshakePolicy,
    pub(super) engine: Arc<dyn Engine>,
    pub(super) handle: ServerHandle,
    pub(super) stats: Arc<StatsLog>,
    pub(super) live: Arc<Mutex<HashMap<u64, LiveVm>>>,
    pub(super) record: Option<PathBuf>,
    pub(super) stats_json: Option<PathBuf>,
    pub(super) drain_timeout: Duration,
    pub(super) handed: Sender<HandedVm>,
}

impl VmWorker {
    pub(super) fn run(self, stream: UnixStream) {
        let id = self.id;
        let handshake = match handshake::accept(&stream, &self.policy) {
            Ok(h) => h,
            Err(e) => return self.refuse(&stream, e),
        };
        let peer = handshake.peer;
        // A peer in another pid namespace shows as pid 0 and cannot be watched.
        let pidfd = match Pid::from_raw(peer.pid)
            .ok_or(rustix::io::Errno::SRCH)
            .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()))
        {
            Ok(fd) => fd,
            Err(errno) => {
                return self.refuse(
                    &stream,
                    HandshakeError::WatchPeer {
                        pid: peer.pid,
                        errno,
                    },
                );
            }
        };
        // The watcher's own handle on the same process (a duplicate: no
        // pid to look up again, which another process may have by then).
        let vmm_exit = pidfd.try_clone().ok();
        let Handshake { regions, uffd, .. } = handshake;
        let memory_bytes: u64 = regions.iter().map(|r| r.len).sum();
        let page_size = regions[0].page_size;
        tracing::info!(
            vm = id,
            pid = peer.pid,
            uid = peer.uid,
            regions = regions.len(),
            memory_mib = memory_bytes >> 20,
            page_size,
            "serving VM"
        );
        let vm = match self.engine.start(uffd, &regions, peer.pid, pidfd) {
            Ok(vm) => vm,
            Err(e) => {
                tracing::error!(vm = id, pid = peer.pid, "cannot serve the VM: {e}");
                self.stats.refuse(Refusal {
                    step: "engine-start",
                    reason: e.to_string(),
                    pid: Some(peer.pid),
                });
                return;
            }
        };
        // Firecracker closes the connection after the handshake: the pidfd
        // (watched by the engine), not the stream, says when the VMM is gone.
        drop(stream);
        self.serve(peer, vm, vmm_exit, page_size, memory_bytes);
    }

    /// Serves a VM until its VMM exits (`vmm_exit`, its pidfd, wakes the
    /// watch at once), the server stops (drain) or a new server takes it
    /// over; then reports it.
    pub(super) fn serve(
        self,
        peer: Peer,
        mut vm: Box<dyn RunningVm>,
        vmm_exit: Option<OwnedFd>,
        page_size: u64,
        memory_bytes: u64,
    ) {
        let id = self.id;
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveVm {
                vm: id,
                pid: peer.pid,
                memory_bytes,
            },
        );
        let started = Instant::now();
        // A panic while watching the VM (a bug, an engine failing in a way
        // nobody foresaw) must not leave it without a handler: it is
        // drained like a VM at shutdown.
        let ended = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.watch(vm.as_ref(), peer.pid, vmm_exit)
        })) {
            Ok(ended) => ended,
            Err(panic) => {
                tracing::error!(
                    vm = id,
                    pid = peer.pid,
                    panic = panic_message(&*panic),
                    "the VM's worker panicked; draining the VM so that it runs on"
                );
                Ended::Panicked
            }
        };
        // A VM still running when the server stops keeps its own copy of
        // the userfaultfd: closing ours would leave its next missing page
        // waiting forever. Make it independent first.
        let mut handed = None;
        let drain = if ended == Ended::HandedOver {
            handed = vm.hand_over();
            if handed.is_none() {
                tracing::error!(
                    vm = id,
                    pid = peer.pid,
                    "the VM could not be handed over; draining it"
                );
                let drain = vm.detach(self.drain_timeout);
                log_drain(id, peer.pid, &drain);
                Some(drain)
            } else {
                None
            }
        } else if ended == Ended::Panicked || (ended == Ended::Shutdown && !vm.is_finished()) {
            let drain = vm.detach(self.drain_timeout);
            log_drain(id, peer.pid, &drain);
            Some(drain)
        } else {
            vm.shutdown();
            None
        };
        // The new server records on: only a VM that stays here is saved,
        // and not from an engine that just panicked.
        let recorded = if handed.is_none() && ended != Ended::Panicked {
            self.save_working_set(vm.as_ref(), peer.pid)
        } else {
            None
        };
        let report = VmReport {
            vm: id,
            pid: peer.pid,
            uid: peer.uid,
            memory_bytes,
            page_size,
            seconds: started.elapsed().as_secs_f64(),
            ended,
            engine: vm.stats(),
            recorded_pages: recorded,
            drain,
        };
        drop(vm);
        if let Some(HandedOver {
            uffd,
            pidfd: Some(pidfd),
            state,
        }) = handed
        {
            let _ = self.handed.send(HandedVm {
                id,
                peer,
                page_size,
                memory_bytes,
                uffd,
                pidfd,
                state,
            });
        }
        log_report(&report);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.stats.push(report);
        if let Err(e) = write_stats(&self.stats, self.stats_json.as_deref()) {
            tracing::warn!("{e}");
        }
    }

    /// Watches the VM until its VMM exits, the server stops or a new
    /// server takes it over; writes its working set on request meanwhile.
    pub(super) fn watch(
        &self,
        vm: &dyn RunningVm,
        pid: i32,
        mut vmm_exit: Option<OwnedFd>,
    ) -> Ended {
        let mut seen_generation = self.handle.inner.record_generation.load(SeqCst);
        // The VMM's exit wakes this loop at once through its pidfd, and
        // shutdown or takeover through the stop eventfd; the timeout only
        // bounds how late a request to write the working set, or the exit
        // of a child the VM forked, is seen. Without a pidfd, and once it
        // has fired, the loop looks every 20 ms instead.
        loop {
            if self.handle.is_handing_over() {
                return Ended::HandedOver;
            }
            if self.handle.is_stopping() {
                return Ended::Shutdown;
            }
            if vm.is_finished() {
                return Ended::VmmExited;
            }
            let generation = self.handle.inner.record_generation.load(SeqCst);
            if generation != seen_generation {
                seen_generation = generation;
                self.save_working_set(vm, pid);
            }
            let mut fds = vec![PollFd::new(&self.handle.inner.stop, PollFlags::IN)];
            if let Some(fd) = &vmm_exit {
                fds.push(PollFd::new(fd, PollFlags::IN));
            }
            let ms = if vmm_exit.is_some() { 200 } else { 20 };
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: ms * 1_000_000,
            };
            let _ = rustix::event::poll(&mut fds, Some(&ts));
            if fds.get(1).is_some_and(|fd| !fd.revents().is_empty()) {
                // Readable from now on: the engine sees the exit through
                // its own pidfd, and this loop looks every 20 ms until it
                // has.
                drop(fds);
                vmm_exit = None;
            }
        }
    }

    pub(super) fn refuse(&self, stream: &UnixStream, e: HandshakeError) {
        let pid = handshake::peer_of(stream).ok().map(|p| p.pid);
        tracing::warn!(
            vm = self.id,
            pid,
            step = e.step(),
            "connection refused: {e}"
        );
        self.stats.refuse(Refusal {
            step: e.step(),
            reason: e.to_string(),
            pid,
        });
    }

    /// Writes the VM's working set if recording; returns its page count.
    pub(super) fn save_working_set(&self, vm: &dyn RunningVm, pid: i32) -> Option<u64> {
        let template = self.record.as_ref()?;
        // Losing a recording is better than losing the VM's report.
        let ws = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.working_set())) {
            Ok(ws) => ws?,
            Err(panic) => {
                tracing::error!(
                    vm = self.id,
                    pid,
                    panic = panic_message(&*panic),
                    "taking the working set panicked; not recorded"
                );
                return None;
            }
        };
        let path = PathBuf::from(
            template
                .to_string_lossy()
                .replace("{pid}", &pid.to_string())
                .replace("{vm}", &self.id.to_string()),
        );
        match ws.save(&path) {
            Ok(()) => {
                tracing::info!(vm = self.id, pages = ws.len(), path = %path.display(), "working set written");
                Some(ws.len() as u64)
            }
            Err(e) => {
                tracing::warn!(vm = self.id, "writing the working set failed: {e}");
                None
            }
        }
    }
}

pub(super) fn log_drain(vm: u64, pid: i32, d: &DrainReport) {
    match d.outcome {
        DrainOutcome::Released => tracing::info!(
            vm,
            pid,
            installed_pages = d.installed_pages,
            unregistered_mib =
                format_args!("{:.1}", d.unregistered_bytes as f64 / (1 << 20) as f64),
            poisoned_pages = d.poisoned_pages,
            "released: every page installed and unregistered; the VM runs on without the server"
        ),
        DrainOutcome::Incomplete => {
            for r in &d.still_registered {
                tracing::error!(
                    vm,
                    pid,
                    start = format_args!("{:#x}", r.start),
                    len = r.len,
                    why = %r.why,
                    "range stays registered with no server: the VM will wait on a fault there"
                );
            }
            tracing::error!(
                vm,
                pid,
                installed_pages = d.installed_pages,
                unregistered_mib =
                    format_args!("{:.1}", d.unregistered_bytes as f64 / (1 << 20) as f64),
                ranges = d.still_registered.len(),
                "drain incomplete"
            );
        }
        other => tracing::warn!(
            vm,
            pid,
            outcome = ?other,
            error = d.error.as_deref(),
            "serving stopped without a drain: the VM waits on its next missing page"
        ),
    }
}

pub(super) fn log_report(r: &VmReport) {
    tracing::info!(
        vm = r.vm,
        pid = r.pid,
        ended = %r.ended,
        seconds = format_args!("{:.3}", r.seconds),
        faults = r.engine.faults,
        installed_mib = format_args!("{:.1}", r.engine.installed_bytes as f64 / (1 << 20) as f64),
        zero_pages = r.engine.zero_pages,
        prefetched_pages = r.engine.prefetched_pages,
        prefetch_hits = r.engine.prefetch_hits,
        removes = r.engine.removes,
        poisoned = r.engine.poisoned,
        p50_us = format_args!("{:.1}", r.engine.p50_us),
        p90_us = format_args!("{:.1}", r.engine.p90_us),
        p99_us = format_args!("{:.1}", r.engine.p99_us),
        max_us = format_args!("{:.1}", r.engine.max_us),
        "VM done"
    );
}
