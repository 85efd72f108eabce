//! Executes plan steps against TeamCity, idempotently:
//! - every user is addressed by a pinned locator, `id:N,username:U` with the username the
//!   bridge expects: when TeamCity's user N is no longer that user (a restored backup, a user
//!   deleted and re-created by hand), TeamCity answers 404 and nothing reaches another person;
//! - a 404 on a delete or a leave means it is already done (reported as
//!   [`Applied::missing`], so the caller re-reads that object before it trusts its cache);
//! - adding an existing member or role is a TeamCity no-op;
//! - creating a user or group that already exists *with our marker for the same SCIM id*
//!   adopts it (a previous apply got that far);
//! - ending sessions on a server without `POST /users/{u}/logout`, or clearing remember-me
//!   data on one without `DELETE /users/{u}/debug/rememberMe` (a 405, or a 404 while the user
//!   is there), is noted in [`Applied::sessions_unsupported`] /
//!   [`Applied::remember_me_unsupported`], never a failure.
//!
//! [`apply_step`] runs one step; [`apply`] runs a list in order and stops at the first
//! failure (the engine schedules steps itself, see `engine`).

use std::collections::{BTreeMap, HashMap};

use teamcity::{Client, Locator, NewGroup, NewUser, TeamCityError, UserField, UserUpdate};

use crate::model::{
    Action, ActualState, DEFAULTS_MARKER, Field, GROUP_DESCRIPTION, GROUP_MARKER, USER_DEACTIVATED,
    USER_MARKER, UserRef,
};

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Actions completed.
    pub applied: usize,
    /// Tokens deleted by [`Action::RevokeTokens`].
    pub tokens_revoked: usize,
    /// Users or groups that already existed with our marker and were adopted
    /// (SCIM id or marker → TeamCity id or key).
    pub adopted: Vec<String>,
}

/// The action at `index` failed.
#[derive(Debug, thiserror::Error)]
#[error("action {index} ({kind}) failed: {error}")]
pub struct ApplyError {
    /// Index in the action list.
    pub index: usize,
    /// Short kind of the action.
    pub kind: &'static str,
    /// Actions completed before it.
    pub report: ApplyReport,
    /// The TeamCity error.
    #[source]
    pub error: TeamCityError,
}

/// What one step did, beyond succeeding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// A `CreateUser`'s new TeamCity user: (SCIM id, TeamCity id).
    pub created: Option<(String, u64)>,
    /// Names of the tokens a `RevokeTokens` deleted (never their values).
    pub tokens: Vec<String>,
    /// `EndSessions` met a TeamCity without the logout endpoint.
    pub sessions_unsupported: bool,
    /// `ClearRememberMe` met a TeamCity without the remember-me endpoint.
    pub remember_me_unsupported: bool,
    /// A user or group that already existed with our marker was taken as created.
    pub adopted: Option<String>,
    /// TeamCity answered 404 and the step counted as done (a delete or a leave): the cached
    /// state was wrong about this object.
    pub missing: bool,
}

/// The usernames the bridge expects its users to have: TeamCity id → username. Every write
/// to a user is pinned to both.
pub type Usernames<'a> = HashMap<u64, &'a str>;

/// The usernames of `actual`'s users.
pub fn usernames(actual: &ActualState) -> Usernames<'_> {
    actual
        .users
        .iter()
        .map(|u| (u.id, u.username.as_str()))
        .collect()
}

/// A short name for metrics and logs.
pub fn kind(action: &Action) -> &'static str {
    match action {
        Action::CreateUser { .. } => "create_user",
        Action::UpdateUser { .. } => "update_user",
        Action::DeleteUser { .. } => "delete_user",
        Action::AddToGroup { .. } => "add_to_group",
        Action::RemoveFromGroup { .. } => "remove_from_group",
        Action::AddUserRole { .. } => "add_user_role",
        Action::RemoveUserRole { .. } => "remove_user_role",
        Action::RevokeTokens { .. } => "revoke_tokens",
        Action::ResetPassword { .. } => "reset_password",
        Action::EndSessions { .. } => "end_sessions",
        Action::ClearRememberMe { .. } => "clear_remember_me",
        Action::AdoptUser { .. } => "adopt_user",
        Action::SetDeactivated { .. } => "set_deactivated",
        Action::ClearDeactivated { .. } => "clear_deactivated",
        Action::CreateGroup { .. } => "create_group",
        Action::DeleteGroup { .. } => "delete_group",
        Action::AddGroupRole { .. } => "add_group_role",
        Action::RemoveGroupRole { .. } => "remove_group_role",
    }
}

