//! Deterministic fault injection: which call fails, how, and how often. No randomness, so a test that injects
//! a fault sees the same failures on every run.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::providers::Error;

/// Every operation of the two fake providers, as faults and call counters name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    BackendObserve,
    Create,
    Get,
    Start,
    Stop,
    Delete,
    PushFile,
    Exec,
    CiObserve,
    Register,
    Drain,
    Undrain,
    Deregister,
    /// Matches every operation.
    Any,
}

impl Op {
    /// The key this operation is counted under in [`super::WorldState::calls`].
    pub fn key(self) -> &'static str {
        match self {
            Op::BackendObserve => "backend.observe",
            Op::Create => "backend.create",
            Op::Get => "backend.get",
            Op::Start => "backend.start",
            Op::Stop => "backend.stop",
            Op::Delete => "backend.delete",
            Op::PushFile => "backend.push_file",
            Op::Exec => "backend.exec",
            Op::CiObserve => "ci.observe",
            Op::Register => "ci.register",
            Op::Drain => "ci.drain",
            Op::Undrain => "ci.undrain",
            Op::Deregister => "ci.deregister",
            Op::Any => "any",
        }
    }

    fn matches(self, op: Op) -> bool {
        self == Op::Any || self == op
    }
}

/// How an injected fault fails a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A 5xx: [`Error::Unavailable`].
    Unavailable5xx,
    /// A 429: [`Error::RateLimited`] with this `Retry-After`.
    RateLimited { retry_after: Option<Duration> },
    /// The request timed out before it reached the provider: [`Error::Unavailable`] "timed out".
    Timeout,
    /// The request reached the provider and took effect, but the response was lost on the way back: the
    /// operation happens, then the call fails with [`Error::Unavailable`] "timed out". Exercises idempotency.
    LostResponse,
    /// No capacity for this machine type / location: [`Error::Capacity`].
    Capacity,
    /// The credentials were refused: [`Error::Unauthenticated`].
    Unauthenticated,
    /// A body that does not parse: [`Error::Other`] holding a serde error.
    Malformed,
    /// The call hangs for `hold_for` (a provider that accepts the request and answers very late), then goes
    /// through as normal. The world stays usable meanwhile: other calls, of this operation too, are not held up
    /// unless they hit the fault themselves. A caller that gives up (drops the call) cancels it before it takes
    /// effect, as a request cut off before the provider acted would.
    Hold { hold_for: Duration },
}

/// A fault to inject: calls of `op` fail with `kind`, `times` times in all.
///
/// Without `every_nth` the next `times` calls of `op` fail; with `every_nth: Some(n)` every n-th call of `op`
/// (counted from injection) fails, until it has failed `times` times. `times: u32::MAX` is "for ever".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub op: Op,
    pub kind: FaultKind,
    pub times: u32,
    #[serde(default)]
    pub every_nth: Option<u32>,
}

impl Fault {
    /// The next `times` calls of `op` fail with `kind`.
    pub fn new(op: Op, kind: FaultKind, times: u32) -> Self {
        Self { op, kind, times, every_nth: None }
    }

    /// Every `n`-th call of `op` fails with `kind`, `times` times in all.
    pub fn every_nth(op: Op, kind: FaultKind, n: u32, times: u32) -> Self {
        Self { op, kind, times, every_nth: Some(n) }
    }
}

/// Whether the call fails before or after it takes effect, or is held and then goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum When {
    Before,
    After,
    Held(Duration),
}

impl FaultKind {
    pub(super) fn when(&self) -> When {
        match self {
            FaultKind::LostResponse => When::After,
            FaultKind::Hold { hold_for } => When::Held(*hold_for),
            _ => When::Before,
        }
    }

    pub(super) fn to_error(&self, op: Op) -> Error {
        let provider = "fake".to_owned();
        match self {
            FaultKind::Unavailable5xx => {
                Error::Unavailable { provider, message: format!("`{}` answered 503 service unavailable", op.key()) }
            }
            FaultKind::RateLimited { retry_after } => Error::RateLimited { provider, retry_after: *retry_after },
            // A held call does not fail: `when()` says so and callers never ask for its error. Should one ask, a
            // timeout is what a client that stopped waiting would report.
            FaultKind::Timeout | FaultKind::LostResponse | FaultKind::Hold { .. } => {
                Error::Unavailable { provider, message: format!("`{}` timed out", op.key()) }
            }
            FaultKind::Capacity => {
                Error::Capacity { provider, message: "resource unavailable for this machine type".to_owned() }
            }
            FaultKind::Unauthenticated => Error::Unauthenticated { provider, message: "invalid token".to_owned() },
            FaultKind::Malformed => {
                let source = match serde_json::from_str::<serde_json::Value>("{\"servers\": [") {
                    Err(error) => Box::new(error) as Box<dyn std::error::Error + Send + Sync>,
                    Ok(_) => "malformed response body".into(),
                };
                Error::Other { provider, source }
            }
        }
    }
}

/// Counts one call of `op` against the armed faults and returns the fault that fires, if any. Spent faults are
/// disarmed.
pub(super) fn check(faults: &mut Vec<super::state::ArmedFault>, op: Op) -> Option<FaultKind> {
    let mut fired = None;
    for armed in faults.iter_mut().filter(|armed| armed.fault.op.matches(op)) {
        armed.seen = armed.seen.saturating_add(1);
        if fired.is_some() || armed.fired >= armed.fault.times {
            continue;
        }
        let fires = match armed.fault.every_nth {
            None => true,
            Some(0) => false,
            Some(n) => armed.seen % u64::from(n) == 0,
        };
        if fires {
            armed.fired = armed.fired.saturating_add(1);
            fired = Some(armed.fault.kind.clone());
        }
    }
    faults.retain(|armed| armed.fired < armed.fault.times);
    fired
}
