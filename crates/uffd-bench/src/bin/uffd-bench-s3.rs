//! Restoring from object storage, measured: a snapshot pushed to a real S3
//! server (s3s-fs on loopback) behind a proxy adding a delay to every
//! request (a user-space link emulator: this kernel has no netem), then
//! restored by the stand-in VMM (a separate process touching a working set
//! in random order and verifying every page it touched) through
//! `uffd serve` in another process:
//!
//! ```text
//! on_demand        uffd serve --source s3://...            (cold cache)
//! prefetch         uffd serve --source s3://... --prefetch WS   (cold cache)
//! warm             a second VM on the on-demand server     (warm cache)
//! local_file       uffd serve --mem-file FILE
//! download_first   uffd snapshot pull, then serve that file (pull included)
//! ```
//!
//! The snapshot is pushed with its working set packed first (`push
//! --working-set`), as a fleet would push it; then the bytes uploaded
//! when pushing a second snapshot that differs from the first in
//! --changed-percent of its pages (scattered at random) against the first
//! as its parent (`push --parent`). Ratios: download_first /
//! prefetch (goal >= 5), local_file / warm (goal >= 0.9), uploaded share
//! of the changed push (goal <= 0.10). One round; the figures are the
//! caller's to judge (the load average is printed beside them).
//!
//! ```text
//! uffd-bench-s3 [--mib 1024] [--working-set-percent 10] [--delay-ms 5]
//!     [--chunk-size-kib 4096] [--changed-percent 5] [--vcpus 2] [--json]
//! ```
//!
//! The `uffd` and `uffd-standin-vmm` binaries are found next to this one
//! (`cargo build --release --workspace --all-features`). Exit status: 0
//! when every touched page matched, 1 otherwise or on an error.

#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use uffd_bench::fixtures::{make_snapshot, shuffled, write_page_list};
use uffd_testkit::s3::{aws_env, Proxy, S3Server, BUCKET};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Options {
    mib: u64,
    working_set_percent: u64,
    delay_ms: u64,
    chunk_kib: u32,
    changed_percent: u64,
    vcpus: usize,
    json: bool,
}

fn parse() -> Result<Options, String> {
    let mut o = Options {
        mib: 1024,
        working_set_percent: 10,
        delay_ms: 5,
        chunk_kib: 4096,
        changed_percent: 5,
        vcpus: 2,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = || -> Result<u64, String> {
            args.next()
                .ok_or(format!("{a} needs a value"))?
                .parse()
                .map_err(|e| format!("{a}: {e}"))
        };
        match a.as_str() {
            "--mib" => o.mib = number()?.max(1),
            "--working-set-percent" => o.working_set_percent = number()?.clamp(1, 100),
            "--delay-ms" => o.delay_ms = number()?,
            "--chunk-size-kib" => o.chunk_kib = number()? as u32,
            "--changed-percent" => o.changed_percent = number()?.min(100),
            "--vcpus" => o.vcpus = number()?.max(1) as usize,
            "--json" => o.json = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("uffd-bench-s3: {e}");
            return ExitCode::from(1);
        }
    };
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("uffd-bench-s3: {e}");
            ExitCode::from(1)
        }
    }
}

