//! Every SCIM write leaves exactly one audit event and one outbox row naming the changed
//! entity; failed writes and no-op PATCHes leave neither.

use reqwest::Method;
use serde_json::{Value, json};
use store::{AuditEvent, OutboxItem, OutboxState};

use crate::support::{GROUP_SCHEMA, Resp, Server, patch_op, user};

async fn trail(s: &Server) -> (Vec<AuditEvent>, Vec<OutboxItem>) {
    (
        s.store.audit_events(0, 100_000).await.unwrap(),
        s.store.outbox_items(0, 100_000).await.unwrap(),
    )
}

/// Runs a write, then asserts it added exactly one audit event and one outbox row for
/// (`entity_type`, `entity_id`) with the given operations. Evaluates to the response.
macro_rules! expect_one {
    ($s:expr, $what:expr, $entity:expr, $audit_op:expr, $outbox_op:expr, $write:expr) => {{
        let before = trail($s).await;
        let r = $write.await;
        check_one($s, before, $what, $entity, $audit_op, $outbox_op, r).await
    }};
}

async fn check_one(
    s: &Server,
    (a0, o0): (Vec<AuditEvent>, Vec<OutboxItem>),
    what: &str,
    entity: (&str, Option<&str>),
    audit_op: &str,
    outbox_op: &str,
    r: Resp,
) -> Resp {
    assert!(r.status < 300, "{what}: {} {}", r.status, r.text);
    let (a1, o1) = trail(s).await;
    assert_eq!(a1.len(), a0.len() + 1, "{what}: one audit event");
    assert_eq!(o1.len(), o0.len() + 1, "{what}: one outbox row");
    let ev = a1.last().unwrap();
    let ob = o1.last().unwrap();
    let id = entity
        .1
        .map(str::to_owned)
        .or_else(|| r.body["id"].as_str().map(str::to_owned))
        .expect("entity id");
    let resource_type = if entity.0 == "user" { "User" } else { "Group" };
    assert_eq!(ev.resource_type, resource_type, "{what}");
    assert_eq!(ev.resource_id.as_deref(), Some(id.as_str()), "{what}");
    assert_eq!(ev.operation, audit_op, "{what}");
    assert_eq!(ev.outcome, "success", "{what}");
    assert!(ev.actor.starts_with("token:"), "{what}: actor {}", ev.actor);
    assert!(ev.request_id.is_some(), "{what}: request id recorded");
    assert_eq!(
        ev.prev_hash,
        a0.last()
            .map(|e| e.hash.clone())
            .unwrap_or_else(|| ev.prev_hash.clone())
    );
    assert_eq!(ob.entity_type, entity.0, "{what}");
    assert_eq!(ob.entity_id, id, "{what}");
    assert_eq!(ob.operation, outbox_op, "{what}");
    assert_eq!(
        ob.audit_seq, ev.seq,
        "{what}: outbox row points at its audit event"
    );
    assert_eq!(ob.state, OutboxState::Pending, "{what}");
    r
}

