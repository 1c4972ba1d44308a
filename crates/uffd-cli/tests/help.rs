//! What a new user reads before running anything: every command's `--help`
//! says what it prints and what its exit status means, required flags are
//! shown as required, `--version` names the revision, and the completions
//! and man pages come from the same definitions.

use std::process::{Command, Output};

use uffd_testkit::Scratch;

fn uffd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uffd"))
        .args(args)
        .output()
        .expect("running uffd")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands `uffd <path> --help` lists, from its `Commands:` block.
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let text = stdout(&uffd(&args));
    let Some(block) = text.split("\nCommands:\n").nth(1) else {
        return Vec::new();
    };
    block
        .lines()
        .take_while(|l| l.starts_with("  "))
        // Wrapped descriptions continue further indented.
        .filter(|l| !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command below `uffd`, as argument paths.
fn every_command() -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut todo: Vec<Vec<String>> = subcommands(&[]).into_iter().map(|c| vec![c]).collect();
    while let Some(path) = todo.pop() {
        let refs: Vec<&str> = path.iter().map(String::as_str).collect();
        for sub in subcommands(&refs) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        all.push(path);
    }
    all
}

#[test]
fn every_help_states_its_output_and_exit_status() {
    let commands = every_command();
    assert!(
        commands.len() >= 10,
        "found only {commands:?} below `uffd --help`"
    );
    for path in commands {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = uffd(&args);
        assert!(
            out.status.success(),
            "uffd {} --help failed",
            path.join(" ")
        );
        let text = stdout(&out);
        // A command with subcommands of its own may leave that to them.
        if text.contains("\nCommands:\n") && !text.contains("Exit status") {
            continue;
        }
        assert!(
            text.contains("Exit status"),
            "`uffd {} --help` does not state its exit status:\n{text}",
            path.join(" ")
        );
        assert!(
            text.contains("Output"),
            "`uffd {} --help` does not say what it prints:\n{text}",
            path.join(" ")
        );
    }
}

#[test]
fn required_flags_are_shown_as_required() {
    let serve = stdout(&uffd(&["serve", "--help"]));
    assert!(
        serve.contains(
            "Usage: uffd serve [OPTIONS] --socket <PATH> <--mem-file <PATH>|--source <URL>>"
        ),
        "{serve}"
    );
    let man = stdout(&uffd(&["man", "--help"]));
    assert!(man.contains("Usage: uffd man --dir <DIR>"), "{man}");
    // And missing ones are named at once, with nothing started.
    let out = uffd(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--mem-file <PATH>") && err.contains("--socket <PATH>"),
        "{err}"
    );
    // `uffd serve bench` needs neither.
    let bench = uffd(&["serve", "bench", "--help"]);
    assert!(bench.status.success());
}

#[test]
fn version_names_the_build() {
    let out = uffd(&["--version"]);
    let text = stdout(&out);
    assert!(text.starts_with("uffd 0."), "{text}");
    assert!(
        text.contains("(git ") || text.contains("not built from a git checkout"),
        "{text}"
    );
}

#[test]
fn completions_and_man_pages_cover_every_command() {
    let commands = every_command();
    let bash = stdout(&uffd(&["completions", "bash"]));
    for path in &commands {
        let last = path.last().unwrap();
        assert!(bash.contains(last.as_str()), "bash completion lacks {last}");
    }
    assert!(uffd(&["completions", "zsh"]).status.success());
    assert!(!uffd(&["completions", "tcsh"]).status.success());

    let dir = Scratch::new("man");
    let out = uffd(&["man", "--dir", dir.dir().to_str().unwrap()]);
    assert!(out.status.success());
    for path in &commands {
        let page = dir.path(&format!("uffd-{}.1", path.join("-")));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
    }
    assert!(dir.path("uffd.1").exists());
}
