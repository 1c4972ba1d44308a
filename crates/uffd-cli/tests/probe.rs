//! `uffd probe` end to end: the JSON a script reads, and the explanation an
//! unprivileged user gets.

use std::process::Command;

fn uffd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_uffd"))
}

#[test]
fn json_names_every_feature_and_open_path() {
    let out = uffd().args(["probe", "--json"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).expect("probe --json is JSON");
    assert!(report["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    let features = report["features"].as_object().expect("features object");
    assert_eq!(features.len(), 17, "{features:?}");
    for (_, name) in uffd::Features::named() {
        assert!(features.contains_key(name), "missing {name}");
    }
    let open = report["open"].as_object().expect("open object");
    for way in ["syscall", "syscall_user_mode_only", "dev_userfaultfd"] {
        assert!(open[way]["ok"].is_boolean(), "{way}");
    }
    let any_open = open.values().any(|o| o["ok"] == true);
    assert_eq!(
        out.status.success(),
        any_open,
        "exit status follows openability"
    );
    if !any_open {
        return uffd_testkit::skip(
            uffd_testkit::Need::Userfaultfd,
            format_args!("userfaultfd denied here; the report explains: {text}"),
        );
    }
    // The kernel's own answer decides what the report must say.
    let supported = uffd::probe().unwrap().features;
    for (feature, name) in uffd::Features::named() {
        assert_eq!(features[name], supported.contains(feature), "{name}");
    }
    let anon = report["ioctls"]["anon"].as_array().expect("anon ioctls");
    assert!(anon.iter().any(|i| i == "COPY"), "{anon:?}");
    if supported.contains(uffd::Features::MINOR_SHMEM) {
        let shmem = report["ioctls"]["shmem"].as_array().expect("shmem ioctls");
        assert!(shmem.iter().any(|i| i == "CONTINUE"), "{shmem:?}");
    }
    assert!(
        report["ioctls"].get("hugetlb").is_some() || report["unavailable"].get("hugetlb").is_some()
    );
}

#[test]
fn unprivileged_user_gets_an_explanation_not_a_panic() {
    if !rustix::process::getuid().is_root() {
        return uffd_testkit::skip(
            uffd_testkit::Need::Root,
            format_args!("needs root to switch to an unprivileged user"),
        );
    }
    let setpriv = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_uffd"))
        .arg("probe")
        .output();
    let Ok(out) = setpriv else {
        return uffd_testkit::skip(
            uffd_testkit::Need::Tool,
            format_args!("setpriv is not installed"),
        );
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "{:?} {err}",
        out.status
    );
    assert!(text.contains("uid 65534"), "{text}");
    // Whatever this machine's policy, every refusal carries a remedy.
    for line in text
        .lines()
        .filter(|l| l.contains("EPERM") || l.contains("EACCES"))
    {
        assert!(
            line.contains("CAP_SYS_PTRACE")
                || line.contains("/dev/userfaultfd is not readable")
                || line.contains("seccomp"),
            "refusal without a remedy: {line}"
        );
    }
}
