//! (9) `teamcity-scim demo` runs, prints the final TeamCity state, and stops cleanly on SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{BIN, signal};

/// Runs `demo` with `args` until it is ready; returns its output so far, the child and the
/// channel of later lines.
fn start(
    args: &[&str],
) -> (
    String,
    std::process::Child,
    mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let mut child = Command::new(BIN)
        .arg("demo")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
                if line.contains("Press Ctrl-C to stop.") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    if !ready {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the demo did not get ready within 20 s:\n{out}");
    }
    (out, child, rx, reader)
}

/// Stops the demo with SIGINT and checks it ends cleanly.
fn stop(
    mut child: std::process::Child,
    rx: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
) {
    signal(child.id(), "INT");
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().expect("wait");
        let _ = done_tx.send(());
        status
    });
    let exited = done_rx.recv_timeout(Duration::from_secs(10)).is_ok();
    assert!(exited, "the demo did not stop within 10 s of SIGINT");
    let status = waiter.join().expect("join");
    assert!(status.success(), "exit status {status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    let _ = reader.join();
    let rest: Vec<String> = rest.into_iter().chain(rx.try_iter()).collect();
    assert!(rest.iter().any(|l| l.contains("Demo stopped.")), "{rest:?}");
}

#[test]
fn demo_prints_the_final_teamcity_state_and_stops_on_sigint() {
    let (out, child, rx, reader) = start(&[]);
    assert!(out.contains("TeamCity now holds:"), "{out}");
    assert!(
        out.contains("Platform Engineering"),
        "renamed group listed:\n{out}"
    );
    assert!(out.contains("Mobile Apps"), "{out}");
    assert!(out.contains("SCIM: default roles"), "{out}");
    assert!(out.contains("a no-op push (0 TeamCity calls)"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("bob@example.com")
            && l.contains("deactivated")
            && l.contains("tokens: 0")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("admin") && l.contains("(local)")),
        "{out}"
    );

    stop(child, rx, reader);
}

#[test]
fn demo_with_the_graph_source_pulls_the_same_story() {
    let (out, child, rx, reader) = start(&["--source", "graph"]);
    assert!(
        out.contains("Pulled the directory from a Microsoft Graph fake"),
        "{out}"
    );
    assert!(
        out.contains("a pull with no change (0 TeamCity calls)"),
        "{out}"
    );
    assert!(out.contains("Platform Engineering"), "{out}");
    assert!(out.contains("Mobile Apps"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("bob@contoso.example")
            && l.contains("deactivated")
            && l.contains("tokens: 0")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("alice@contoso.example")
            && l.contains("Platform Engineering")
            && l.contains("Mobile Apps")),
        "{out}"
    );
    stop(child, rx, reader);
}
