//! The dashboard's [`AdminSource`]: the sync engine's read-only views (explanations, the plan,
//! who a held batch affects) wired for `server::admin`. Nothing here writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use server::admin::{AdminSource, GrantView, GroupView, PersonView, PlanView, TeamCityUserView};
use store::{DynStore, HeldBatch};
use sync::{Engine, Policy};
use tokio::sync::Mutex;

use crate::ops;

/// A computed plan is shown again for this long, so page reloads do not read all of TeamCity.
const PLAN_REUSE: Duration = Duration::from_secs(30);

/// How long the Plan page waits for TeamCity.
const PLAN_TIMEOUT: Duration = Duration::from_secs(120);

/// What the dashboard asks of the sync engine.
pub(crate) struct Dashboard {
    store: DynStore,
    policy: Policy,
    teamcity_url: String,
    /// `None` when no TeamCity token is configured.
    engine: Option<Arc<Engine>>,
    client: Option<teamcity::Client>,
    plan: Mutex<Option<(Instant, PlanView)>>,
    /// Pull mode: (kind, interval).
    directory_source: Option<(String, String)>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("teamcity_url", &self.teamcity_url)
            .finish_non_exhaustive()
    }
}

const NO_TEAMCITY: &str = "no TeamCity token is configured ([teamcity] token_file or \
                           TEAMCITY_SCIM_TEAMCITY__TOKEN): SCIM changes are stored and queued, \
                           nothing is applied";

impl Dashboard {
    pub(crate) fn new(
        store: DynStore,
        policy: Policy,
        teamcity_url: String,
        engine: Option<Arc<Engine>>,
        client: Option<teamcity::Client>,
    ) -> Self {
        Dashboard {
            store,
            policy,
            teamcity_url,
            engine,
            client,
            plan: Mutex::new(None),
            directory_source: None,
        }
    }

    /// Pull mode: the source's kind and interval, for the Overview.
    pub(crate) fn with_source(mut self, kind: &str, interval: &str) -> Self {
        self.directory_source = Some((kind.to_owned(), interval.to_owned()));
        self
    }

