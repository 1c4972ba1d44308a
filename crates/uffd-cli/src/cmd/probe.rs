//! `uffd probe`: what this kernel supports and what this user may open.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::Serialize;
use uffd::{
    Features, Mapping, MemoryKind, OpenFailure, OpenMethod, OpenOptions, OpenPath, RegisterMode,
};

use super::CmdResult;

/// Report the kernel's userfaultfd support: open paths and privileges,
/// every feature by name, and the ioctls each memory type offers.
///
/// Output: a report in sections (how a userfaultfd can be opened by this
/// user and why a path is refused, the API's features, each memory type's
/// ioctls); `--json` prints the same as one object.
///
/// Exit status: 0 when a userfaultfd can be opened at all, 2 when every
/// path is refused (the explanation says what to change).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    kernel: String,
    uid: u32,
    unprivileged_userfaultfd: Option<String>,
    open: BTreeMap<&'static str, OpenReport>,
    features: BTreeMap<&'static str, bool>,
    /// The union of ioctls a registration advertises, per memory type.
    ioctls: BTreeMap<&'static str, Vec<&'static str>>,
    /// Per memory type and register mode, the advertised ioctls, or why the
    /// mode cannot be registered.
    register: BTreeMap<&'static str, BTreeMap<&'static str, ModeReport>>,
    /// Memory types that could not be probed, with the reason.
    unavailable: BTreeMap<&'static str, String>,
    hugepages_free: u64,
    /// Whether this process holds CAP_SYS_PTRACE, which EVENT_FORK needs.
    can_ptrace: bool,
}