#[tokio::test]
async fn every_write_leaves_one_event_and_one_outbox_row() {
    let s = Server::start().await;
    let r = expect_one!(
        &s,
        "create user",
        ("user", None),
        "create",
        "upsert",
        s.post("/Users", &user("ao1@x.example"))
    );
    let u1 = r.body["id"].as_str().unwrap().to_owned();
    let r = expect_one!(
        &s,
        "create user 2",
        ("user", None),
        "create",
        "upsert",
        s.post("/Users", &user("ao2@x.example"))
    );
    let u2 = r.body["id"].as_str().unwrap().to_owned();
    let upath = format!("/Users/{u1}");

    let mut put = s.get(&upath).await.body;
    put["title"] = json!("Put");
    expect_one!(
        &s,
        "replace user",
        ("user", Some(&u1)),
        "replace",
        "upsert",
        s.put(&upath, &put)
    );
    expect_one!(
        &s,
        "patch user",
        ("user", Some(&u1)),
        "patch",
        "upsert",
        s.patch(
            &upath,
            &patch_op(json!([{"op": "replace", "path": "active", "value": false}])),
        )
    );

    // A group created with a member: one row for the group, whose detail names the member.
    let r =
        expect_one!(&s, "create group", ("group", None), "create", "upsert",         s.post(
            "/Groups",
            &json!({"schemas": [GROUP_SCHEMA], "displayName": "AO", "members": [{"value": u1}]}),
        ));
    let gid = r.body["id"].as_str().unwrap().to_owned();
    let gpath = format!("/Groups/{gid}");
    let last = trail(&s).await.1.pop().unwrap();
    assert!(last.detail.contains(&u1), "{}", last.detail);

    // Membership only: outbox operation `members`, detail names who was added.
    expect_one!(
        &s,
        "add member",
        ("group", Some(&gid)),
        "patch",
        "members",
        s.patch(
            &gpath,
            &patch_op(json!([{"op": "add", "path": "members", "value": [{"value": u2}]}])),
        )
    );
    let last = trail(&s).await.1.pop().unwrap();
    let detail: Value = serde_json::from_str(&last.detail).unwrap();
    assert_eq!(detail["added"], json!([u2]));
    expect_one!(
        &s,
        "remove member",
        ("group", Some(&gid)),
        "patch",
        "members",
        s.patch(
            &gpath,
            &patch_op(json!([{"op": "remove", "path": format!("members[value eq \"{u2}\"]")}])),
        )
    );
    let last = trail(&s).await.1.pop().unwrap();
    let detail: Value = serde_json::from_str(&last.detail).unwrap();
    assert_eq!(detail["removed"], json!([u2]));
    // Rename and a member change in one PATCH: still one event, one row.
    expect_one!(
        &s,
        "rename + member",
        ("group", Some(&gid)),
        "patch",
        "upsert",
        s.patch(
            &gpath,
            &patch_op(json!([
                {"op": "replace", "path": "displayName", "value": "AO2"},
                {"op": "add", "path": "members", "value": [{"value": u2}]},
            ])),
        )
    );
    expect_one!(
        &s,
        "replace group",
        ("group", Some(&gid)),
        "replace",
        "upsert",
        s.put(
            &gpath,
            &json!({"schemas": [GROUP_SCHEMA], "displayName": "AO3", "members": [{"value": u2}]}),
        )
    );
    // Deleting a user that is a member: one row for the user, naming the group it left.
    expect_one!(
        &s,
        "delete user",
        ("user", Some(&u2)),
        "delete",
        "delete",
        s.delete(&format!("/Users/{u2}"))
    );
    let last = trail(&s).await.1.pop().unwrap();
    assert!(last.detail.contains(&gid), "{}", last.detail);
    expect_one!(
        &s,
        "delete group",
        ("group", Some(&gid)),
        "delete",
        "delete",
        s.delete(&gpath)
    );
    expect_one!(
        &s,
        "delete user 1",
        ("user", Some(&u1)),
        "delete",
        "delete",
        s.delete(&upath)
    );

    // The audit chain links every event to the one before.
    let (events, outbox) = trail(&s).await;
    for w in events.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    assert_eq!(outbox.len(), 12);
    assert_eq!(events.len(), 13, "12 writes and the token");
}

#[tokio::test]
async fn bulk_writes_leave_one_row_per_operation() {
    let s = Server::start().await;
    let (a0, o0) = trail(&s).await;
    let r = s
        .post(
            "/Bulk",
            &json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": [
                {"method": "POST", "path": "/Users", "bulkId": "u", "data": user("bulk-ao@x.example")},
                {"method": "POST", "path": "/Groups", "bulkId": "g", "data":
                    {"schemas": [GROUP_SCHEMA], "displayName": "BulkAO", "members": [{"value": "bulkId:u"}]}},
                {"method": "POST", "path": "/Users", "bulkId": "dup", "data": user("bulk-ao@x.example")},
            ]}),
        )
        .await;
    r.expect(200);
    let (a1, o1) = trail(&s).await;
    assert_eq!(a1.len() - a0.len(), 2, "two successful operations");
    assert_eq!(o1.len() - o0.len(), 2);
    let types: Vec<&str> = o1[o0.len()..]
        .iter()
        .map(|o| o.entity_type.as_str())
        .collect();
    assert_eq!(types, ["user", "group"]);
}