fn beside(name: &str) -> Result<PathBuf, BoxError> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        return Err(format!(
            "{} not found: build the workspace first (cargo build --release --workspace --all-features)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// A `uffd serve` process, stopped (SIGTERM, then SIGKILL) on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(
        uffd: &Path,
        env: &[(String, String)],
        dir: &Path,
        name: &str,
        args: &[&str],
    ) -> Result<Server, BoxError> {
        let socket = dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(uffd)
            .envs(env.iter().cloned())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stderr(log)
            .spawn()?;
        let mut server = Server { child, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.socket.exists() {
            if let Some(status) = server.child.try_wait()? {
                return Err(format!(
                    "uffd serve ({name}) exited at start: {status}; see {name}.log"
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err(format!("uffd serve ({name}) did not listen within 60 s").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One VM restore: (restore-to-done seconds, mismatched pages).
fn restore(
    vmm: &Path,
    server: &Server,
    mem: &Path,
    touch: &Path,
    vcpus: usize,
) -> Result<(f64, u64), BoxError> {
    let mut child = Command::new(vmm)
        .arg("--socket")
        .arg(&server.socket)
        .arg("--mem-file")
        .arg(mem)
        .arg("--threads")
        .arg(vcpus.to_string())
        .arg("--touch-list")
        .arg(touch)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let status = child.wait()?;
    let report: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("the stand-in VMM ({status}) reported {line:?}: {e}"))?;
    let seconds = report["touch_seconds"].as_f64().ok_or("no touch_seconds")?;
    let mismatched = report["mismatched_pages"].as_u64().unwrap_or(u64::MAX);
    Ok((seconds, mismatched))
}

fn progress(what: &str) {
    eprintln!("uffd-bench-s3: {what}");
}

fn run(o: &Options) -> Result<bool, BoxError> {
    let uffd = beside("uffd")?;
    let vmm = beside("uffd-standin-vmm")?;
    let scratch = uffd_testkit::Scratch::new("bench-s3");
    let dir = scratch.dir();
    let len = o.mib << 20;
    let load_start = uffd_bench::report::LoadAverage::now()?;
    progress(&format!("writing a {} MiB snapshot", o.mib));
    let snap = make_snapshot(dir, len, 30)?;
    let pages = len / 4096;
    let mut ws_pages = shuffled(pages, 0x5EED);
    ws_pages.truncate((pages * o.working_set_percent).div_ceil(100) as usize);
    let touch = dir.join("touch.list");
    write_page_list(&touch, &ws_pages)?;
    let ws_file = dir.join("vm.ws");
    let ws = uffd_pager::WorkingSet::new(4096, ws_pages.iter().map(|p| p * 4096).collect())
        .with_source_len(len);
    ws.save(&ws_file)?;

    let s3 = S3Server::start();
    let proxy = Proxy::start(s3.addr());
    proxy.set_delay(Duration::from_millis(o.delay_ms));
    let env = aws_env(&proxy.endpoint());
    let store_options = uffd_store::StoreOptions {
        config: env
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        ..uffd_store::StoreOptions::default()
    };
    let url = format!("s3://{BUCKET}/bench/vm");
    let rt = uffd_store::io_runtime()?;
    progress("pushing it, working set first");
    let location = uffd_store::Location::open(&url, &store_options)?;
    let chunk_size = o.chunk_kib << 10;
    let pushed = rt.block_on(uffd_store::snapshot::push(
        &snap.path,
        &location,
        &uffd_store::PushOptions {
            working_set: Some(&ws),
            ..uffd_store::PushOptions::new(chunk_size)
        },
        &|_, _| {},
    ))?;

    let mut mismatched = 0u64;
    let mut case = |name: &str, server: &Server| -> Result<f64, BoxError> {
        progress(&format!("restoring: {name}"));
        let (s, m) = restore(&vmm, server, &snap.path, &touch, o.vcpus)?;
        mismatched += m;
        Ok(s)
    };
    let (on_demand, warm) = {
        let server = Server::start(&uffd, &env, dir, "on-demand", &["--source", &url])?;
        (case("on demand", &server)?, case("warm cache", &server)?)
    };
    let prefetch = {
        let ws = ws_file.to_str().ok_or("path")?;
        let server = Server::start(
            &uffd,
            &env,
            dir,
            "prefetch",
            &["--source", &url, "--prefetch", ws],
        )?;
        case("prefetch", &server)?
    };
    let mem = snap.path.to_str().ok_or("path")?.to_string();
    let local_file = {
        let server = Server::start(&uffd, &env, dir, "local", &["--mem-file", &mem])?;
        case("local file", &server)?
    };
    let download_first = {
        let started = Instant::now();
        let pulled = dir.join("pulled.mem");
        progress("download first: pulling");
        let status = Command::new(&uffd)
            .envs(env.iter().cloned())
            .args(["snapshot", "pull", "--from", &url, "--to"])
            .arg(&pulled)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(format!("uffd snapshot pull failed: {status}").into());
        }
        let pulled = pulled.to_str().ok_or("path")?.to_string();
        let server = Server::start(&uffd, &env, dir, "download-first", &["--mem-file", &pulled])?;
        let setup = started.elapsed().as_secs_f64();
        setup + case("download first", &server)?
    };

    progress(&format!(
        "pushing a snapshot with {}% of its pages changed, against the first as its parent",
        o.changed_percent
    ));
    let changed = dir.join("changed.mem");
    std::fs::copy(&snap.path, &changed)?;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&changed)?;
        let mut which = shuffled(pages, 0xC4A9);
        which.truncate((pages * o.changed_percent).div_ceil(100) as usize);
        for p in which {
            f.write_all_at(&[0xA5, 0x5A, 0xC3, 0x3C], p * 4096 + 8)?;
        }
    }
    let second =
        uffd_store::Location::open(&format!("s3://{BUCKET}/bench/vm-changed"), &store_options)?;
    let changed_push = rt.block_on(uffd_store::snapshot::push(
        &changed,
        &second,
        &uffd_store::PushOptions {
            parent: Some(&location),
            ..uffd_store::PushOptions::new(chunk_size)
        },
        &|_, _| {},
    ))?;

    let load_end = uffd_bench::report::LoadAverage::now()?;
    let report = serde_json::json!({
        "mib": o.mib,
        "working_set_pages": ws_pages.len(),
        "delay_ms": o.delay_ms,
        "chunk_size": chunk_size,
        "vcpus": o.vcpus,
        "seconds": {
            "on_demand": on_demand,
            "prefetch": prefetch,
            "warm": warm,
            "local_file": local_file,
            "download_first": download_first,
        },
        "ratios": {
            "download_first_vs_prefetch": download_first / prefetch,
            "download_first_vs_on_demand": download_first / on_demand,
            "warm_vs_local_file": local_file / warm,
        },
        "push": pushed,
        "changed_push": changed_push,
        "changed_push_upload_share": changed_push.uploaded_bytes as f64 / len as f64,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "mismatched_pages": mismatched,
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{} MiB snapshot, {} working-set pages, {} ms added per request, {} KiB chunks, {} vCPUs", o.mib, ws_pages.len(), o.delay_ms, o.chunk_kib, o.vcpus)?;
        for (name, s) in [
            ("on demand", on_demand),
            ("prefetch", prefetch),
            ("warm cache", warm),
            ("local file", local_file),
            ("download first", download_first),
        ] {
            writeln!(out, "  {name:<15} {s:>9.3} s")?;
        }
        writeln!(
            out,
            "  download first / prefetch   {:.2}x (goal >= 5)",
            download_first / prefetch
        )?;
        writeln!(
            out,
            "  local file / warm cache     {:.2}x (goal >= 0.9)",
            local_file / warm
        )?;
        writeln!(
            out,
            "  changed push uploaded       {:.1}% of the image (goal <= 10%)",
            100.0 * changed_push.uploaded_bytes as f64 / len as f64
        )?;
        writeln!(
            out,
            "  load average {:.2} at start, {:.2} at end",
            load_start.one, load_end.one
        )?;
    }
    if mismatched > 0 {
        eprintln!("uffd-bench-s3: {mismatched} pages did not match the snapshot");
    }
    Ok(mismatched == 0)
}