#[derive(Debug, Serialize)]
struct OpenReport {
    ok: bool,
    catches_kernel_faults: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ModeReport {
    Ioctls(Vec<&'static str>),
    Refused { refused: String },
}

const OPEN_WAYS: [(&str, OpenPath, bool); 3] = [
    ("syscall", OpenPath::Syscall, false),
    ("syscall_user_mode_only", OpenPath::Syscall, true),
    ("dev_userfaultfd", OpenPath::DevNode, false),
];

/// Runs the probe.
pub fn run(args: Args) -> CmdResult {
    let report = gather();
    let any_open = report.open.values().any(|o| o.ok);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if any_open {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn gather() -> Report {
    let kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut open = BTreeMap::new();
    let mut working = None;
    for (name, path, user_mode_only) in OPEN_WAYS {
        let flags = if user_mode_only { 1 } else { 0 } | rustix::fs::OFlags::CLOEXEC.bits();
        let report = match uffd::open_with(path, flags) {
            Ok(_fd) => {
                if working.is_none() || !user_mode_only {
                    working = Some((path, user_mode_only));
                }
                OpenReport {
                    ok: true,
                    catches_kernel_faults: !user_mode_only,
                    error: None,
                }
            }
            Err(errno) => OpenReport {
                ok: false,
                catches_kernel_faults: !user_mode_only,
                error: Some(
                    OpenFailure {
                        path,
                        user_mode_only,
                        errno,
                    }
                    .to_string(),
                ),
            },
        };
        open.insert(name, report);
    }

    let mut report = Report {
        kernel,
        uid: rustix::process::getuid().as_raw(),
        unprivileged_userfaultfd: std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
            .ok()
            .map(|s| s.trim().to_string()),
        open,
        features: BTreeMap::new(),
        ioctls: BTreeMap::new(),
        register: BTreeMap::new(),
        unavailable: BTreeMap::new(),
        hugepages_free: uffd::free_hugepages(),
        can_ptrace: has_cap_sys_ptrace(),
    };

    let Some((path, user_mode_only)) = working else {
        for (_, name) in Features::named() {
            report.features.insert(name, false);
        }
        return report;
    };
    let method = match path {
        OpenPath::Syscall => OpenMethod::Syscall,
        OpenPath::DevNode => OpenMethod::DevNode,
    };
    let options = OpenOptions::new()
        .method(method)
        .user_mode_only(user_mode_only);
    let supported = match uffd::probe_with(options) {
        Ok(info) => info.features,
        Err(e) => {
            report.unavailable.insert("all", e.to_string());
            Features::empty()
        }
    };
    for (feature, name) in Features::named() {
        report.features.insert(name, supported.contains(feature));
    }

    // Features that need no privilege beyond opening; EVENT_FORK needs
    // CAP_SYS_PTRACE and has no bearing on which ioctls a range offers.
    let wanted = supported - Features::EVENT_FORK - Features::SIGBUS - Features::WP_ASYNC;
    for kind in [MemoryKind::Anon, MemoryKind::Shmem, MemoryKind::Hugetlb] {
        match probe_kind(kind, options.features(wanted), supported) {
            Ok((union, modes)) => {
                report.ioctls.insert(kind.name(), union);
                report.register.insert(kind.name(), modes);
            }
            Err(reason) => {
                report.unavailable.insert(kind.name(), reason);
            }
        }
    }
    report
}

type KindReport = (Vec<&'static str>, BTreeMap<&'static str, ModeReport>);

fn probe_kind(
    kind: MemoryKind,
    options: OpenOptions,
    supported: Features,
) -> Result<KindReport, String> {
    if kind.is_hugetlb() && uffd::free_hugepages() == 0 {
        return Err(
            "no free 2 MiB huge pages are reserved; as root: echo 4 > /proc/sys/vm/nr_hugepages"
                .to_string(),
        );
    }
    let mapping = Mapping::new(kind, kind.page_size()).map_err(|e| e.to_string())?;
    let mut union = uffd::Ioctls::empty();
    let mut modes = BTreeMap::new();
    for (mode, name, needs) in [
        (RegisterMode::MISSING, "MISSING", kind.missing_feature()),
        (RegisterMode::WP, "WP", kind.wp_features()),
        (
            RegisterMode::MINOR,
            "MINOR",
            kind.minor_feature().unwrap_or(Features::empty()),
        ),
    ] {
        if mode == RegisterMode::MINOR && kind.minor_feature().is_none() {
            let refused = "anonymous memory has no page cache, so no minor faults".to_string();
            modes.insert(name, ModeReport::Refused { refused });
            continue;
        }
        if !supported.contains(needs) {
            let refused = format!("needs feature {}", needs - supported);
            modes.insert(name, ModeReport::Refused { refused });
            continue;
        }
        // A fresh fd per mode, so one mode's registration does not shadow another's.
        let uffd = options.open().map_err(|e| e.to_string())?;
        match uffd.register(mapping.addr(), mapping.len() as u64, mode) {
            Ok(ioctls) => {
                union |= ioctls;
                modes.insert(name, ModeReport::Ioctls(ioctls.names()));
            }
            Err(e) => {
                modes.insert(
                    name,
                    ModeReport::Refused {
                        refused: e.to_string(),
                    },
                );
            }
        }
    }
    Ok((union.names(), modes))
}

fn print_text(r: &Report) {
    println!("kernel      {}", r.kernel);
    println!(
        "user        uid {}, vm.unprivileged_userfaultfd = {}",
        r.uid,
        r.unprivileged_userfaultfd.as_deref().unwrap_or("(absent)")
    );
    println!();
    println!("opening a userfaultfd");
    for (name, _, _) in OPEN_WAYS {
        let o = &r.open[name];
        let what = match name {
            "syscall" => "userfaultfd(2), kernel faults too",
            "syscall_user_mode_only" => "userfaultfd(2), user-mode-only",
            _ => "/dev/userfaultfd",
        };
        match &o.error {
            None => println!("  ok       {what}"),
            Some(e) => println!("  refused  {what}\n           {e}"),
        }
    }
    if !r.open.values().any(|o| o.ok) {
        println!("\nuserfaultfd is not available to this process; see the reasons above.");
        return;
    }
    if r.open["syscall_user_mode_only"].ok && !r.open["syscall"].ok && !r.open["dev_userfaultfd"].ok
    {
        println!(
            "  note     only user-mode-only works: faults from this process's own code are \
             caught, but kernel accesses (read(2) into the range, KVM) fail with EFAULT"
        );
    }
    println!();
    let supported = r.features.values().filter(|v| **v).count();
    println!("features    {supported} of {} supported", r.features.len());
    for (_, name) in Features::named() {
        let mark = if r.features[name] { "yes" } else { "no " };
        let note = if name == "EVENT_FORK" && r.features[name] && !r.can_ptrace {
            "  (needs CAP_SYS_PTRACE, which this process lacks)"
        } else {
            ""
        };
        println!("  {mark}  {name}{note}");
    }
    println!();
    println!("ioctls a registration advertises");
    for (kind, modes) in &r.register {
        println!("  {kind}");
        for (mode, report) in modes {
            match report {
                ModeReport::Ioctls(list) => println!("    {mode:<8} {}", list.join(" ")),
                ModeReport::Refused { refused } => println!("    {mode:<8} refused: {refused}"),
            }
        }
    }
    for (kind, reason) in &r.unavailable {
        println!("  {kind}\n    unavailable: {reason}");
    }
}

/// CAP_SYS_PTRACE (bit 19) in the effective set, read from /proc.
fn has_cap_sys_ptrace() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) != 0)
}
