//! ciscale keeps self-hosted CI agents at exactly the capacity their job queue needs.
//!
//! desired state (`config`) + observed state (`providers`) → pure `plan` → `apply` → providers; `watch` repeats
//! it. Each module owns one room: config knows nothing of providers, plan knows no I/O, providers know nothing of
//! plans, apply only executes the plan it is given.

pub mod apply;
pub mod config;
pub mod import;
pub mod model;
pub mod observe;
pub mod plan;
pub mod providers;
pub mod redact;
pub mod simulate;
pub mod watch;