/// (what, method, path, body, extra headers, expected status).
type FailCase<'a> = (
    &'a str,
    Method,
    String,
    Option<Value>,
    Vec<(&'a str, &'a str)>,
    u16,
);

#[tokio::test]
async fn failed_writes_leave_nothing() {
    let s = Server::start().await;
    let u1 = s.create_user("fw1@x.example").await;
    s.create_user("fw2@x.example").await;
    let gid = s.create_group("FW", &[&u1]).await;
    let upath = format!("/Users/{u1}");
    let gpath = format!("/Groups/{gid}");
    let put_body = s.get(&upath).await.body;
    let base = trail(&s).await;
    let cases: Vec<FailCase> = vec![
        (
            "duplicate user",
            Method::POST,
            "/Users".into(),
            Some(user("FW1@x.example")),
            vec![],
            409,
        ),
        (
            "duplicate group",
            Method::POST,
            "/Groups".into(),
            Some(json!({"schemas": [GROUP_SCHEMA], "displayName": "fw"})),
            vec![],
            409,
        ),
        (
            "missing userName",
            Method::POST,
            "/Users".into(),
            Some(json!({"title": "x"})),
            vec![],
            400,
        ),
        (
            "group with missing member",
            Method::POST,
            "/Groups".into(),
            Some(
                json!({"schemas": [GROUP_SCHEMA], "displayName": "FW2", "members": [{"value": "ghost"}]}),
            ),
            vec![],
            400,
        ),
        (
            "bad patch path",
            Method::PATCH,
            upath.clone(),
            Some(patch_op(
                json!([{"op": "replace", "path": "nope", "value": 1}]),
            )),
            vec![],
            400,
        ),
        (
            "patch read-only",
            Method::PATCH,
            upath.clone(),
            Some(patch_op(
                json!([{"op": "replace", "path": "id", "value": "x"}]),
            )),
            vec![],
            400,
        ),
        (
            "patch missing member",
            Method::PATCH,
            gpath.clone(),
            Some(patch_op(
                json!([{"op": "add", "path": "members", "value": [{"value": "ghost"}]}]),
            )),
            vec![],
            400,
        ),
        (
            "patch stale If-Match",
            Method::PATCH,
            upath.clone(),
            Some(patch_op(
                json!([{"op": "replace", "path": "title", "value": "x"}]),
            )),
            vec![("if-match", "W/\"99\"")],
            412,
        ),
        (
            "put stale If-Match",
            Method::PUT,
            upath.clone(),
            Some(put_body.clone()),
            vec![("if-match", "W/\"99\"")],
            412,
        ),
        (
            "put wrong type",
            Method::PUT,
            upath.clone(),
            Some(json!({"userName": 5})),
            vec![],
            400,
        ),
        (
            "put missing",
            Method::PUT,
            "/Users/ghost".into(),
            Some(put_body.clone()),
            vec![],
            404,
        ),
        (
            "patch missing",
            Method::PATCH,
            "/Groups/ghost".into(),
            Some(patch_op(
                json!([{"op": "replace", "path": "displayName", "value": "x"}]),
            )),
            vec![],
            404,
        ),
        (
            "delete missing",
            Method::DELETE,
            "/Users/ghost".into(),
            None,
            vec![],
            404,
        ),
        (
            "delete stale If-Match",
            Method::DELETE,
            gpath.clone(),
            None,
            vec![("if-match", "W/\"99\"")],
            412,
        ),
        (
            "rename into a taken name",
            Method::PATCH,
            upath.clone(),
            Some(patch_op(
                json!([{"op": "replace", "path": "userName", "value": "FW2@x.example"}]),
            )),
            vec![],
            409,
        ),
        (
            "no-op PATCH with an invalid op after it",
            Method::PATCH,
            gpath.clone(),
            Some(patch_op(
                json!([{"op": "add", "path": "members", "value": [{"value": u1}]},
                                 {"op": "remove"}]),
            )),
            vec![],
            400,
        ),
    ];
    for (what, m, p, body, headers, status) in cases {
        let r = match body {
            Some(b) => s.send_json(m, &p, &b, &headers).await,
            None => {
                let mut rb = s.req(m, &p);
                for (k, v) in &headers {
                    rb = rb.header(*k, *v);
                }
                s.send(rb).await
            }
        };
        assert_eq!(r.status, status, "{what}: {}", r.text);
        let now = trail(&s).await;
        assert_eq!(now.0.len(), base.0.len(), "{what}: no audit event");
        assert_eq!(now.1.len(), base.1.len(), "{what}: no outbox row");
    }
}