    async fn teamcity_user(&self, scim_id: &str) -> Result<Option<TeamCityUserView>, String> {
        let Some(client) = &self.client else {
            return Err(NO_TEAMCITY.into());
        };
        let mapping = self
            .store
            .mapping(scim::ResourceKind::User, scim_id)
            .await
            .map_err(|e| format!("the mapping could not be read: {e}"))?;
        let Some(m) = mapping else {
            return Ok(None);
        };
        let Ok(id) = m.teamcity_id.parse::<u64>() else {
            return Err(format!(
                "the stored TeamCity id {:?} is not a number",
                m.teamcity_id
            ));
        };
        let locator = teamcity::Locator::user_pinned(id, &m.teamcity_name);
        match client
            .find_user(
                &locator,
                Some("id,username,name,roles(role(roleId,scope)),groups(group(key,name))"),
            )
            .await
        {
            Ok(Some(u)) => Ok(Some(TeamCityUserView {
                id: u.id.map(|i| i.to_string()).unwrap_or_default(),
                username: u.username.unwrap_or_default(),
                name: u.name,
                groups: u
                    .groups
                    .map(|g| {
                        g.group
                            .into_iter()
                            .map(|g| {
                                format!(
                                    "{} ({})",
                                    g.name.unwrap_or_default(),
                                    g.key.unwrap_or_default()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                roles: u
                    .roles
                    .map(|r| {
                        r.role
                            .into_iter()
                            .map(|r| format!("{}@{}", r.role_id, r.scope))
                            .collect()
                    })
                    .unwrap_or_default(),
            })),
            Ok(None) => Err(format!(
                "the linked TeamCity user {} (id {id}) no longer exists with that username; \
                 the next reconcile re-links or re-creates it",
                m.teamcity_name
            )),
            Err(e) => Err(format!("TeamCity could not be read: {e}")),
        }
    }
}

impl AdminSource for Dashboard {
    fn teamcity(&self) -> Result<String, String> {
        match &self.engine {
            None => Err(NO_TEAMCITY.into()),
            Some(engine) => match engine.health().not_ready() {
                None => Ok(format!(
                    "{}: reachable, the bridge's token is accepted and the policy matches",
                    self.teamcity_url
                )),
                Some(reason) => Err(format!("{}: {reason}", self.teamcity_url)),
            },
        }
    }

    fn held_affects<'a>(&'a self, batch: &'a HeldBatch) -> BoxFuture<'a, String> {
        Box::pin(async move {
            match ops::held_steps(batch) {
                Ok(steps) => ops::affected(&self.store, &steps)
                    .await
                    .unwrap_or_else(|e| format!("(could not be read: {e:#})")),
                Err(reason) => reason,
            }
        })
    }

    fn person<'a>(&'a self, scim_id: &'a str) -> BoxFuture<'a, Result<PersonView, String>> {
        Box::pin(async move {
            let (dir, desired) = sync::desired_unrecorded(&*self.store, &self.policy)
                .await
                .map_err(|e| format!("the directory could not be read: {e}"))?;
            let access = sync::explain::access(&dir, &self.policy, &desired, scim_id)
                .ok_or_else(|| format!("there is no user with SCIM id {scim_id}"))?;
            Ok(PersonView {
                active: access.active,
                grants: access
                    .grants
                    .iter()
                    .map(|g| GrantView {
                        role: g.role.to_string(),
                        via: g.via.to_string(),
                    })
                    .collect(),
                capped: access
                    .capped
                    .iter()
                    .map(|c| {
                        format!(
                            "the cap for userType {:?} kept this user out of group {:?}, whose roles {} it does not allow",
                            c.user_type,
                            c.group,
                            c.denied
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
                    .collect(),
                roleless_groups: access.groups_without_roles,
                teamcity: self.teamcity_user(scim_id).await,
            })
        })
    }

    fn groups(&self) -> BoxFuture<'_, Result<Vec<GroupView>, String>> {
        Box::pin(async move {
            let (dir, desired) = sync::desired_unrecorded(&*self.store, &self.policy)
                .await
                .map_err(|e| format!("the directory could not be read: {e}"))?;
            let keys: std::collections::BTreeMap<String, String> = self
                .store
                .mappings(scim::ResourceKind::Group)
                .await
                .map_err(|e| format!("the mappings could not be read: {e}"))?
                .into_iter()
                .map(|m| (m.scim_id, m.teamcity_id))
                .collect();
            let mut out: Vec<GroupView> = dir
                .groups
                .iter()
                .map(|g| {
                    let d = desired.groups.get(&g.id);
                    GroupView {
                        scim_id: Some(g.id.clone()),
                        name: g.display_name.clone(),
                        external_id: g.external_id.clone(),
                        teamcity_key: keys.get(&g.id).cloned(),
                        rules: d
                            .map(|d| {
                                d.rules
                                    .iter()
                                    .map(|i| sync::explain::rule_label(&self.policy, *i))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        roles: d
                            .map(|d| d.roles.iter().map(ToString::to_string).collect())
                            .unwrap_or_default(),
                        members: g.members.len(),
                        teamcity_members: d.map_or(0, |d| d.members.len()),
                    }
                })
                .collect();
            out.sort_by_key(|g| g.name.to_lowercase());
            if let Some(d) = desired.groups.get(sync::model::DEFAULTS_MARKER) {
                let active = dir.users.iter().filter(|u| u.active).count();
                out.push(GroupView {
                    scim_id: None,
                    name: d.name.clone(),
                    external_id: None,
                    teamcity_key: d.fixed_key.clone(),
                    rules: Vec::new(),
                    roles: d.roles.iter().map(ToString::to_string).collect(),
                    members: active,
                    teamcity_members: d.members.len(),
                });
            }
            Ok(out)
        })
    }

    fn directory_source(&self) -> BoxFuture<'_, Option<Result<String, String>>> {
        Box::pin(async move {
            let (kind, interval) = self.directory_source.as_ref()?;
            let last = match self
                .store
                .sync_state_get(&source::pull::last_key(kind))
                .await
            {
                Ok(v) => v.and_then(|s| serde_json::from_str::<source::pull::LastPull>(&s).ok()),
                Err(e) => return Some(Err(format!("the last pull could not be read: {e}"))),
            };
            let head = format!("Pulled from {kind} every {interval} (SCIM writes are refused).");
            Some(match last {
                None => Ok(format!("{head} No pull yet.")),
                Some(l) => match &l.error {
                    Some(e) => Err(format!(
                        "{head} The pull at {} failed, so nothing is changed until the identity \
                         provider can be read: {e}",
                        l.at
                    )),
                    None => {
                        let conflicts = l
                            .summary
                            .as_ref()
                            .map(|s| s.conflicts.clone())
                            .unwrap_or_default();
                        let text = format!(
                            "{head} Last pull {}{}: {}.",
                            l.at,
                            if l.full { " (full)" } else { "" },
                            l.summary.as_ref().map(|s| s.line()).unwrap_or_default()
                        );
                        // What could not be applied is a problem to see, not a detail.
                        if conflicts.is_empty() {
                            Ok(text)
                        } else {
                            Err(format!("{text} Not applied: {}", conflicts.join("; ")))
                        }
                    }
                },
            })
        })
    }

    fn plan(&self) -> BoxFuture<'_, Result<PlanView, String>> {
        Box::pin(async move {
            let Some(engine) = &self.engine else {
                return Err(NO_TEAMCITY.into());
            };
            // One computation at a time; a recent one is shown again.
            let mut cached = self.plan.lock().await;
            if let Some((at, view)) = cached.as_ref()
                && at.elapsed() < PLAN_REUSE
            {
                return Ok(view.clone());
            }
            let (p, actual, reads) = tokio::time::timeout(PLAN_TIMEOUT, engine.preview())
                .await
                .map_err(|_| {
                    format!(
                        "TeamCity did not answer within {} s",
                        PLAN_TIMEOUT.as_secs()
                    )
                })?
                .map_err(|e| format!("the plan could not be computed: {e}"))?;
            let view = PlanView {
                computed: store::timefmt::format(time::OffsetDateTime::now_utc()),
                text: sync::render(&p, &actual),
                steps: p.actions.len(),
                reads,
            };
            *cached = Some((Instant::now(), view.clone()));
            Ok(view)
        })
    }
}

#[cfg(test)]
mod tests {
    /// The dashboard reads the pass reports under the keys the sync engine writes them to
    /// (`server` does not depend on `sync`, so the keys are written twice).
    #[test]
    fn the_dashboard_reads_the_reports_where_the_engine_writes_them() {
        assert_eq!(server::admin::LAST_PASS_KEY, sync::LAST_PASS_KEY);
        assert_eq!(server::admin::LAST_RECONCILE_KEY, sync::LAST_RECONCILE_KEY);
    }
}
