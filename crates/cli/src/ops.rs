//! Operator commands over the sync bookkeeping: `outbox list|retry|drop`, `held`, `approve`.
//!
//! They talk to the store only, so they work while `serve` runs on the same database (SQLite
//! serialises the writers). Handlers write to `out` so tests can read what they print.

use std::io::Write;

use clap::Subcommand;
use clap::builder::TypedValueParser;
use store::{DynStore, HeldBatch, HeldState, OutboxEntry, OutboxState, StoreError, WriteCtx};
use time::OffsetDateTime;

/// `teamcity-scim outbox ...`
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// List outbox items (oldest first).
    List {
        /// Only items in this state.
        #[arg(
            long,
            value_parser = clap::builder::PossibleValuesParser::new(
                ["pending", "dead", "done", "held", "dropped"]
            )
            .try_map(|s| s.parse::<OutboxState>())
        )]
        state: Option<OutboxState>,
        /// At most this many items.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Put a dead item back in the queue (attempts reset, due now).
    Retry {
        /// The item id from `outbox list --state dead`.
        id: i64,
    },
    /// Give up on a pending, dead or held item: it is never applied.
    Drop {
        /// The item id from `outbox list`.
        id: i64,
    },
}

/// Seconds-precision UTC time for tables.
fn short_time(t: OffsetDateTime) -> String {
    let s = store::timefmt::format(t);
    format!("{}Z", s.get(..19).unwrap_or(&s))
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

fn outbox_row(e: &OutboxEntry) -> String {
    let next = match e.item.state.as_str() {
        "pending" => match e.lease_until {
            Some(_) => format!("leased by {}", e.leased_by.as_deref().unwrap_or("a worker")),
            None => short_time(e.next_attempt_at),
        },
        "held" => e
            .held_batch_id
            .map(|b| format!("held batch {b}"))
            .unwrap_or_else(|| "-".into()),
        _ => "-".into(),
    };
    let error = e
        .dead_reason
        .as_deref()
        .or(e.last_error.as_deref())
        .unwrap_or("");
    format!(
        "{:<8} {:<44} {:<8} {:<8} {:>8}  {:<22} {}",
        e.item.id,
        format!("{}:{}", e.item.entity_type, e.item.entity_id),
        e.item.operation,
        e.item.state,
        e.item.attempts,
        next,
        one_line(error, 100),
    )
}

/// Runs an `outbox` subcommand.
pub(crate) async fn outbox(
    cmd: OutboxCommand,
    store: &DynStore,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        OutboxCommand::List { state, limit } => outbox_list(store, state, limit, out).await,
        OutboxCommand::Retry { id } => outbox_retry(store, id, out).await,
        OutboxCommand::Drop { id } => outbox_drop(store, id, out).await,
    }
}

/// `outbox list`: a table of items.
pub(crate) async fn outbox_list(
    store: &DynStore,
    state: Option<OutboxState>,
    limit: i64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let items = store.list_outbox(state, limit.max(0)).await?;
    if items.is_empty() {
        match state {
            Some(s) => writeln!(out, "No {s} outbox items.")?,
            None => writeln!(out, "The outbox is empty.")?,
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<8} {:<44} {:<8} {:<8} {:>8}  {:<22} LAST ERROR",
        "ID", "ENTITY", "OP", "STATE", "ATTEMPTS", "NEXT ATTEMPT"
    )?;
    for e in &items {
        writeln!(out, "{}", outbox_row(e))?;
    }
    if i64::try_from(items.len()).is_ok_and(|n| n == limit) {
        writeln!(out, "(showing the first {limit}; use --limit to see more)")?;
    }
    Ok(())
}

