//! Renders a plan the way `terraform plan` does: one block per user and per
//! group, `+` (add), `-` (remove), `~` (change) lines, and a summary line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::{Action, ActualState, UserRef};
use crate::plan::Plan;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Add,
    Change,
    Destroy,
}

struct Block {
    status: Status,
    title: String,
    lines: Vec<String>,
}

impl Block {
    fn new(title: String) -> Self {
        Block {
            status: Status::Change,
            title,
            lines: Vec::new(),
        }
    }
}

fn q(v: &Option<String>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "(none)".into(),
    }
}

/// Text of `plan` against `actual`; ends with the summary line, or with
/// "No changes. TeamCity matches the directory." when there is nothing to do.
pub fn render(plan: &Plan, actual: &ActualState) -> String {
    let mut new_users: BTreeMap<&str, &str> = BTreeMap::new();
    let mut group_names: BTreeMap<&str, &str> = actual
        .groups
        .iter()
        .map(|g| (g.key.as_str(), g.name.as_str()))
        .collect();
    for a in &plan.actions {
        match a {
            Action::CreateUser {
                scim_id, username, ..
            } => {
                new_users.insert(scim_id, username);
            }
            Action::CreateGroup { key, name, .. } => {
                group_names.insert(key, name);
            }
            _ => {}
        }
    }
    let user_title = |u: &UserRef| match u {
        UserRef::Id(id) => match actual.user(*id) {
            Some(a) => format!("user {:?} (id:{id})", a.username),
            None => format!("user id:{id}"),
        },
        UserRef::New(s) => format!(
            "user {:?} (scim {s})",
            new_users.get(s.as_str()).copied().unwrap_or("?")
        ),
    };
    let user_label = |u: &UserRef| match u {
        UserRef::Id(id) => actual
            .user(*id)
            .map_or_else(|| format!("id:{id}"), |a| format!("{:?}", a.username)),
        UserRef::New(s) => format!("{:?}", new_users.get(s.as_str()).copied().unwrap_or(s)),
    };
    let group_label = |k: &str| format!("{:?}", group_names.get(k).copied().unwrap_or(k));

    let mut users: Vec<(UserRef, Block)> = Vec::new();
    let mut groups: Vec<(String, Block)> = Vec::new();
    fn user_block(
        users: &mut Vec<(UserRef, Block)>,
        u: UserRef,
        title: impl FnOnce(&UserRef) -> String,
    ) -> &mut Block {
        let i = match users.iter().position(|(r, _)| *r == u) {
            Some(i) => i,
            None => {
                let t = title(&u);
                users.push((u, Block::new(t)));
                users.len() - 1
            }
        };
        &mut users[i].1
    }
    fn group_block<'a>(
        groups: &'a mut Vec<(String, Block)>,
        key: &str,
        title: impl FnOnce() -> String,
    ) -> &'a mut Block {
        let i = match groups.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                groups.push((key.to_owned(), Block::new(title())));
                groups.len() - 1
            }
        };
        &mut groups[i].1
    }
    let gtitle = |k: &str| format!("group {} [{k}]", group_label(k));

    // What each step waits for, and why a step needs a person, as line suffixes.
    let short = |a: &Action| -> String {
        match a {
            Action::CreateUser { scim_id, .. } => format!(
                "create user {:?}",
                new_users.get(scim_id.as_str()).copied().unwrap_or("?")
            ),
            Action::CreateGroup { key, .. } => format!("create group {}", group_label(key)),
            Action::AdoptUser { user, .. } => format!("adopt {}", user_label(&UserRef::Id(*user))),
            Action::DeleteGroup { key } => format!("delete group {}", group_label(key)),
            Action::RemoveFromGroup { group, .. } => {
                format!("leaves of group {}", group_label(group))
            }
            other => crate::apply::kind(other).replace('_', " "),
        }
    };
    let suffix = |i: usize| -> String {
        let mut s = String::new();
        let deps = plan.deps.get(i).map(Vec::as_slice).unwrap_or_default();
        if !deps.is_empty() {
            let mut names: Vec<String> = deps.iter().map(|&j| short(&plan.actions[j])).collect();
            names.dedup();
            let shown = if names.len() > 3 {
                format!("{} and {} more", names[..3].join(", "), names.len() - 3)
            } else {
                names.join(", ")
            };
            let _ = write!(s, "   (after: {shown})");
        }
        if let Some(o) = plan.orphans.get(&i) {
            let _ = write!(
                s,
                "   [awaits approval: the directory does not know {} {}]",
                o.entity, o.scim_id
            );
        }
        s
    };

    for (i, a) in plan.actions.iter().enumerate() {
        let sfx = suffix(i);
        let line = |text: String| format!("{text}{sfx}");
        match a {
            Action::CreateUser {
                scim_id,
                name,
                email,
                groups,
                ..
            } => {
                let b = user_block(&mut users, UserRef::New(scim_id.clone()), user_title);
                b.status = Status::Add;
                b.lines.push(line(format!("+ name:  {}", q(name))));
                b.lines.push(format!("+ email: {}", q(email)));
                for g in groups {
                    b.lines.push(format!("+ group {}", group_label(g)));
                }
            }
            Action::AdoptUser { user, scim_id } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line(format!(
                        "~ adopt user {} (marks it as SCIM user {scim_id})",
                        user_label(&UserRef::Id(*user))
                    )));
            }
            Action::UpdateUser { user, changes } => {
                let b = user_block(&mut users, UserRef::Id(*user), user_title);
                for c in changes {
                    b.lines.push(line(format!(
                        "~ {}: {} -> {}",
                        c.field,
                        q(&c.from),
                        q(&c.to)
                    )));
                }
            }
            Action::DeleteUser { user } => {
                let b = user_block(&mut users, UserRef::Id(*user), user_title);
                b.status = Status::Destroy;
                if !sfx.is_empty() {
                    b.lines.push(line("- user".into()));
                }
            }
            Action::AddToGroup { user, group } => user_block(&mut users, user.clone(), user_title)
                .lines
                .push(line(format!("+ group {}", group_label(group)))),
            Action::RemoveFromGroup { user, group } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line(format!("- group {}", group_label(group))));
            }
            Action::AddUserRole { user, role } => user_block(&mut users, user.clone(), user_title)
                .lines
                .push(line(format!("+ role {role}"))),
            Action::RemoveUserRole { user, role } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line(format!("- role {role}")));
            }
            Action::RevokeTokens { user } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line("- all access tokens".into()));
            }
            Action::ResetPassword { user } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line("~ password: (random)".into()));
            }
            Action::ClearRememberMe { user } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line("- remember-me data".into()));
            }
            Action::EndSessions { user } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line("- sessions".into()));
            }
            Action::SetDeactivated { user } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line("~ deactivated: false -> true".into()));
            }
            Action::ClearDeactivated { user } => {
                user_block(&mut users, UserRef::Id(*user), user_title)
                    .lines
                    .push(line("~ deactivated: true -> false".into()));
            }
            Action::CreateGroup {
                key,
                roles,
                members,
                ..
            } => {
                let b = group_block(&mut groups, key, || gtitle(key));
                b.status = Status::Add;
                if !sfx.is_empty() {
                    b.lines.push(line("+ group".into()));
                }
                for r in roles {
                    b.lines.push(format!("+ role {r}"));
                }
                for m in members {
                    b.lines.push(format!("+ member {}", user_label(m)));
                }
            }
            Action::DeleteGroup { key } => {
                let b = group_block(&mut groups, key, || gtitle(key));
                b.status = Status::Destroy;
                if !sfx.is_empty() {
                    b.lines.push(line("- group".into()));
                }
            }
            Action::AddGroupRole { group, role } => {
                group_block(&mut groups, group, || gtitle(group))
                    .lines
                    .push(line(format!("+ role {role}")))
            }
            Action::RemoveGroupRole { group, role } => {
                group_block(&mut groups, group, || gtitle(group))
                    .lines
                    .push(line(format!("- role {role}")))
            }
        }
    }

    let mut out = String::new();
    let (mut add, mut change, mut destroy) = (0, 0, 0);
    for b in users
        .iter()
        .map(|(_, b)| b)
        .chain(groups.iter().map(|(_, b)| b))
    {
        let sign = match b.status {
            Status::Add => {
                add += 1;
                '+'
            }
            Status::Change => {
                change += 1;
                '~'
            }
            Status::Destroy => {
                destroy += 1;
                '-'
            }
        };
        let _ = writeln!(out, "  {sign} {}", b.title);
        for l in &b.lines {
            let _ = writeln!(out, "      {l}");
        }
        out.push('\n');
    }
    for c in &plan.conflicts {
        let _ = writeln!(out, "  ! conflict: {c}");
    }
    for r in &plan.reports {
        let _ = writeln!(out, "  # {r}");
    }
    if !plan.conflicts.is_empty() || !plan.reports.is_empty() {
        out.push('\n');
    }
    if plan.actions.is_empty() {
        out.push_str("No changes. TeamCity matches the directory.\n");
    } else {
        let _ = writeln!(
            out,
            "Plan: {add} to add, {change} to change, {destroy} to destroy."
        );
    }
    out
}