fn resolve(user: &UserRef, created: &BTreeMap<String, u64>) -> Result<u64, TeamCityError> {
    match user {
        UserRef::Id(id) => Ok(*id),
        UserRef::New(scim) => created.get(scim).copied().ok_or_else(|| {
            TeamCityError::InvalidInput(format!(
                "user {scim} is created earlier in the plan but was not"
            ))
        }),
    }
}

/// The pinned locator of user `id`.
fn pinned(id: u64, names: &Usernames<'_>) -> Result<Locator, TeamCityError> {
    names
        .get(&id)
        .map(|name| Locator::user_pinned(id, name))
        .ok_or_else(|| {
            TeamCityError::InvalidInput(format!(
                "TeamCity user id:{id} is not in the bridge's view of TeamCity; it is re-read first"
            ))
        })
}

/// A 404 on a removal: already done, but the cache was wrong about the object.
fn done_if_missing(r: Result<(), TeamCityError>, out: &mut Applied) -> Result<(), TeamCityError> {
    match r {
        Err(e) if e.is_not_found() => {
            out.missing = true;
            Ok(())
        }
        other => other,
    }
}

/// The result of a call to an endpoint that some TeamCity versions lack (logout: newer servers
/// only; remember-me: older ones only): `Ok(true)` when this server does not have it — a 405,
/// or a 404 while the user is there (a user that changed answers 404 too, and stays an error).
async fn endpoint_missing(
    client: &Client,
    user: &Locator,
    result: Result<(), TeamCityError>,
) -> Result<bool, TeamCityError> {
    match result {
        Ok(()) => Ok(false),
        Err(e) if e.status() == Some(405) => Ok(true),
        Err(e) if e.is_not_found() => match client.find_user(user, Some("id")).await? {
            Some(_) => Ok(true),
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Applies `actions` in order against a TeamCity that `actual` describes, stopping at the
/// first failure. `created` collects the users created on the way (SCIM id → TeamCity id),
/// so a retry resolves [`UserRef::New`] without creating twice.
pub async fn apply(
    client: &Client,
    actions: &[Action],
    actual: &ActualState,
    created: &mut BTreeMap<String, u64>,
) -> Result<ApplyReport, ApplyError> {
    let mut report = ApplyReport::default();
    // Usernames as the steps change them (creates, renames).
    let mut names: HashMap<u64, String> = actual
        .users
        .iter()
        .map(|u| (u.id, u.username.clone()))
        .collect();
    for (scim_id, id) in created.iter() {
        if let Some(Action::CreateUser { username, .. }) = actions
            .iter()
            .find(|a| matches!(a, Action::CreateUser { scim_id: s, .. } if s == scim_id))
        {
            names.insert(*id, username.clone());
        }
    }
    for (index, action) in actions.iter().enumerate() {
        let kind = kind(action);
        let view: Usernames<'_> = names.iter().map(|(i, n)| (*i, n.as_str())).collect();
        let result = apply_step(client, action, created, &view).await;
        drop(view);
        match result {
            Ok(done) => {
                report.applied += 1;
                report.tokens_revoked += done.tokens.len();
                report.adopted.extend(done.adopted);
                if let Some((scim_id, id)) = done.created {
                    created.insert(scim_id, id);
                    if let Action::CreateUser { username, .. } = action {
                        names.insert(id, username.clone());
                    }
                }
                if let Action::UpdateUser { user, changes } = action {
                    for c in changes {
                        if let (Field::Username, Some(v)) = (c.field, &c.to) {
                            names.insert(*user, v.clone());
                        }
                    }
                }
            }
            Err(error) => {
                return Err(ApplyError {
                    index,
                    kind,
                    report,
                    error,
                });
            }
        }
    }
    Ok(report)
}

/// Applies one step. `created` resolves [`UserRef::New`]; `names` pins every user write.
pub async fn apply_step(
    client: &Client,
    action: &Action,
    created: &BTreeMap<String, u64>,
    names: &Usernames<'_>,
) -> Result<Applied, TeamCityError> {
    let mut out = Applied::default();
    let kind = kind(action);
    let result = step(client, action, created, names, &mut out).await;
    match &result {
        Ok(()) => {
            metrics::counter!("teamcity_scim_sync_actions_total", "kind" => kind).increment(1);
        }
        Err(error) => {
            metrics::counter!("teamcity_scim_sync_action_errors_total", "kind" => kind)
                .increment(1);
            tracing::warn!(kind, error = %error, "sync action failed");
        }
    }
    result.map(|()| out)
}

async fn step(
    client: &Client,
    action: &Action,
    created: &BTreeMap<String, u64>,
    names: &Usernames<'_>,
    out: &mut Applied,
) -> Result<(), TeamCityError> {
    match action {
        Action::CreateUser {
            scim_id,
            username,
            name,
            email,
            groups,
        } => {
            if let Some(id) = created.get(scim_id) {
                out.created = Some((scim_id.clone(), *id));
                return Ok(());
            }
            let new = NewUser {
                username: username.clone(),
                name: name.clone(),
                email: email.clone(),
                properties: vec![(USER_MARKER.to_owned(), scim_id.clone())],
                groups: groups.clone(),
            };
            match client.create_user(&new).await {
                Ok(u) => {
                    let id =
                        u.id.ok_or_else(|| TeamCityError::Decode("created user has no id".into()))?;
                    out.created = Some((scim_id.clone(), id));
                    Ok(())
                }
                Err(e) if e.is_conflict() => {
                    let holder = client
                        .find_user(
                            &Locator::by_username(username),
                            Some("id,username,properties(property(name,value))"),
                        )
                        .await?;
                    match holder.and_then(|h| {
                        let ours = h.properties.as_ref().and_then(|p| p.get(USER_MARKER))
                            == Some(scim_id.as_str());
                        ours.then_some(h.id).flatten()
                    }) {
                        Some(id) => {
                            out.created = Some((scim_id.clone(), id));
                            out.adopted = Some(format!("user {scim_id} -> id:{id}"));
                            Ok(())
                        }
                        None => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        }
        Action::AdoptUser { user, scim_id } => {
            client
                .set_user_property(&pinned(*user, names)?, USER_MARKER, scim_id)
                .await
        }
        Action::UpdateUser { user, changes } => {
            let loc = pinned(*user, names)?;
            let mut update = UserUpdate::default();
            let mut clears = Vec::new();
            for c in changes {
                match (c.field, &c.to) {
                    (Field::Username, Some(v)) => update.username = Some(v.clone()),
                    (Field::Name, Some(v)) => update.name = Some(v.clone()),
                    (Field::Email, Some(v)) => update.email = Some(v.clone()),
                    (Field::Name, None) => clears.push(UserField::Name),
                    (Field::Email, None) => clears.push(UserField::Email),
                    (Field::Username, None) => {
                        return Err(TeamCityError::InvalidInput(
                            "username cannot be cleared".into(),
                        ));
                    }
                }
            }
            // Clears first: they address the user by its current username, which the update
            // may change.
            for f in clears {
                client.set_user_field(&loc, f, None).await?;
            }
            if update.username.is_some() || update.name.is_some() || update.email.is_some() {
                client.update_user(&loc, &update).await?;
            }
            Ok(())
        }
        Action::DeleteUser { user } => {
            done_if_missing(client.delete_user(&pinned(*user, names)?).await, out)
        }
        Action::AddToGroup { user, group } => {
            let id = resolve(user, created)?;
            let loc = match user {
                UserRef::Id(_) => pinned(id, names)?,
                UserRef::New(_) => Locator::by_id(id),
            };
            client.add_user_to_group(&loc, group).await
        }
        Action::RemoveFromGroup { user, group } => done_if_missing(
            client
                .remove_user_from_group(&pinned(*user, names)?, group)
                .await,
            out,
        ),
        Action::AddUserRole { user, role } => {
            let id = resolve(user, created)?;
            let loc = match user {
                UserRef::Id(_) => pinned(id, names)?,
                UserRef::New(_) => Locator::by_id(id),
            };
            client
                .add_user_role(&loc, &role.role, &role.tc_scope())
                .await
        }
        Action::RemoveUserRole { user, role } => done_if_missing(
            client
                .remove_user_role(&pinned(*user, names)?, &role.role, &role.tc_scope())
                .await,
            out,
        ),
        Action::RevokeTokens { user } => {
            out.tokens = client.revoke_all_tokens(&pinned(*user, names)?).await?;
            Ok(())
        }
        Action::ResetPassword { user } => client.randomize_password(&pinned(*user, names)?).await,
        Action::ClearRememberMe { user } => {
            let loc = pinned(*user, names)?;
            let r = client.delete_remember_me(&loc).await;
            out.remember_me_unsupported = endpoint_missing(client, &loc, r).await?;
            Ok(())
        }
        Action::EndSessions { user } => {
            let loc = pinned(*user, names)?;
            let r = client.logout_user(&loc).await;
            out.sessions_unsupported = endpoint_missing(client, &loc, r).await?;
            Ok(())
        }
        Action::SetDeactivated { user } => {
            client
                .set_user_property(&pinned(*user, names)?, USER_DEACTIVATED, "true")
                .await
        }
        Action::ClearDeactivated { user } => {
            client
                .delete_user_property(&pinned(*user, names)?, USER_DEACTIVATED)
                .await
        }
        Action::CreateGroup {
            key,
            name,
            marker,
            roles,
            members,
            replaces,
        } => {
            // Members created earlier in the plan whose create failed are left out; they
            // join once they exist.
            let mut ids = Vec::with_capacity(members.len());
            for m in members {
                if let Ok(id) = resolve(m, created) {
                    ids.push(id);
                }
            }
            // A rename swap carries over the members an administrator added by hand to the
            // old group since the bridge last read it (users without our marker).
            if let Some(old) = replaces {
                let group = client
                    .get_group(
                        &Locator::by_key(old),
                        Some("key,users(user(id,properties(property(name,value))))"),
                    )
                    .await?;
                for u in group.users.map(|u| u.user).unwrap_or_default() {
                    let ours = u
                        .properties
                        .as_ref()
                        .is_some_and(|p| p.get(USER_MARKER).is_some());
                    if let Some(id) = u.id
                        && !ours
                        && !ids.contains(&id)
                    {
                        ids.push(id);
                    }
                }
            }
            let description = if marker == DEFAULTS_MARKER {
                format!("{GROUP_DESCRIPTION}. Holds every active managed user.")
            } else {
                GROUP_DESCRIPTION.to_owned()
            };
            let group = NewGroup {
                key: key.clone(),
                name: name.clone(),
                description: Some(description),
                roles: roles
                    .iter()
                    .map(|r| (r.role.clone(), r.tc_scope()))
                    .collect(),
                members: ids,
                properties: vec![(GROUP_MARKER.to_owned(), marker.clone())],
            };
            match client.create_group(&group).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_conflict() => {
                    let existing = client
                        .find_group(
                            &Locator::by_key(key),
                            Some("key,properties(property(name,value))"),
                        )
                        .await?;
                    let ours = existing
                        .as_ref()
                        .and_then(|g| g.properties.as_ref())
                        .and_then(|p| p.get(GROUP_MARKER))
                        == Some(marker.as_str());
                    if ours {
                        out.adopted = Some(format!("group {marker} -> {key}"));
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
                Err(e) => Err(e),
            }
        }
        Action::DeleteGroup { key } => {
            done_if_missing(client.delete_group(&Locator::by_key(key)).await, out)
        }
        Action::AddGroupRole { group, role } => {
            client
                .add_group_role(&Locator::by_key(group), &role.role, &role.tc_scope())
                .await
        }
        Action::RemoveGroupRole { group, role } => done_if_missing(
            client
                .remove_group_role(&Locator::by_key(group), &role.role, &role.tc_scope())
                .await,
            out,
        ),
    }
}
