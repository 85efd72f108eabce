//! Every error class, as the client classifies TeamCity's answers.

use std::time::Duration;

use teamcity::{ErrorKind, Locator, NewGroup, NewUser, UserUpdate};
use teamcity_emulator::{Fault, FaultAction};

use crate::{client_for, options, start, start_with};

fn user(name: &str) -> NewUser {
    NewUser {
        username: name.into(),
        ..NewUser::default()
    }
}

#[tokio::test]
async fn duplicate_username_is_conflict_on_create_and_rename() {
    let (client, _emu) = start().await;
    let err = client
        .create_user(&user("ADMIN"))
        .await
        .expect_err("duplicate");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(err.status(), Some(400));
    let body = err.body().expect("body");
    assert!(body.mentions("DuplicateUserAccountException"));
    assert_eq!(
        body.message,
        "Cannot create user as user with the same username already exists"
    );

    let id = client
        .create_user(&user("other"))
        .await
        .expect("create")
        .id
        .expect("id");
    let err = client
        .update_user(
            &Locator::by_id(id),
            &UserUpdate {
                username: Some("Admin".into()),
                ..UserUpdate::default()
            },
        )
        .await
        .expect_err("rename onto admin");
    assert_eq!((err.kind(), err.status()), (ErrorKind::Conflict, Some(500)));
}

#[tokio::test]
async fn duplicate_group_key_or_name_is_conflict() {
    let (client, _emu) = start().await;
    let g = NewGroup {
        key: "K".into(),
        name: "N".into(),
        ..NewGroup::default()
    };
    client.create_group(&g).await.expect("create");
    for dup in [
        NewGroup {
            name: "other".into(),
            ..g.clone()
        },
        NewGroup {
            key: "K2".into(),
            ..g.clone()
        },
    ] {
        let err = client.create_group(&dup).await.expect_err("duplicate");
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    }
}

#[tokio::test]
async fn missing_users_are_not_found_even_with_bad_locators() {
    let (client, _emu, base) = start_with(options()).await;
    let err = client
        .get_user(&Locator::by_id(999), None)
        .await
        .expect_err("missing");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.body().expect("body").message, "User not found");
    // 404 masking: even a syntax error on a user path reads as "User not found".
    let resp = reqwest::Client::new()
        .get(format!("{base}/app/rest/users/username:a(b"))
        .bearer_auth(crate::TOKEN)
        .header("Accept", "application/json")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 404);
    assert!(
        resp.text()
            .await
            .expect("text")
            .contains("NotFoundException: User not found")
    );
    let err = client
        .get_group(&Locator::by_key("NOPE"), None)
        .await
        .expect_err("missing group");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn bad_requests_are_permanent() {
    let (client, _emu) = start().await;
    let err = client
        .create_user(&user(""))
        .await
        .expect_err("empty username");
    assert_eq!(
        (err.kind(), err.status()),
        (ErrorKind::Permanent, Some(400))
    );
    assert!(
        err.body()
            .expect("body")
            .hint
            .as_deref()
            .unwrap_or("")
            .starts_with("Invalid request")
    );
}

#[tokio::test]
async fn auth_failures_are_classified() {
    let (_client, _emu, base) = start_with(options()).await;
    let err = client_for(&base, "wrong")
        .server_info()
        .await
        .expect_err("bad token");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    let viewer = client_for(&base, "viewer-token");
    viewer.server_info().await.expect("reads are allowed");
    let err = viewer
        .create_user(&user("x"))
        .await
        .expect_err("writes are not");
    assert_eq!(err.kind(), ErrorKind::Forbidden);
}

#[tokio::test]
async fn injected_faults_are_transient_and_consumed() {
    let (client, emu) = start().await;
    let cases = [
        (
            FaultAction::Status {
                status: 503,
                retry_after_secs: Some(7),
            },
            Some(Duration::from_secs(7)),
        ),
        (
            FaultAction::Status {
                status: 429,
                retry_after_secs: Some(2),
            },
            Some(Duration::from_secs(2)),
        ),
        (
            FaultAction::Status {
                status: 500,
                retry_after_secs: None,
            },
            None,
        ),
        (
            FaultAction::Status {
                status: 409,
                retry_after_secs: None,
            },
            None,
        ),
        (FaultAction::Drop, None),
    ];
    for (action, retry_after) in cases {
        emu.inject_fault(Fault::any(1, action.clone()));
        let err = client.server_info().await.expect_err("fault");
        assert!(err.is_transient(), "{action:?}: {err}");
        assert_eq!(err.retry_after(), retry_after, "{action:?}");
        client.server_info().await.expect("fault used up");
    }
}

#[tokio::test]
async fn faults_match_method_and_path() {
    let (client, emu) = start().await;
    emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: 2,
        action: FaultAction::Status {
            status: 502,
            retry_after_secs: None,
        },
    });
    client.server_info().await.expect("other path unaffected");
    client
        .list_users(&Locator::new(), None)
        .await
        .expect("other method unaffected");
    for _ in 0..2 {
        assert!(
            client
                .create_user(&user("f"))
                .await
                .expect_err("fault")
                .is_transient()
        );
    }
    client
        .create_user(&user("f"))
        .await
        .expect("after two faults");
    assert_eq!(emu.counters().get("POST /app/rest/users"), Some(&3));
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_transient() {
    let (client, emu) = start().await;
    emu.inject_fault(Fault::any(1, FaultAction::Delay { ms: 3_000 }));
    let err = client.server_info().await.expect_err("timeout");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("timeout"), "{err}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let err = client_for(&format!("http://127.0.0.1:{port}"), "t")
        .server_info()
        .await
        .expect_err("refused");
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn latency_holds_every_answer_from_the_request_s_arrival() {
    let latency = Duration::from_millis(40);
    let (client, emu, _) = start_with(teamcity_emulator::EmulatorOptions {
        latency,
        ..options()
    })
    .await;
    // A read, a write and an injected failure all answer no sooner than the latency.
    let t = std::time::Instant::now();
    client.server_info().await.expect("server");
    assert!(t.elapsed() >= latency, "read took {:?}", t.elapsed());
    let t = std::time::Instant::now();
    client.create_user(&user("slow")).await.expect("create");
    assert!(t.elapsed() >= latency, "write took {:?}", t.elapsed());
    emu.inject_fault(Fault::any(
        1,
        FaultAction::Status {
            status: 503,
            retry_after_secs: None,
        },
    ));
    let t = std::time::Instant::now();
    client.server_info().await.expect_err("fault");
    assert!(t.elapsed() >= latency, "fault took {:?}", t.elapsed());
    // Concurrent calls wait side by side, not one after another.
    let t = std::time::Instant::now();
    let calls: Vec<_> = (0..8).map(|_| client.server_info()).collect();
    for r in futures::future::join_all(calls).await {
        r.expect("server");
    }
    assert!(t.elapsed() >= latency);
    assert!(
        t.elapsed() < latency * 8,
        "8 concurrent calls took {:?}",
        t.elapsed()
    );
}
