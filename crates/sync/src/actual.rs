//! Reads TeamCity's users and groups into an [`ActualState`], in pages, with
//! `fields=` limited to what the plan needs. A reconcile with no drift costs
//! one call per page of users, one call for all groups (TeamCity's group list
//! is not paged), and — only for managed users already marked deactivated —
//! one token list each, so tokens created after deactivation are revoked too.
//! Users about to be deactivated need no token read: the plan revokes theirs
//! unconditionally.

use std::collections::BTreeSet;

use teamcity::{Client, Locator, TeamCityError, User};

use crate::model::{
    ALL_USERS_GROUP, ActualGroup, ActualState, ActualUser, GROUP_MARKER, ReadFailure, RoleAt,
    USER_DEACTIVATED, USER_MARKER,
};

/// `fields=` for the user pages.
pub const USER_FIELDS: &str = "count,user(id,username,name,email,properties(property(name,value)),groups(group(key)),roles(role(roleId,scope)))";

/// `fields=` for the group list.
pub const GROUP_FIELDS: &str =
    "count,group(key,name,properties(property(name,value)),roles(role(roleId,scope)))";

/// How to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Users per page.
    pub page_size: u64,
    /// Read token counts of managed users marked deactivated.
    pub deactivated_tokens: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            page_size: 500,
            deactivated_tokens: true,
        }
    }
}

/// What reading cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// All TeamCity calls made.
    pub calls: u64,
    /// User pages read.
    pub user_pages: u64,
    /// Token lists read.
    pub token_reads: u64,
}

fn to_user(u: User) -> Option<ActualUser> {
    let props = u.properties.unwrap_or_default();
    Some(ActualUser {
        id: u.id?,
        username: u.username.unwrap_or_default(),
        name: u.name,
        email: u.email,
        scim_id: props.get(USER_MARKER).map(str::to_owned),
        deactivated: props.get(USER_DEACTIVATED) == Some("true"),
        groups: u
            .groups
            .map(|g| g.group)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|g| g.key)
            .filter(|k| k != ALL_USERS_GROUP)
            .collect(),
        roles: u
            .roles
            .map(|r| r.role)
            .unwrap_or_default()
            .iter()
            .filter_map(RoleAt::from_assignment)
            .collect(),
        token_count: None,
    })
}

/// Reads one user again (pinned to the username the bridge knows), e.g. before it is
/// offboarded, so groups and roles given by hand since the last full read are seen too.
/// `Ok(None)` when TeamCity's user `id` no longer has that username (or is gone).
pub async fn read_user(
    client: &Client,
    id: u64,
    username: &str,
) -> Result<Option<ActualUser>, TeamCityError> {
    let fields = USER_FIELDS
        .strip_prefix("count,user(")
        .and_then(|f| f.strip_suffix(')'))
        .unwrap_or(USER_FIELDS);
    let user = client
        .find_user(&Locator::user_pinned(id, username), Some(fields))
        .await?;
    Ok(user.and_then(to_user))
}

/// [`read_actual_with`] with default options and the given page size.
pub async fn read_actual(
    client: &Client,
    page_size: u64,
) -> Result<(ActualState, ReadStats), TeamCityError> {
    read_actual_with(
        client,
        ReadOptions {
            page_size,
            ..ReadOptions::default()
        },
    )
    .await
}

/// Reads users (paged) and groups; see the module docs for the cost.
pub async fn read_actual_with(
    client: &Client,
    opts: ReadOptions,
) -> Result<(ActualState, ReadStats), TeamCityError> {
    let page_size = opts.page_size.max(1);
    let mut stats = ReadStats::default();
    let mut users = Vec::new();
    let mut start = 0;
    loop {
        let locator = Locator::new().count(page_size).start(start);
        let page = client.list_users(&locator, Some(USER_FIELDS)).await?;
        stats.calls += 1;
        stats.user_pages += 1;
        let got = page.user.len() as u64;
        users.extend(page.user.into_iter().filter_map(to_user));
        if got < page_size {
            break;
        }
        start += got;
    }
    let listed = client.list_groups(Some(GROUP_FIELDS)).await?;
    stats.calls += 1;
    let mut groups = Vec::with_capacity(listed.group.len());
    let mut all_users_roles = BTreeSet::new();
    for g in listed.group {
        let Some(key) = g.key else { continue };
        let roles: BTreeSet<RoleAt> = g
            .roles
            .map(|r| r.role)
            .unwrap_or_default()
            .iter()
            .filter_map(RoleAt::from_assignment)
            .collect();
        if key == ALL_USERS_GROUP {
            all_users_roles = roles;
            continue;
        }
        groups.push(ActualGroup {
            name: g.name.unwrap_or_default(),
            marker: g
                .properties
                .as_ref()
                .and_then(|p| p.get(GROUP_MARKER))
                .map(str::to_owned),
            roles,
            key,
        });
    }
    let mut read_failures = Vec::new();
    if opts.deactivated_tokens {
        for u in users.iter_mut().filter(|u| u.is_managed() && u.deactivated) {
            stats.calls += 1;
            stats.token_reads += 1;
            match client
                .list_tokens(&Locator::user_pinned(u.id, &u.username))
                .await
            {
                Ok(tokens) => u.token_count = Some(tokens.len() as u64),
                // One user's tokens that cannot be read (a 403 on that user, say) fail that
                // user's token work alone; TeamCity down or the bridge misconfigured fails
                // the read.
                Err(e) if e.is_transient() || e.is_misconfiguration() => return Err(e),
                Err(e) => read_failures.push(ReadFailure {
                    user: u.id,
                    what: "tokens",
                    error: e.to_string(),
                }),
            }
        }
    }
    Ok((
        ActualState {
            users,
            groups,
            all_users_roles,
            read_failures,
        },
        stats,
    ))
}
