//! End-to-end tests of the sync engine over real HTTP: SCIM request → outbox drained →
//! emulated TeamCity state asserted. Each test has its own emulator, database and ports.

mod deprovision;
mod guard;
mod offboarding;
mod outage;
mod outbox;
mod plan;
mod policy;
mod reconcile;
mod rename;
mod replicas;
mod safety;
mod shadow;
mod support;
