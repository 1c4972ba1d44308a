//! The server's side of a takeover: taking every VM over from a running
//! server (`--takeover`), adopting each VM it sends, and handing this
//! server's VMs to a successor (the packets are [`crate::takeover`]'s).

use super::*;

impl Server {
    /// Takes every VM over from the server running on `config.socket`
    /// (see [`crate::takeover`]): its listening socket, and each VM's
    /// userfaultfd and pager state, served here from now on. The old server
    /// exits once this one has them all.
    pub fn take_over(config: ServerConfig, engine: Arc<dyn Engine>) -> Result<Server, ServerError> {
        if !engine.can_hand_over() {
            return Err(TakeoverError::Refused(format!(
                "the {} engine cannot take VMs over",
                engine.name()
            ))
            .into());
        }
        let path = takeover::takeover_path(&config.socket);
        let conn = takeover::connect_patiently(&path)?;
        let source = config.source_identity.clone().ok_or_else(|| {
            TakeoverError::Refused("this server does not know its memory file's identity".into())
        })?;
        let request = Packet::Request(takeover::Request {
            version: takeover::VERSION,
            source,
        });
        takeover::send(&conn, &request, &[], "sending the request")?;
        let (reply, mut fds) =
            takeover::recv(&conn, takeover::STEP_TIMEOUT, "waiting for the answer")?;
        let listener = match (reply, fds.len()) {
            (Packet::Accepted, 1) => UnixListener::from(fds.remove(0)),
            (Packet::Refused { reason }, _) => return Err(TakeoverError::Refused(reason).into()),
            (other, n) => {
                return Err(TakeoverError::Protocol {
                    step: "waiting for the answer",
                    problem: format!(
                        "expected the listening socket, got {other:?} with {n} descriptors"
                    ),
                }
                .into())
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                path: config.socket.clone(),
                source,
            })?;
        let server = Server::new(listener, None, config, engine)?;
        let mut adopted = 0u64;
        loop {
            let (packet, fds) = match takeover::recv(&conn, takeover::STEP_TIMEOUT, "receiving VMs")
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(
                        adopted,
                        "the old server stopped before handing every VM over ({e}); any VM it did not send has no handler now"
                    );
                    break;
                }
            };
            match packet {
                Packet::Vm(header) => match server.adopt(&header, fds) {
                    Ok(()) => adopted += 1,
                    Err(e) => tracing::error!(
                        vm = header.vm,
                        pid = header.pid,
                        "cannot carry on serving the VM: {e}"
                    ),
                },
                Packet::Done { vms } => {
                    if vms != adopted {
                        tracing::error!(
                            sent = vms,
                            adopted,
                            "some handed-over VMs could not be served"
                        );
                    }
                    if let Err(e) = takeover::send(
                        &conn,
                        &Packet::Adopted { vms: adopted },
                        &[],
                        "acknowledging",
                    ) {
                        tracing::warn!("{e}");
                    }
                    break;
                }
                other => {
                    tracing::error!(
                        ?other,
                        "unexpected takeover packet; stopping the takeover here"
                    );
                    break;
                }
            }
        }
        tracing::info!(vms = adopted, "took over");
        *lock(&server.predecessor) = Some(conn);
        Ok(server)
    }

    /// Starts serving a VM another server handed over.
    pub(super) fn adopt(
        &self,
        header: &takeover::VmHeader,
        fds: Vec<OwnedFd>,
    ) -> Result<(), String> {
        let [uffd, pidfd, state]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|fds: Vec<OwnedFd>| format!("expected 3 descriptors, got {}", fds.len()))?;
        if header.page_size != crate::protocol::PAGE_4K
            && header.page_size != crate::protocol::PAGE_2M
        {
            return Err(format!("unsupported page size {}", header.page_size));
        }
        let state = takeover::read_state(state, header).map_err(|e| e.to_string())?;
        let vmm_exit = pidfd.try_clone().ok();
        let uffd = uffd::Uffd::from_fd(uffd, uffd::Features::EVENT_REMOVE)
            .map_err(|e| format!("not a userfaultfd: {e}"))?;
        let vm = self
            .engine
            .resume(uffd, header.pid, pidfd, header.page_size, state)
            .map_err(|e| e.to_string())?;
        let id = self.next_id.fetch_add(1, SeqCst);
        let peer = Peer {
            pid: header.pid,
            uid: header.uid,
            gid: 0,
        };
        tracing::info!(
            vm = id,
            previous_vm = header.vm,
            pid = header.pid,
            "serving a handed-over VM"
        );
        let worker = self.worker(id);
        let slot = ActiveSlot::take(&self.active);
        let (page_size, memory_bytes) = (header.page_size, header.memory_bytes);
        let thread = std::thread::Builder::new()
            .name(format!("uffd-vm-{id}"))
            .spawn(move || {
                let _slot = slot;
                worker.serve(peer, vm, vmm_exit, page_size, memory_bytes);
            })
            .map_err(|e| format!("cannot start a thread for the VM: {e}"))?;
        lock(&self.workers).push(thread);
        Ok(())
    }

    /// A server that took over binds `<socket>.takeover` (for the next
    /// upgrade) once its predecessor, which owned that path, has closed
    /// its end.
    pub(super) fn bind_takeover_once_predecessor_left(&self) {
        {
            let mut predecessor = lock(&self.predecessor);
            if let Some(conn) = predecessor.as_ref() {
                let mut fds = [PollFd::new(conn, PollFlags::IN)];
                let now = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                if !rustix::event::poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0) {
                    return;
                }
                if !fds[0].revents().contains(PollFlags::HUP) {
                    // Readable: end of file, or a packet nobody asked for.
                    let mut byte = [0u8; 1];
                    if !matches!(rustix::io::read(conn, &mut byte), Ok(0) | Err(_)) {
                        return;
                    }
                }
                *predecessor = None;
                *lock(&self.bind_takeover_until) = Some(Instant::now() + Duration::from_secs(30));
            }
        }
        let mut until = lock(&self.bind_takeover_until);
        let Some(deadline) = *until else {
            return;
        };
        match bind_takeover(&self.config.socket) {
            Ok(fd) => {
                *lock(&self.takeover) = Some(fd);
                *until = None;
                tracing::info!(
                    "the previous server is gone; taking over from this one is possible now"
                );
            }
            Err(e) if Instant::now() >= deadline => {
                *until = None;
                tracing::warn!("the next takeover will not be possible: {e}");
            }
            Err(_) => {}
        }
    }

    /// An accepted connection on the takeover socket, if one is waiting.
    pub(super) fn takeover_request(&self) -> Option<OwnedFd> {
        let takeover = lock(&self.takeover);
        let listener = takeover.as_ref()?;
        match rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(conn) => Some(conn),
            Err(Errno::AGAIN | Errno::INTR) => None,
            Err(errno) => {
                tracing::warn!("accepting on the takeover socket failed: {errno}");
                None
            }
        }
    }

    /// Answers a takeover request on `conn`; `Ok(true)` once every VM went
    /// to the new server, which also holds the VMM socket now.
    pub(super) fn hand_over(&self, conn: &OwnedFd) -> Result<bool, TakeoverError> {
        let refuse = |reason: String| -> Result<bool, TakeoverError> {
            tracing::warn!("takeover refused: {reason}");
            takeover::send(conn, &Packet::Refused { reason }, &[], "refusing")?;
            Ok(false)
        };
        if !takeover::peer_is_trusted(conn) {
            return refuse("the requesting process runs as another user".into());
        }
        let (packet, _) = takeover::recv(conn, Duration::from_secs(5), "reading the request")?;
        let Packet::Request(request) = packet else {
            return refuse(format!("expected a request, got {packet:?}"));
        };
        if request.version != takeover::VERSION {
            return refuse(format!(
                "protocol version {} requested, this server speaks {}",
                request.version,
                takeover::VERSION
            ));
        }
        let Some(own) = &self.config.source_identity else {
            return refuse("this server does not know its memory file's identity".into());
        };
        if &request.source != own {
            return refuse(format!(
                "the new server serves another memory file ({}, this one {own}): VMs restore from the file they started with",
                request.source
            ));
        }
        if !self.engine.can_hand_over() {
            return refuse(format!(
                "the {} engine cannot hand VMs over",
                self.engine.name()
            ));
        }
        tracing::info!("takeover requested: handing every VM to the new server");
        self.handle.inner.handing_over.store(true, SeqCst);
        takeover::send(
            conn,
            &Packet::Accepted,
            &[self.listener.as_fd()],
            "sending the listening socket",
        )?;
        takeover::pause_point("accepted");
        // Every worker hands its VM over (one still in its handshake does
        // so right after it); collect until all have ended.
        let mut sent = 0u64;
        let handed = lock(&self.handed.1);
        loop {
            let all_ended = lock(&self.workers).iter().all(JoinHandle::is_finished);
            match handed.recv_timeout(Duration::from_millis(20)) {
                Ok(vm) => {
                    let (memfd, state_bytes) =
                        takeover::state_memfd(&vm.state).map_err(|e| TakeoverError::Io {
                            step: "writing a VM's state",
                            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
                        })?;
                    let header = takeover::VmHeader {
                        vm: vm.id,
                        pid: vm.peer.pid,
                        uid: vm.peer.uid,
                        page_size: vm.page_size,
                        memory_bytes: vm.memory_bytes,
                        state_bytes,
                    };
                    takeover::send(
                        conn,
                        &Packet::Vm(header),
                        &[vm.uffd.as_fd(), vm.pidfd.as_fd(), memfd.as_fd()],
                        "sending a VM",
                    )?;
                    sent += 1;
                    tracing::info!(vm = vm.id, pid = vm.peer.pid, "handed over");
                    if sent == 1 {
                        takeover::pause_point("sent-one");
                    }
                }
                Err(_) if all_ended => break,
                Err(_) => {}
            }
        }
        drop(handed);
        takeover::send(conn, &Packet::Done { vms: sent }, &[], "finishing")?;
        takeover::pause_point("sent-all");
        match takeover::recv(conn, takeover::STEP_TIMEOUT, "waiting for the new server") {
            Ok((Packet::Adopted { vms }, _)) => {
                tracing::info!(vms, "the new server took every VM over")
            }
            Ok((other, _)) => {
                tracing::warn!(?other, "unexpected answer; the VMs were handed over anyway")
            }
            Err(e) => tracing::warn!("{e}; the VMs were handed over anyway"),
        }
        takeover::pause_point("adopted");
        Ok(true)
    }
}