/// `outbox retry ID`.
pub(crate) async fn outbox_retry(
    store: &DynStore,
    id: i64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match store.retry_outbox(&WriteCtx::cli(), id).await {
        Ok(e) => {
            writeln!(
                out,
                "Outbox item {id} ({}:{} {}) is pending again; the running worker picks it up on its next pass.",
                e.item.entity_type, e.item.entity_id, e.item.operation
            )?;
            Ok(())
        }
        Err(StoreError::NotFound) => {
            anyhow::bail!("no dead outbox item {id}; see `teamcity-scim outbox list --state dead`")
        }
        Err(StoreError::Invalid(m)) => anyhow::bail!(
            "{m}: only dead items can be retried; see `teamcity-scim outbox list --state dead`"
        ),
        Err(e) => Err(e.into()),
    }
}

/// `outbox drop ID`.
pub(crate) async fn outbox_drop(
    store: &DynStore,
    id: i64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match store.drop_outbox(&WriteCtx::cli(), id).await {
        Ok(e) => {
            writeln!(
                out,
                "Dropped outbox item {id} ({}:{} {}); it will not be applied. \
                 The next reconcile still converges TeamCity to the directory.",
                e.item.entity_type, e.item.entity_id, e.item.operation
            )?;
            Ok(())
        }
        Err(StoreError::NotFound) => {
            anyhow::bail!("no outbox item {id}; see `teamcity-scim outbox list`")
        }
        Err(StoreError::Invalid(m)) => anyhow::bail!(
            "{m}: only pending, dead or held items can be dropped; see `teamcity-scim outbox list`"
        ),
        Err(e) => Err(e.into()),
    }
}

fn held_row(b: &HeldBatch) -> String {
    format!(
        "{:<6} {:<21} {:<10} {:<9} {:>8}  {}",
        b.id,
        short_time(b.created),
        b.source,
        b.state,
        b.removals,
        one_line(&b.summary, 120),
    )
}

/// The steps of a held batch, or why this version cannot read them.
pub(crate) fn held_steps(b: &HeldBatch) -> Result<Vec<sync::Action>, String> {
    serde_json::from_value(b.plan.clone())
        .map_err(|e| format!("UNREADABLE: its stored plan cannot be read by this version ({e})"))
}

/// Who a held batch would take access from: usernames (from the mapping table) and groups.
pub(crate) async fn affected(store: &DynStore, steps: &[sync::Action]) -> anyhow::Result<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let names = |kind| async move {
        anyhow::Ok(
            store
                .mappings(kind)
                .await?
                .into_iter()
                .map(|m| (m.teamcity_id, m.teamcity_name))
                .collect::<BTreeMap<String, String>>(),
        )
    };
    let users = names(scim::ResourceKind::User).await?;
    let groups = names(scim::ResourceKind::Group).await?;
    let mut who: BTreeSet<String> = BTreeSet::new();
    let mut whole: BTreeSet<String> = BTreeSet::new();
    for a in steps {
        match (a.user_target(), a.group_target()) {
            (Some(sync::UserTarget::Id(user)), _) => {
                let id = user.to_string();
                who.insert(match users.get(&id) {
                    Some(n) => format!("{n} (id:{id})"),
                    None => format!("id:{id}"),
                });
            }
            // A group's role removed or the group deleted: everyone in it.
            (None, Some(key)) => {
                whole.insert(match groups.get(key) {
                    Some(n) => format!("every member of {n} [{key}]"),
                    None => format!("every member of {key}"),
                });
            }
            _ => {}
        }
    }
    let mut parts: Vec<String> = Vec::new();
    if !who.is_empty() {
        let shown: Vec<&String> = who.iter().take(20).collect();
        let more = who.len().saturating_sub(shown.len());
        let mut text = shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        parts.push(text);
    }
    parts.extend(whole);
    Ok(if parts.is_empty() {
        "nobody".into()
    } else {
        parts.join("; ")
    })
}

