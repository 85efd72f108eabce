//! The sync engine: makes TeamCity equal to the SCIM directory.
//!
//! ```text
//! Directory snapshot + Policy + Pins ──desired()──▶ Desired
//! TeamCity ──read_actual()──▶ ActualState
//! plan(Desired, ActualState) ──▶ Plan { actions, deps, orphans, conflicts, reports }   (pure)
//! guard::losses / guard::check ──▶ held or go (orphans always held)
//! apply_step(client, step) per wave, a step only after its prerequisites ──▶ TeamCity
//! render(plan, actual) ──▶ terraform-style text
//! ```
//!
//! The pure core takes a plain [`model::Directory`] as input; only [`engine`], the runtime,
//! reads the store.

pub mod actual;
pub mod apply;
mod compact;
pub mod desired;
pub mod engine;
pub mod explain;
pub mod guard;
mod journal;
pub mod model;
pub mod plan;
pub mod policy;
pub mod render;
pub mod scope;
pub mod waves;

pub use actual::{ReadOptions, ReadStats, read_actual, read_actual_with};
pub use apply::{ApplyError, ApplyReport, apply};
pub use desired::{Alert, Desired, DesiredGroup, DesiredOptions, DesiredUser, desired, group_key};
pub use engine::{
    Engine, EngineConfig, EngineError, Health, LAST_PASS_KEY, LAST_RECONCILE_KEY, Mode, PassReport,
    Progress, SYNC_LEASE, desired_unrecorded, periodic_progress, read_directory,
};
pub use guard::{GuardLimits, Held};
pub use model::{
    Action, ActualGroup, ActualState, ActualUser, DEFAULTS_GROUP_KEY, DEFAULTS_GROUP_NAME,
    DEFAULTS_MARKER, DirGroup, DirUser, Directory, GROUP_MARKER, RoleAt, RoleScope,
    USER_DEACTIVATED, USER_MARKER, UserRef, UserTarget,
};
pub use plan::{
    AdoptExisting, Conflict, Deprovision, Orphan, Plan, PlanOptions, Report, Scope, plan, plan_in,
};
pub use policy::{Pins, Policy, Problem};
pub use render::render;
