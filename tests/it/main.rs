//! The integration tests: one binary, one module per area.

mod apply;
mod conformance;
mod fake;
