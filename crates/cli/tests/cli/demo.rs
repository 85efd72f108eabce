//! (9) `teamcity-scim demo` runs, prints the final TeamCity state, and stops cleanly on SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{BIN, signal};

#[test]
fn demo_prints_the_final_teamcity_state_and_stops_on_sigint() {
    let mut child = Command::new(BIN)
        .arg("demo")
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
