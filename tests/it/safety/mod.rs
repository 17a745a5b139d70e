//! The safety oracle of issue #9: the promises ciscale makes about every plan — never touch what is not ours,
//! never kill a busy agent, never exceed `max`, a saved plan applied a cycle late never harms, same inputs same
//! plan — stated from the outside and checked over adversarial histories of a shared world.
//!
//! - [`oracle`]: the promises, as functions of a config, a plan and the truth about the world.
//! - [`world`]: the simulated backend account and CI server, with the ground truth of who made what.
//! - [`ledger`]: the same promises on every plan of the end-to-end `watch` tests, with a truth learned from history.
//! - [`scenario`]: histories of that world with two deployments and people in it, played and judged step by step.
//! - `props`: the property tests (`CISCALE_ORACLE_CASES` histories, 10,000 by default) and the minimised
//!   counterexamples found so far, kept as named regression tests.

pub mod ledger;
pub mod oracle;
pub mod scenario;
pub mod world;

mod props;
mod regressions;
