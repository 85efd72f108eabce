//! SCIM filter → SQL `WHERE` clause (SQLite or PostgreSQL), for the attributes that have
//! columns.
//!
//! The translation is a *pre-filter*: it may match more rows than the filter (never fewer), and
//! says when it is exact. Exact translations let the database count and page; inexact ones are
//! completed in memory by `scim::filter::matches` over the candidates. An indexed `eq` (the
//! `userName eq "…"` every IdP sends) is always exact and never deserialises other rows.

use scim::AttrPath;
use scim::filter::{CompareOp, Filter};
use scim::schema::ResourceKind;
use serde_json::Value;

use crate::timefmt;

/// The SQL dialect to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `?` placeholders, `instr`, integer truth values.
    Sqlite,
    /// `$n` placeholders, `strpos`/`right`, boolean truth values. The text columns are
    /// `COLLATE "C"` (byte order, as SQLite's BINARY) and the `_ci` columns hold the same
    /// Rust-folded values, so every comparison means the same in both.
    Postgres,
}

impl Dialect {
    fn truth(self, b: bool) -> &'static str {
        match (self, b) {
            (Dialect::Sqlite, true) => "1",
            (Dialect::Sqlite, false) => "0",
            (Dialect::Postgres, true) => "TRUE",
            (Dialect::Postgres, false) => "FALSE",
        }
    }
}

/// Rewrites the `?` placeholders of `sql` as `$start`, `$start+1`, … (PostgreSQL). The
/// translated SQL holds no literals, so every `?` is a placeholder.
pub(crate) fn number_placeholders(sql: &str, start: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = start;
    for c in sql.chars() {
        if c == '?' {
            out.push('$');
            out.push_str(&n.to_string());
            n += 1;
        } else {
            out.push(c);
        }
    }
    out
}

/// A value bound to a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bind {
    Text(String),
    Int(i64),
}

/// A translated filter: SQL over the alias `t`, its binds, and whether it is exact.
#[derive(Debug, Clone)]
pub(crate) struct SqlFilter {
    pub(crate) sql: String,
    pub(crate) binds: Vec<Bind>,
    pub(crate) exact: bool,
}

/// Translates `filter`; `None` means "no pre-filter possible" (every row is a candidate).
/// PostgreSQL placeholders are numbered from `$1`.
pub(crate) fn translate(kind: ResourceKind, filter: &Filter, d: Dialect) -> Option<SqlFilter> {
    let mut f = tr(kind, filter, d)?;
    if d == Dialect::Postgres {
        f.sql = number_placeholders(&f.sql, 1);
    }
    Some(f)
}

fn tr(kind: ResourceKind, filter: &Filter, d: Dialect) -> Option<SqlFilter> {
    match filter {
        Filter::And(a, b) => match (tr(kind, a, d), tr(kind, b, d)) {
            (Some(x), Some(y)) => Some(combine(x, y, "AND")),
            (Some(mut x), None) | (None, Some(mut x)) => {
                x.exact = false;
                Some(x)
            }
            (None, None) => None,
        },
        Filter::Or(a, b) => {
            let (x, y) = (tr(kind, a, d)?, tr(kind, b, d)?);
            Some(combine(x, y, "OR"))
        }
        Filter::Not(inner) => {
            let x = tr(kind, inner, d)?;
            x.exact.then(|| SqlFilter {
                sql: format!("NOT ({})", x.sql),
                binds: x.binds,
                exact: true,
            })
        }
        Filter::Present(path) => present(kind, path, d),
        Filter::Compare { path, op, value } => compare(kind, path, *op, value, d),
        Filter::ValuePath { path, filter } => value_path(kind, path, filter),
    }
}

fn combine(x: SqlFilter, y: SqlFilter, op: &str) -> SqlFilter {
    let mut binds = x.binds;
    binds.extend(y.binds);
    SqlFilter {
        sql: format!("({} {op} {})", x.sql, y.sql),
        binds,
        exact: x.exact && y.exact,
    }
}

