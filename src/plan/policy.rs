//! placeholder
use jiff::Timestamp;
use crate::model::{Desired, Observed};
use super::Plan;
pub fn plan(_desired: &Desired, _observed: &Observed, _now: Timestamp) -> Plan { unimplemented!() }
pub fn fingerprint(_observed: &Observed) -> String { unimplemented!() }
