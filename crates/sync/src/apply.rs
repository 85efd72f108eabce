//! Executes a plan against TeamCity, in order, idempotently:
//! - a 404 on a delete or a leave means it is already done;
//! - adding an existing member or role is a TeamCity no-op;
//! - creating a user or group that already exists *with our marker for the
//!   same SCIM id* adopts it (a previous apply got that far).
//!
//! It stops at the first failure and says which action failed; the caller
//! retries (transient errors) or reports. Users created on the way are
//! recorded in `created` (SCIM id → TeamCity id) so a retry resolves
//! [`UserRef::New`] without creating twice.

use std::collections::BTreeMap;

use teamcity::{Client, Locator, NewGroup, NewUser, TeamCityError, UserField, UserUpdate};

use crate::model::{
    Action, DEFAULTS_MARKER, Field, GROUP_DESCRIPTION, GROUP_MARKER, USER_DEACTIVATED, USER_MARKER,
    UserRef,
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

fn done_if_missing(r: Result<(), TeamCityError>) -> Result<(), TeamCityError> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// Applies `actions` in order; see the module docs.
pub async fn apply(
    client: &Client,
    actions: &[Action],
    created: &mut BTreeMap<String, u64>,
) -> Result<ApplyReport, ApplyError> {
    let mut report = ApplyReport::default();
    for (index, action) in actions.iter().enumerate() {
        let kind = kind(action);
        match apply_one(client, action, created, &mut report).await {
            Ok(()) => {
                report.applied += 1;
                metrics::counter!("teamcity_scim_sync_actions_total", "kind" => kind).increment(1);
            }
            Err(error) => {
                metrics::counter!("teamcity_scim_sync_action_errors_total", "kind" => kind)
                    .increment(1);
                tracing::warn!(index, kind, error = %error, "sync action failed");
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

async fn apply_one(
    client: &Client,
    action: &Action,
    created: &mut BTreeMap<String, u64>,
    report: &mut ApplyReport,
) -> Result<(), TeamCityError> {
    match action {
        Action::CreateUser {
            scim_id,
            username,
            name,
            email,
        } => {
            if created.contains_key(scim_id) {
                return Ok(());
            }
            let new = NewUser {
                username: username.clone(),
                name: name.clone(),
                email: email.clone(),
                properties: vec![(USER_MARKER.to_owned(), scim_id.clone())],
            };
            match client.create_user(&new).await {
                Ok(u) => {
                    let id =
                        u.id.ok_or_else(|| TeamCityError::Decode("created user has no id".into()))?;
                    created.insert(scim_id.clone(), id);
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
                            created.insert(scim_id.clone(), id);
                            report.adopted.push(format!("user {scim_id} -> id:{id}"));
                            Ok(())
                        }
                        None => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        }
        Action::UpdateUser { user, changes } => {
            let loc = Locator::by_id(*user);
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
            if update.username.is_some() || update.name.is_some() || update.email.is_some() {
                client.update_user(&loc, &update).await?;
            }
            for f in clears {
                client.set_user_field(&loc, f, None).await?;
            }
            Ok(())
        }
        Action::DeleteUser { user } => {
            done_if_missing(client.delete_user(&Locator::by_id(*user)).await)
        }
        Action::AddToGroup { user, group } => {
            let id = resolve(user, created)?;
            client.add_user_to_group(&Locator::by_id(id), group).await
        }
        Action::RemoveFromGroup { user, group } => done_if_missing(
            client
                .remove_user_from_group(&Locator::by_id(*user), group)
                .await,
        ),
        Action::AddUserRole { user, role } => {
            let id = resolve(user, created)?;
            client
                .add_user_role(&Locator::by_id(id), &role.role, &role.tc_scope())
                .await
        }
        Action::RemoveUserRole { user, role } => done_if_missing(
            client
                .remove_user_role(&Locator::by_id(*user), &role.role, &role.tc_scope())
                .await,
        ),
        Action::RevokeTokens { user } => {
            let n = client.revoke_all_tokens(&Locator::by_id(*user)).await?;
            report.tokens_revoked += n;
            Ok(())
        }
        Action::ResetPassword { user } => client.randomize_password(&Locator::by_id(*user)).await,
        Action::SetDeactivated { user } => {
            client
                .set_user_property(&Locator::by_id(*user), USER_DEACTIVATED, "true")
                .await
        }
        Action::ClearDeactivated { user } => {
            client
                .delete_user_property(&Locator::by_id(*user), USER_DEACTIVATED)
                .await
        }
        Action::CreateGroup {
            key,
            name,
            marker,
            roles,
            members,
        } => {
            let mut ids = Vec::with_capacity(members.len());
            for m in members {
                ids.push(resolve(m, created)?);
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
                        report.adopted.push(format!("group {marker} -> {key}"));
                        Ok(())
                    } else {
                        Err(e)
                    }
                }
                Err(e) => Err(e),
            }
        }
        Action::DeleteGroup { key } => {
            done_if_missing(client.delete_group(&Locator::by_key(key)).await)
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
        ),
    }
}
