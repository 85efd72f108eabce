//! `POST /Bulk` (RFC 7644 §3.7): operations run in order through the same functions as the
//! single-resource routes; `bulkId:` references are resolved as the resources they name are
//! created (an operation waits for the ones it references, so forward references work), and
//! `failOnErrors` stops the batch after that many errors.

use std::collections::{HashMap, HashSet};

use scim::schema::BULK_RESPONSE_SCHEMA;
use scim::{ResourceKind, ScimError, ScimType};
use serde_json::{Value, json};
use store::WriteCtx;

use crate::error::ApiResult;
use crate::extract::{Projection, get_ci};
use crate::reply::Reply;
use crate::resources;
use crate::state::AppState;

struct Op {
    index: usize,
    method: String,
    bulk_id: Option<String>,
    version: Option<String>,
    path: String,
    data: Option<Value>,
    refs: HashSet<String>,
}

fn collect_refs(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::String(s) => {
            if let Some(id) = s.strip_prefix("bulkId:") {
                out.insert(id.to_owned());
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

fn substitute(v: &mut Value, ids: &HashMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(id) = s.strip_prefix("bulkId:").and_then(|b| ids.get(b)) {
                *s = id.clone();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| substitute(x, ids)),
        Value::Object(o) => o.values_mut().for_each(|x| substitute(x, ids)),
        _ => {}
    }
}

/// `bulkId:` references in an operation's path (`/Users/bulkId:u1`): one per path segment.
fn collect_path_refs(path: &str, out: &mut HashSet<String>) {
    for seg in path.split('/') {
        collect_refs(&Value::String(seg.to_owned()), out);
    }
}

/// Replaces `bulkId:` references in the segments of an operation's path.
fn substitute_path(path: &str, ids: &HashMap<String, String>) -> String {
    path.split('/')
        .map(|seg| {
            let mut v = Value::String(seg.to_owned());
            substitute(&mut v, ids);
            v.as_str().unwrap_or(seg).to_owned()
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn parse_ops(body: &Value, max_ops: usize) -> Result<(Vec<Op>, Option<usize>), ScimError> {
    if !body.is_object() {
        return Err(ScimError::invalid_syntax(
            "a BulkRequest must be a JSON object",
        ));
    }
    let Some(Value::Array(items)) = get_ci(body, "Operations") else {
        return Err(ScimError::invalid_syntax(
            "a BulkRequest needs an `Operations` array",
        ));
    };
    if items.len() > max_ops {
        return Err(ScimError::new(
            413,
            None,
            format!(
                "the bulk request has {} operations; the maximum is {max_ops} (bulk.maxOperations)",
                items.len()
            ),
        ));
    }
    let fail_on_errors = match get_ci(body, "failOnErrors") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            ScimError::bad_request(
                ScimType::InvalidValue,
                "`failOnErrors` must be a positive integer",
            )
        })? as usize),
    };
    let mut ops = vec![];
    let mut seen = HashSet::new();
    for (index, item) in items.iter().enumerate() {
        let text = |k: &str| get_ci(item, k).and_then(Value::as_str).map(str::to_owned);
        let method = text("method").ok_or_else(|| {
            ScimError::invalid_syntax(format!("bulk operation {index} has no `method`"))
        })?;
        let path = text("path").ok_or_else(|| {
            ScimError::invalid_syntax(format!("bulk operation {index} has no `path`"))
        })?;
        let bulk_id = text("bulkId");
        if let Some(b) = &bulk_id
            && !seen.insert(b.clone())
        {
            return Err(ScimError::invalid_syntax(format!(
                "bulkId `{b}` is used by more than one operation"
            )));
        }
        let data = get_ci(item, "data").cloned();
        let mut refs = HashSet::new();
        collect_path_refs(&path, &mut refs);
        if let Some(d) = &data {
            collect_refs(d, &mut refs);
        }
        ops.push(Op {
            index,
            method,
            bulk_id,
            version: text("version"),
            path,
            data,
            refs,
        });
    }
    if method_requires_bulk_id(&ops) {
        return Err(ScimError::invalid_syntax(
            "every POST operation in a bulk request needs a `bulkId`",
        ));
    }
    Ok((ops, fail_on_errors))
}

fn method_requires_bulk_id(ops: &[Op]) -> bool {
    ops.iter()
        .any(|o| o.method.eq_ignore_ascii_case("POST") && o.bulk_id.is_none())
}

fn route(path: &str) -> Option<(ResourceKind, Option<&str>)> {
    let p = path.trim_start_matches('/');
    let (coll, id) = match p.split_once('/') {
        Some((c, i)) => (c, Some(i)),
        None => (p, None),
    };
    let kind = if coll.eq_ignore_ascii_case("Users") {
        ResourceKind::User
    } else if coll.eq_ignore_ascii_case("Groups") {
        ResourceKind::Group
    } else {
        return None;
    };
    Some((kind, id.filter(|i| !i.is_empty())))
}

/// Runs one operation; returns (status, location, version, created id).
async fn run_one(
    state: &AppState,
    ctx: &WriteCtx,
    base: &str,
    op: &Op,
    ids: &HashMap<String, String>,
) -> ApiResult<(Reply, Option<String>)> {
    let path = substitute_path(&op.path, ids);
    let mut data = op.data.clone().unwrap_or(Value::Null);
    substitute(&mut data, ids);
    let bad_path = || {
        ScimError::invalid_path(format!(
            "bulk path `{path}` does not name /Users or /Groups"
        ))
    };
    let (kind, id) = route(&path).ok_or_else(bad_path)?;
    let proj = Projection::default();
    let m = op.method.to_ascii_uppercase();
    match (m.as_str(), id) {
        ("POST", None) => {
            let (id, reply) = resources::create(state, ctx, base, kind, &data, &proj).await?;
            Ok((reply, Some(id)))
        }
        ("PUT", Some(id)) => Ok((resources::replace(state, ctx, base, kind, id, &data, op.version.as_deref(), &proj).await?, None)),
        ("PATCH", Some(id)) => Ok((resources::patch(state, ctx, base, kind, id, &data, op.version.as_deref(), &proj).await?, None)),
        ("DELETE", Some(id)) => {
            let mut reply = resources::delete(state, ctx, kind, id, op.version.as_deref()).await?;
            reply.location = Some(format!("{base}{}/{id}", kind.endpoint()));
            Ok((reply, None))
        }
        _ => Err(ScimError::new(
            405,
            None,
            format!("`{} {path}` is not a bulk operation this server supports (POST a collection; PUT, PATCH or DELETE a resource)", op.method),
        )
        .into()),
    }
}

/// `POST /Bulk`.
pub(crate) async fn bulk(
    state: &AppState,
    ctx: &WriteCtx,
    base: &str,
    body: &Value,
) -> ApiResult<Reply> {
    let (ops, fail_on_errors) = parse_ops(body, state.limits.bulk_max_operations)?;
    let defined: HashSet<String> = ops.iter().filter_map(|o| o.bulk_id.clone()).collect();
    let mut results: Vec<Option<Value>> = vec![None; ops.len()];
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut failed_bulk_ids: HashSet<String> = HashSet::new();
    let mut pending: Vec<&Op> = ops.iter().collect();
    let mut errors = 0usize;
    let entry = |op: &Op,
                 status: u16,
                 location: Option<String>,
                 version: Option<String>,
                 response: Option<Value>| {
        let mut e = json!({"method": op.method, "status": status.to_string()});
        if let Some(b) = &op.bulk_id {
            e["bulkId"] = json!(b);
        }
        if let Some(l) = location {
            e["location"] = json!(l);
        }
        if let Some(v) = version {
            e["version"] = json!(v);
        }
        if let Some(r) = response {
            e["response"] = r;
        }
        e
    };
    'passes: while !pending.is_empty() {
        let mut progressed = false;
        let mut next = vec![];
        for op in pending {
            if fail_on_errors.is_some_and(|n| errors >= n) {
                break 'passes;
            }
            let unknown = op
                .refs
                .iter()
                .find(|r| !defined.contains(*r) || failed_bulk_ids.contains(*r));
            if let Some(r) = unknown {
                let err = ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!(
                        "bulkId `{r}` is not defined by a successful operation in this request"
                    ),
                );
                results[op.index] = Some(entry(op, err.status, None, None, Some(err.to_json())));
                if let Some(b) = &op.bulk_id {
                    failed_bulk_ids.insert(b.clone());
                }
                errors += 1;
                progressed = true;
                continue;
            }
            if !op.refs.iter().all(|r| ids.contains_key(r)) {
                next.push(op);
                continue;
            }
            progressed = true;
            match run_one(state, ctx, base, op, &ids).await {
                Ok((reply, created)) => {
                    if let (Some(b), Some(id)) = (&op.bulk_id, created) {
                        ids.insert(b.clone(), id);
                    }
                    results[op.index] = Some(entry(
                        op,
                        reply.status.as_u16(),
                        reply.location,
                        reply.etag,
                        None,
                    ));
                }
                Err(e) => {
                    errors += 1;
                    if let Some(b) = &op.bulk_id {
                        failed_bulk_ids.insert(b.clone());
                    }
                    results[op.index] =
                        Some(entry(op, e.0.status, None, None, Some(e.0.to_json())));
                }
            }
        }
        if !progressed {
            // Every remaining operation waits on another: a circular reference.
            for op in next {
                let err = ScimError::new(
                    409,
                    Some(ScimType::InvalidValue),
                    "circular bulkId references could not be resolved",
                );
                results[op.index] = Some(entry(op, err.status, None, None, Some(err.to_json())));
            }
            break;
        }
        pending = next;
    }
    let operations: Vec<Value> = results.into_iter().flatten().collect();
    Ok(Reply::ok(
        json!({"schemas": [BULK_RESPONSE_SCHEMA], "Operations": operations}),
    ))
}
