//! Test support: in-memory fakes of the identity providers' APIs that pull mode reads, serving
//! the shapes their vendors document (each shape cited in a comment where it is served).

pub mod graph;
pub mod okta;