#[tokio::test]
async fn noop_patches_leave_nothing() {
    let s = Server::start().await;
    let u1 = s.create_user("np1@x.example").await;
    let u2 = s.create_user("np2@x.example").await;
    let gid = s.create_group("NoOp", &[&u1]).await;
    let upath = format!("/Users/{u1}");
    let gpath = format!("/Groups/{gid}");
    let ubefore = s.snapshot(&upath).await;
    let gbefore = s.snapshot(&gpath).await;
    let base = trail(&s).await;
    let cases: Vec<(&str, &String, Value)> = vec![
        (
            "same active",
            &upath,
            json!([{"op": "replace", "path": "active", "value": true}]),
        ),
        (
            "same active as string",
            &upath,
            json!([{"op": "Replace", "path": "active", "value": "True"}]),
        ),
        (
            "same userName",
            &upath,
            json!([{"op": "replace", "path": "userName", "value": "np1@x.example"}]),
        ),
        (
            "pathless same values",
            &upath,
            json!([{"op": "replace", "value": {"active": true, "name.givenName": "Given"}}]),
        ),
        (
            "remove absent attribute",
            &upath,
            json!([{"op": "remove", "path": "title"}]),
        ),
        (
            "add empty value",
            &upath,
            json!([{"op": "add", "path": "nickName", "value": ""}]),
        ),
        (
            "password is dropped",
            &upath,
            json!([{"op": "replace", "path": "password", "value": "s3cret"}]),
        ),
        (
            "okta id+displayName",
            &gpath,
            json!([{"op": "replace", "value": {"id": gid, "displayName": "NoOp"}}]),
        ),
        (
            "add present member",
            &gpath,
            json!([{"op": "add", "path": "members", "value": [{"value": u1}]}]),
        ),
        (
            "remove absent member",
            &gpath,
            json!([{"op": "remove", "path": format!("members[value eq \"{u2}\"]")}]),
        ),
        (
            "remove absent member by value",
            &gpath,
            json!([{"op": "Remove", "path": "members", "value": [{"value": u2}]}]),
        ),
        (
            "replace members with same",
            &gpath,
            json!([{"op": "replace", "path": "members", "value": [{"value": u1}]}]),
        ),
    ];
    for (what, path, ops) in cases {
        let r = s.patch(path, &patch_op(ops)).await;
        r.expect(200);
        let now = trail(&s).await;
        assert_eq!(now.0.len(), base.0.len(), "{what}: no audit event");
        assert_eq!(now.1.len(), base.1.len(), "{what}: no outbox row");
        assert_eq!(s.snapshot(&upath).await, ubefore, "{what}");
        assert_eq!(s.snapshot(&gpath).await, gbefore, "{what}");
    }
}