/// `held`: batches waiting for approval (and approved ones not yet applied); all with `all`.
pub(crate) async fn held(store: &DynStore, all: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let batches: Vec<HeldBatch> = if all {
        store.list_held(None).await?
    } else {
        let mut v = store.list_held(Some(HeldState::Held)).await?;
        v.extend(store.list_held(Some(HeldState::Approved)).await?);
        v.sort_by_key(|b| b.id);
        v
    };
    if batches.is_empty() {
        writeln!(out, "No held batches.")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<6} {:<21} {:<10} {:<9} {:>8}  SUMMARY",
        "ID", "HELD AT", "SOURCE", "STATE", "REMOVALS"
    )?;
    for b in &batches {
        writeln!(out, "{}", held_row(b))?;
        match held_steps(b) {
            Ok(steps) => {
                if matches!(b.state.as_str(), "held" | "approved") {
                    writeln!(out, "       affects: {}", affected(store, &steps).await?)?;
                }
            }
            Err(reason) => writeln!(
                out,
                "       {reason}; it is never applied. Drop it with `teamcity-scim held drop {}`; \
                 the next reconcile plans again whatever is still needed.",
                b.id
            )?,
        }
        if b.state == HeldState::Held {
            writeln!(out, "       approve with: teamcity-scim approve {}", b.id)?;
        }
    }
    if batches.iter().any(|b| b.state == HeldState::Held) {
        writeln!(
            out,
            "Approve one with `teamcity-scim approve ID` after checking its summary."
        )?;
    }
    Ok(())
}