/// The columns a path maps to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Column {
    /// Case-sensitive text, never NULL.
    Exact(&'static str),
    /// Case-folded text, never NULL (compare against a folded value).
    Folded(&'static str),
    /// Case-sensitive text that may be NULL.
    Nullable(&'static str),
    /// A stored timestamp.
    Time(&'static str),
    /// A 0/1 boolean.
    Bool(&'static str),
    /// Membership (`members.value` of a group, `groups.value` of a user).
    Membership,
}

fn column(kind: ResourceKind, path: &AttrPath) -> Option<Column> {
    if let Some(urn) = &path.urn
        && !kind.core().id.eq_ignore_ascii_case(urn)
    {
        return None;
    }
    let attr = path.attr.to_ascii_lowercase();
    let sub = path.sub.as_deref().map(str::to_ascii_lowercase);
    let col = match (kind, attr.as_str(), sub.as_deref()) {
        (_, "id", None) => Column::Exact("t.id"),
        (_, "externalid", None) => Column::Nullable("t.external_id"),
        (_, "meta", Some("created")) => Column::Time("t.created"),
        (_, "meta", Some("lastmodified")) => Column::Time("t.last_modified"),
        (ResourceKind::User, "username", None) => Column::Folded("t.user_name_ci"),
        (ResourceKind::User, "active", None) => Column::Bool("t.active"),
        (ResourceKind::User, "groups", None | Some("value")) => Column::Membership,
        (ResourceKind::Group, "displayname", None) => Column::Folded("t.display_name_ci"),
        (ResourceKind::Group, "members", None | Some("value")) => Column::Membership,
        _ => return None,
    };
    Some(col)
}

fn exact(sql: String, binds: Vec<Bind>) -> Option<SqlFilter> {
    Some(SqlFilter {
        sql,
        binds,
        exact: true,
    })
}

fn present(kind: ResourceKind, path: &AttrPath, d: Dialect) -> Option<SqlFilter> {
    match column(kind, path)? {
        Column::Exact(_) | Column::Folded(_) | Column::Time(_) | Column::Bool(_) => {
            exact(d.truth(true).into(), vec![])
        }
        Column::Nullable(c) => exact(format!("({c} IS NOT NULL AND {c} <> '')"), vec![]),
        Column::Membership => exact(membership_exists(kind, None), vec![]),
    }
}

fn membership_exists(kind: ResourceKind, with_value: Option<()>) -> String {
    let (this, other) = match kind {
        ResourceKind::Group => ("group_id", "member_id"),
        ResourceKind::User => ("member_id", "group_id"),
    };
    let cond = if with_value.is_some() {
        format!(" AND m.{other} = ?")
    } else {
        String::new()
    };
    format!("EXISTS (SELECT 1 FROM group_members m WHERE m.{this} = t.id{cond})")
}

fn compare(
    kind: ResourceKind,
    path: &AttrPath,
    op: CompareOp,
    value: &Value,
    d: Dialect,
) -> Option<SqlFilter> {
    let no = d.truth(false);
    let col = column(kind, path)?;
    match col {
        Column::Bool(c) => {
            let b = match value {
                Value::Bool(b) => *b,
                Value::String(s) if s.eq_ignore_ascii_case("true") => true,
                Value::String(s) if s.eq_ignore_ascii_case("false") => false,
                _ => return None,
            };
            let sql_op = match op {
                CompareOp::Eq => "=",
                CompareOp::Ne => "<>",
                _ => return None,
            };
            exact(format!("{c} {sql_op} ?"), vec![Bind::Int(i64::from(b))])
        }
        Column::Time(c) => {
            let Value::String(s) = value else { return None };
            let Some(t) = timefmt::parse(s) else {
                // A value that is not a date matches nothing, as in memory.
                return exact(no.into(), vec![]);
            };
            let sql_op = ordering_op(op)?;
            exact(
                format!("{c} {sql_op} ?"),
                vec![Bind::Text(timefmt::format(t))],
            )
        }
        Column::Membership => {
            let Value::String(s) = value else { return None };
            (op == CompareOp::Eq).then(|| SqlFilter {
                sql: membership_exists(kind, Some(())),
                binds: vec![Bind::Text(s.clone())],
                exact: true,
            })
        }
        Column::Exact(c) | Column::Folded(c) | Column::Nullable(c) => {
            let Value::String(s) = value else { return None };
            let folded = matches!(col, Column::Folded(_));
            let v = if folded { s.to_lowercase() } else { s.clone() };
            let nullable = matches!(col, Column::Nullable(_));
            let n = v.chars().count() as i64;
            let (sql, binds, is_exact) = match op {
                CompareOp::Eq => (format!("{c} = ?"), vec![Bind::Text(v)], true),
                // Absent values are a matter of the in-memory semantics: stay a superset.
                CompareOp::Ne if nullable => (
                    format!("({c} IS NULL OR {c} <> ?)"),
                    vec![Bind::Text(v)],
                    false,
                ),
                CompareOp::Ne => (format!("{c} <> ?"), vec![Bind::Text(v)], true),
                CompareOp::Co => (
                    match d {
                        Dialect::Sqlite => format!("COALESCE(instr({c}, ?) > 0, {no})"),
                        Dialect::Postgres => format!("COALESCE(strpos({c}, ?) > 0, {no})"),
                    },
                    vec![Bind::Text(v)],
                    true,
                ),
                CompareOp::Sw => (
                    match d {
                        Dialect::Sqlite => format!("COALESCE(substr({c}, 1, ?) = ?, {no})"),
                        Dialect::Postgres => {
                            format!("COALESCE(substr({c}, 1, CAST(? AS INTEGER)) = ?, {no})")
                        }
                    },
                    vec![Bind::Int(n), Bind::Text(v)],
                    true,
                ),
                CompareOp::Ew if n == 0 => (format!("{c} IS NOT NULL"), vec![], true),
                CompareOp::Ew => (
                    match d {
                        Dialect::Sqlite => format!("COALESCE(substr({c}, -?) = ?, {no})"),
                        Dialect::Postgres => {
                            format!("COALESCE(right({c}, CAST(? AS INTEGER)) = ?, {no})")
                        }
                    },
                    vec![Bind::Int(n), Bind::Text(v)],
                    true,
                ),
                CompareOp::Gt | CompareOp::Ge | CompareOp::Lt | CompareOp::Le => {
                    let sql_op = ordering_op(op)?;
                    (
                        format!("COALESCE({c} {sql_op} ?, {no})"),
                        vec![Bind::Text(v)],
                        true,
                    )
                }
            };
            Some(SqlFilter {
                sql,
                binds,
                exact: is_exact,
            })
        }
    }
}

fn ordering_op(op: CompareOp) -> Option<&'static str> {
    Some(match op {
        CompareOp::Eq => "=",
        CompareOp::Ne => "<>",
        CompareOp::Gt => ">",
        CompareOp::Ge => ">=",
        CompareOp::Lt => "<",
        CompareOp::Le => "<=",
        _ => return None,
    })
}

/// `members[value eq "x"]` (groups) and `groups[value eq "x"]` (users) become an `EXISTS`.
fn value_path(kind: ResourceKind, path: &AttrPath, inner: &Filter) -> Option<SqlFilter> {
    if column(kind, path)? != Column::Membership {
        return None;
    }
    match inner {
        Filter::Compare {
            path: p,
            op: CompareOp::Eq,
            value: Value::String(s),
        } if p.urn.is_none() && p.sub.is_none() && p.attr.eq_ignore_ascii_case("value") => exact(
            membership_exists(kind, Some(())),
            vec![Bind::Text(s.clone())],
        ),
        Filter::Or(a, b) => {
            let x = value_path(kind, path, a)?;
            let y = value_path(kind, path, b)?;
            Some(combine(x, y, "OR"))
        }
        _ => None,
    }
}

/// The column an indexed sort uses, if the sort attribute has one.
pub(crate) fn sort_column(kind: ResourceKind, path: &AttrPath) -> Option<&'static str> {
    match column(kind, path)? {
        Column::Exact(c) | Column::Folded(c) | Column::Time(c) => Some(c),
        // NULLs sort first in SQLite ascending; in-memory sorting puts them last.
        Column::Nullable(_) | Column::Bool(_) | Column::Membership => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmp(path: &str, op: CompareOp, value: Value) -> Filter {
        Filter::Compare {
            path: AttrPath::parse(path).unwrap(),
            op,
            value,
        }
    }

    /// A filter and its expected translation (SQL, exact).
    type Case = (ResourceKind, Filter, Option<(&'static str, bool)>);

    #[test]
    fn translates_indexed_leaves() {
        let cases: Vec<Case> = vec![
            (
                ResourceKind::User,
                cmp("userName", CompareOp::Eq, json!("Alice")),
                Some(("t.user_name_ci = ?", true)),
            ),
            (
                ResourceKind::User,
                cmp("USERNAME", CompareOp::Sw, json!("al")),
                Some(("COALESCE(substr(t.user_name_ci, 1, ?) = ?, 0)", true)),
            ),
            (
                ResourceKind::User,
                cmp("externalId", CompareOp::Ne, json!("x")),
                Some(("(t.external_id IS NULL OR t.external_id <> ?)", false)),
            ),
            (
                ResourceKind::User,
                cmp("active", CompareOp::Eq, json!("False")),
                Some(("t.active = ?", true)),
            ),
            (
                ResourceKind::User,
                cmp(
                    "meta.lastModified",
                    CompareOp::Gt,
                    json!("2011-05-13T04:42:34Z"),
                ),
                Some(("t.last_modified > ?", true)),
            ),
            (
                ResourceKind::User,
                cmp("title", CompareOp::Eq, json!("x")),
                None,
            ),
            (
                ResourceKind::Group,
                cmp("displayName", CompareOp::Eq, json!("Ops")),
                Some(("t.display_name_ci = ?", true)),
            ),
            (
                ResourceKind::Group,
                cmp("members.value", CompareOp::Eq, json!("u1")),
                Some((
                    "EXISTS (SELECT 1 FROM group_members m WHERE m.group_id = t.id AND m.member_id = ?)",
                    true,
                )),
            ),
            (
                ResourceKind::User,
                Filter::And(
                    Box::new(cmp("userName", CompareOp::Eq, json!("a"))),
                    Box::new(Filter::Present(AttrPath::parse("title").unwrap())),
                ),
                Some(("t.user_name_ci = ?", false)),
            ),
        ];
        for (kind, f, want) in cases {
            let got = translate(kind, &f, Dialect::Sqlite);
            match (got, want) {
                (None, None) => {}
                (Some(g), Some((sql, ex))) => {
                    assert_eq!(g.sql, sql, "{f:?}");
                    assert_eq!(g.exact, ex, "{f:?}");
                }
                (g, w) => panic!("{f:?}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn postgres_numbers_placeholders_and_uses_its_functions() {
        let f = Filter::Or(
            Box::new(cmp("userName", CompareOp::Ew, json!("ICE"))),
            Box::new(Filter::And(
                Box::new(cmp("externalId", CompareOp::Co, json!("x"))),
                Box::new(cmp("meta.created", CompareOp::Eq, json!("not a date"))),
            )),
        );
        let g = translate(ResourceKind::User, &f, Dialect::Postgres).unwrap();
        assert_eq!(
            g.sql,
            "(COALESCE(right(t.user_name_ci, CAST($1 AS INTEGER)) = $2, FALSE) OR \
             (COALESCE(strpos(t.external_id, $3) > 0, FALSE) AND FALSE))"
        );
        assert_eq!(
            g.binds,
            vec![
                Bind::Int(3),
                Bind::Text("ice".into()),
                Bind::Text("x".into())
            ]
        );
        assert!(g.exact);
        let s = translate(ResourceKind::User, &f, Dialect::Sqlite).unwrap();
        assert_eq!(
            s.sql,
            "(COALESCE(substr(t.user_name_ci, -?) = ?, 0) OR \
             (COALESCE(instr(t.external_id, ?) > 0, 0) AND 0))"
        );
        assert_eq!(s.binds, g.binds);
    }
}
