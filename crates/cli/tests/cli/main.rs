//! Tests of the `teamcity-scim` binary: `plan` output and exit codes, `policy check`, the
//! operator commands, `demo`, and a SIGKILL in the middle of a sync.

mod support;

mod allocator;
mod audit_stream;
mod commands;
mod crash;
mod dashboard;
mod db_copy;
mod demo;
mod pull;
mod replicas;
mod safety;