/// `held drop ID`: gives up a held or approved batch; its steps are planned again by the next
/// pass or reconcile (and held again if the guard still says so).
pub(crate) async fn held_drop(
    store: &DynStore,
    id: i64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match store.drop_held(&WriteCtx::cli(), id).await {
        Ok(b) => {
            writeln!(
                out,
                "Dropped held batch {id} ({}). Whatever the directory still asks for is planned again \
                 by the next pass (see `teamcity-scim plan`).",
                one_line(&b.summary, 200)
            )?;
            Ok(())
        }
        Err(StoreError::NotFound) => anyhow::bail!("no held batch {id}; see `teamcity-scim held`"),
        Err(StoreError::Invalid(m)) => {
            anyhow::bail!(
                "{m}: only held or approved batches can be dropped; see `teamcity-scim held --all`"
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// `approve ID`.
pub(crate) async fn approve(store: &DynStore, id: i64, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(b) = store.held_batch(id).await?
        && let Err(reason) = held_steps(&b)
    {
        anyhow::bail!(
            "held batch {id} is {reason}; approving it would apply nothing. Drop it with \
             `teamcity-scim held drop {id}`: the next reconcile plans again whatever is still needed"
        );
    }
    match store.approve_held(&WriteCtx::cli(), id).await {
        Ok(b) => {
            writeln!(
                out,
                "Approved held batch {id} ({} user(s) lose access: {}).",
                b.removals,
                one_line(&b.summary, 200)
            )?;
            writeln!(
                out,
                "The sync worker in `teamcity-scim serve` applies approved batches on its next pass; \
                 `teamcity-scim held --all` shows when it is applied."
            )?;
            Ok(())
        }
        Err(StoreError::NotFound) => {
            anyhow::bail!("no held batch {id}; see `teamcity-scim held`")
        }
        Err(StoreError::Invalid(m)) => {
            anyhow::bail!("{m}: only held batches can be approved; see `teamcity-scim held --all`")
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use scim::ResourceKind;
    use serde_json::json;
    use store::{RetryPolicy, SystemClock};

    use super::*;

    async fn run<F, Fut>(f: F) -> (anyhow::Result<()>, String)
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = (anyhow::Result<()>, Vec<u8>)>,
    {
        let (r, out) = f(Vec::new()).await;
        (r, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn outbox_and_held_commands_against_a_temp_database() {
        let dir = tempfile::tempdir().unwrap();
        // A missing file is created.
        let url = format!("sqlite://{}/ops.db", dir.path().display());
        let s = store::open(&url, Arc::new(SystemClock)).await.unwrap();
        s.create(
            &WriteCtx::cli(),
            ResourceKind::User,
            json!({"userName": "alice"}),
            None,
        )
        .await
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let c = s
            .claim_outbox("t", now, Duration::from_secs(30), 10)
            .await
            .unwrap();
        let id = c[0].items[0].id;

        let (r, text) = run(|mut o| async {
            let r = outbox_retry(&s, id, &mut o).await;
            (r, o)
        })
        .await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("is pending, not dead") && e.contains("--state dead"),
            "{e}"
        );
        assert!(text.is_empty());

        s.fail_outbox(
            &WriteCtx::sync(),
            &[id],
            "HTTP 400: bad username",
            false,
            now,
            &RetryPolicy::default(),
        )
        .await
        .unwrap();
        let (r, text) = run(|mut o| async {
            let r = outbox_list(&s, Some(OutboxState::Dead), 50, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(text.starts_with("ID "), "{text}");
        assert!(
            text.contains("permanent failure: HTTP 400: bad username"),
            "{text}"
        );
        assert!(text.contains(" dead "), "{text}");

        let (r, text) = run(|mut o| async {
            let r = outbox_retry(&s, id, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(text.contains("is pending again"), "{text}");

        let (r, _) = run(|mut o| async {
            let r = outbox_retry(&s, 4242, &mut o).await;
            (r, o)
        })
        .await;
        assert_eq!(
            r.unwrap_err().to_string(),
            "no dead outbox item 4242; see `teamcity-scim outbox list --state dead`"
        );

        let (r, text) = run(|mut o| async {
            let r = outbox_drop(&s, id, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(text.contains("Dropped outbox item"), "{text}");

        let (r, text) = run(|mut o| async {
            let r = held(&s, false, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert_eq!(text, "No held batches.\n");

        let b = s
            .create_held(
                &WriteCtx::sync(),
                "reconcile",
                &[],
                "would remove 12 users from Developers",
                12,
                &json!([{"RemoveFromGroup": {"user": 7, "group": "SCIM_X_0"}}]),
            )
            .await
            .unwrap();
        let (r, text) = run(|mut o| async {
            let r = held(&s, false, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(
            text.contains("would remove 12 users from Developers"),
            "{text}"
        );
        assert!(text.contains("approve ID"), "{text}");

        let (r, text) = run(|mut o| async {
            let r = approve(&s, b, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(text.contains("applies approved batches"), "{text}");
        assert_eq!(
            s.held_batch(b).await.unwrap().unwrap().state,
            HeldState::Approved
        );

        let (r, _) = run(|mut o| async {
            let r = approve(&s, b, &mut o).await;
            (r, o)
        })
        .await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("is approved, not held"), "{e}");
        let (r, _) = run(|mut o| async {
            let r = approve(&s, 999, &mut o).await;
            (r, o)
        })
        .await;
        assert_eq!(
            r.unwrap_err().to_string(),
            "no held batch 999; see `teamcity-scim held`"
        );

        // A batch this version cannot read: shown as unreadable, never approved, droppable.
        let u = s
            .create_held(
                &WriteCtx::sync(),
                "outbox",
                &[],
                "from an older version",
                3,
                &json!({"SomeOldAction": {}}),
            )
            .await
            .unwrap();
        let (r, text) = run(|mut o| async {
            let r = held(&s, false, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(text.contains("UNREADABLE"), "{text}");
        assert!(
            text.contains(&format!("teamcity-scim held drop {u}")),
            "{text}"
        );
        assert!(
            text.contains("affects: id:7"),
            "readable batches name who: {text}"
        );
        let (r, _) = run(|mut o| async {
            let r = approve(&s, u, &mut o).await;
            (r, o)
        })
        .await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("approving it would apply nothing"), "{e}");
        assert_eq!(
            s.held_batch(u).await.unwrap().unwrap().state,
            HeldState::Held
        );
        let (r, text) = run(|mut o| async {
            let r = held_drop(&s, u, &mut o).await;
            (r, o)
        })
        .await;
        r.unwrap();
        assert!(text.contains(&format!("Dropped held batch {u}")), "{text}");
        assert_eq!(
            s.held_batch(u).await.unwrap().unwrap().state,
            HeldState::Dropped
        );
    }
}
