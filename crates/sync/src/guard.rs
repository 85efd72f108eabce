//! Blast-radius guard: a batch (one worker pass or one reconcile) that would take access away
//! from too many managed users is held until `teamcity-scim approve`.
//!
//! Every loss of access counts, per distinct user: a membership or a direct role removed, a
//! role removed from a group the user is in, a group deleted, a token revoked, a password
//! reset, sessions ended, remember-me data cleared, a user deleted. A rename swap is not a
//! loss: deleting the old group costs a member nothing when the replacement (same marker,
//! created in the same plan or kept) has the member and at least the old roles.
//!
//! Delaying an offboarding is itself a security failure, so one user's losses are never held,
//! and the percentage rule never holds a batch of [`PERCENT_FLOOR`] users or fewer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Action, ActualState, RoleAt, UserRef};

/// The percentage rule never holds a batch of this many users or fewer.
pub const PERCENT_FLOOR: usize = 3;

/// For each step of `plan`, the users (TeamCity ids) who lose access if it is applied to
/// `actual`; empty for steps that take nothing away.
pub fn losses(plan: &[Action], actual: &ActualState) -> Vec<BTreeSet<u64>> {
    let members = actual.members();
    let members_of = |key: &str| members.get(key).cloned().unwrap_or_default();
    let deleted: BTreeSet<&str> = plan
        .iter()
        .filter_map(|a| match a {
            Action::DeleteGroup { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    // Where each marker's access lives after the plan: a created group, or a kept one.
    let mut after: BTreeMap<&str, (BTreeSet<RoleAt>, BTreeSet<u64>)> = BTreeMap::new();
    for a in plan {
        if let Action::CreateGroup {
            marker,
            roles,
            members,
            ..
        } = a
        {
            let ids = members
                .iter()
                .filter_map(|m| match m {
                    UserRef::Id(id) => Some(*id),
                    UserRef::New(_) => None,
                })
                .collect();
            after.insert(marker, (roles.iter().cloned().collect(), ids));
        }
    }
    for g in &actual.groups {
        if let Some(m) = g.marker.as_deref()
            && !deleted.contains(g.key.as_str())
        {
            after
                .entry(m)
                .or_insert_with(|| (g.roles.clone(), members_of(&g.key)));
        }
    }

    plan.iter()
        .map(|a| match a {
            Action::RemoveFromGroup { user, .. }
            | Action::RemoveUserRole { user, .. }
            | Action::DeleteUser { user }
            | Action::RevokeTokens { user }
            | Action::ResetPassword { user }
            | Action::EndSessions { user }
            | Action::ClearRememberMe { user } => BTreeSet::from([*user]),
            Action::RemoveGroupRole { group, .. } => members_of(group),
            Action::DeleteGroup { key } => {
                let old_members = members_of(key);
                let old = actual.group(key);
                let replacement = old
                    .and_then(|g| g.marker.as_deref())
                    .and_then(|m| after.get(m));
                match (old, replacement) {
                    (Some(old), Some((roles, kept))) => {
                        let lost_roles = !old.roles.is_subset(roles);
                        old_members
                            .into_iter()
                            .filter(|id| lost_roles || !kept.contains(id))
                            .collect()
                    }
                    _ => old_members,
                }
            }
            _ => BTreeSet::new(),
        })
        .collect()
}

/// Users (TeamCity ids) who lose access in any way if `plan` is applied to `actual`.
pub fn removals(plan: &[Action], actual: &ActualState) -> BTreeSet<u64> {
    losses(plan, actual).into_iter().flatten().collect()
}

/// A batch held by the guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("held by the blast-radius guard: {reason}")]
pub struct Held {
    /// Users who would lose access.
    pub count: usize,
    /// Why, for the operator.
    pub reason: String,
}

/// Holds when `removed` users exceed `max`, or `max_percent` % of `managed_total` — never
/// for one user, and the percentage rule never for [`PERCENT_FLOOR`] users or fewer.
pub fn check(
    removed: usize,
    managed_total: usize,
    max: Option<usize>,
    max_percent: Option<u32>,
) -> Result<(), Held> {
    if removed <= 1 {
        return Ok(());
    }
    if let Some(max) = max
        && removed > max
    {
        return Err(Held {
            count: removed,
            reason: format!("{removed} users would lose access (max_removals = {max})"),
        });
    }
    if let Some(pct) = max_percent
        && removed > PERCENT_FLOOR
        && (removed as u128) * 100 > (managed_total as u128) * u128::from(pct)
    {
        return Err(Held {
            count: removed,
            reason: format!(
                "{removed} of {managed_total} managed users would lose access \
                 (max_removals_percent = {pct})"
            ),
        });
    }
    Ok(())
}

/// The `[sync]` guard settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardLimits {
    /// Most users a batch may take access from.
    #[serde(default)]
    pub max_removals: Option<usize>,
    /// Most share (percent of managed users) a batch may take access from.
    #[serde(default)]
    pub max_removals_percent: Option<u32>,
}

impl GuardLimits {
    /// [`check`] of `removed` users against the managed users of `actual`.
    pub fn check_plan_count(&self, removed: usize, actual: &ActualState) -> Result<(), Held> {
        check(
            removed,
            actual.managed_users(),
            self.max_removals,
            self.max_removals_percent,
        )
    }

    /// [`removals`] then [`check`] against the managed users of `actual`.
    pub fn check_plan(&self, plan: &[Action], actual: &ActualState) -> Result<(), Held> {
        let removed = removals(plan, actual);
        check(
            removed.len(),
            actual.managed_users(),
            self.max_removals,
            self.max_removals_percent,
        )
    }
}

impl fmt::Display for GuardLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max_removals = {:?}, max_removals_percent = {:?}",
            self.max_removals, self.max_removals_percent
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let cases = [
            (10, 100, Some(10), None, true),
            (11, 100, Some(10), None, false),
            (20, 100, None, Some(20), true),
            (21, 100, None, Some(20), false),
            // One user's offboarding is never held, whatever the directory size.
            (1, 3, Some(10), Some(20), true),
            (1, 1, Some(0), Some(0), true),
            (2, 100, Some(1), None, false),
            // The percentage rule holds nothing of three users or fewer...
            (3, 4, Some(10), Some(20), true),
            (2, 2, None, Some(1), true),
            // ...and applies above that.
            (4, 5, Some(10), Some(20), false),
            (0, 0, Some(0), Some(0), true),
            (500, 1000, None, None, true),
        ];
        for (removed, total, max, pct, ok) in cases {
            let got = check(removed, total, max, pct);
            assert_eq!(got.is_ok(), ok, "{removed}/{total} {max:?} {pct:?}");
            if let Err(h) = got {
                assert_eq!(h.count, removed);
            }
        }
    }
}
