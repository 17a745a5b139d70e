//! The traffic bookkeeping the HTTP fakes of Woodpecker, Forgejo and GitHub share: request counters by endpoint,
//! injected faults (queued ones, then every `n`-th request), raw bodies served once, and the spec violations
//! seen. Each fake keeps its own `Fault` type (what a service can answer differs) and turns a fault into a
//! response itself; [`traffic_methods!`] gives each fake the same test-facing methods over it.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

/// What a fake has seen and what it was told to do to the next requests.
pub struct Traffic<F> {
    /// Requests by endpoint key, `METHOD /path/template`.
    counts: BTreeMap<String, u64>,
    requests: u64,
    /// Faults for the next requests, in order.
    next_faults: VecDeque<F>,
    /// Every `n`th request fails with the next fault of the cycle: `(n, cycle, next)`.
    every: Option<(u64, Vec<F>, usize)>,
    faults_injected: u64,
    /// A raw body served once for an endpoint key, instead of the real answer (older servers' shapes).
    raw_once: BTreeMap<String, Value>,
    violations: Vec<String>,
}

// By hand: a derive would ask `F: Default`, which no fault type is.
impl<F> Default for Traffic<F> {
    fn default() -> Self {
        Traffic {
            counts: BTreeMap::new(),
            requests: 0,
            next_faults: VecDeque::new(),
            every: None,
            faults_injected: 0,
            raw_once: BTreeMap::new(),
            violations: Vec::new(),
        }
    }
}

impl<F: Clone> Traffic<F> {
    // -- the fake's side ---------------------------------------------------------------------------------------

    /// Counts a request to `key` and returns the fault to answer it with, if any: a queued one first, else the
    /// cycle's next one when this is an `n`th request.
    pub fn arrive(&mut self, key: &str) -> Option<F> {
        *self.counts.entry(key.to_owned()).or_default() += 1;
        self.requests += 1;
        let mut fault = self.next_faults.pop_front();
        if fault.is_none() {
            if let Some((n, faults, next)) = &mut self.every {
                if self.requests % *n == 0 {
                    fault = Some(faults[*next % faults.len()].clone());
                    *next += 1;
                }
            }
        }
        if fault.is_some() {
            self.faults_injected += 1;
        }
        fault
    }

    /// The raw body to serve for `key` instead of the real answer, once.
    pub fn take_raw(&mut self, key: &str) -> Option<Value> {
        self.raw_once.remove(key)
    }

    /// Records a request or an answer that did not match the spec.
    pub fn violation(&mut self, problem: impl Into<String>) {
        self.violations.push(problem.into());
    }

    // -- the test's side (through `traffic_methods!`) ------------------------------------------------------------

    pub fn count(&self, endpoint: &str) -> u64 {
        self.counts.get(endpoint).copied().unwrap_or(0)
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.clone()
    }

    pub fn total_requests(&self) -> u64 {
        self.requests
    }

    pub fn reset_counts(&mut self) {
        self.counts.clear();
        self.requests = 0;
    }

    pub fn fail_next(&mut self, fault: F) {
        self.next_faults.push_back(fault);
    }

    pub fn fail_every(&mut self, n: u64, faults: Vec<F>) {
        assert!(n > 0 && !faults.is_empty());
        self.every = Some((n, faults, 0));
    }

    pub fn stop_faults(&mut self) {
        self.every = None;
        self.next_faults.clear();
    }

    pub fn faults_injected(&self) -> u64 {
        self.faults_injected
    }

    pub fn serve_raw_once(&mut self, endpoint: &str, body: Value) {
        self.raw_once.insert(endpoint.to_owned(), body);
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.clone()
    }
}

/// Writes a fake's test-facing traffic methods, inside its `impl` block, over `self.state().traffic` (the fake
/// needs a `fn state(&self)` that locks its state, which holds `traffic: Traffic<$fault>`).
///
/// A macro rather than a trait with default methods: the methods stay inherent, so the many tests that call
/// `fake.count(..)` or `fake.fail_next(..)` need no trait import. `except reset_counts` leaves that one out, for
/// a fake that resets more counters of its own along with these (GitHub).
macro_rules! traffic_methods {
    ($fault:ty) => {
        traffic_methods!($fault, except reset_counts);

        /// Zeroes the request counters; queued faults, raw bodies and violations stay.
        pub fn reset_counts(&self) {
            self.state().traffic.reset_counts();
        }
    };
    ($fault:ty, except reset_counts) => {
        /// Requests seen for an endpoint key: `METHOD /path/template`, with ids as the placeholders of the
        /// service's spec (e.g. `PATCH /api/agents/{agent_id}`, `GET /repos/{owner}/{repo}/actions/runs`).
        pub fn count(&self, endpoint: &str) -> u64 {
            self.state().traffic.count(endpoint)
        }

        /// Requests by endpoint key, every endpoint seen since the last reset.
        pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
            self.state().traffic.counts()
        }

        pub fn total_requests(&self) -> u64 {
            self.state().traffic.total_requests()
        }

        /// The next request fails with `fault` (queued faults go first, in order).
        pub fn fail_next(&self, fault: $fault) {
            self.state().traffic.fail_next(fault);
        }

        /// Every `n`th request from now on fails, with `faults` in turn.
        pub fn fail_every(&self, n: u64, faults: Vec<$fault>) {
            self.state().traffic.fail_every(n, faults);
        }

        /// No more faults: the queue is emptied and `fail_every` ends.
        pub fn stop_faults(&self) {
            self.state().traffic.stop_faults();
        }

        pub fn faults_injected(&self) -> u64 {
            self.state().traffic.faults_injected()
        }

        /// Serves `body` once for `endpoint` (an endpoint key, as for `count`) instead of the real answer,
        /// unchecked: for the shapes other or older servers send (`null` arrays, missing fields), which the
        /// current spec does not describe.
        pub fn serve_raw_once(&self, endpoint: &str, body: serde_json::Value) {
            self.state().traffic.serve_raw_once(endpoint, body);
        }

        /// What did not match the spec, in the traffic so far.
        pub fn spec_violations(&self) -> Vec<String> {
            self.state().traffic.violations()
        }
    };
}
pub(crate) use traffic_methods;
