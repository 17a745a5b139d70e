//! Planner benchmark: 100 pools × 10,000 instances × 100,000 pending jobs, generated deterministically.
//! Prints the median time of 5 plans and the process's peak RSS (VmHWM). Goal: < 50 ms in release.
//!
//! Run with `cargo bench --bench plan`; `cargo bench --bench plan -- --scale 0.25` plans a world scaled by that
//! factor (pools, instances and jobs alike, so each pool keeps its size: a cost that grows with pools × instances
//! shows as worse than linear). One world per process, so the peak RSS is that world's. Plain `Instant`, no
//! harness: the number that matters is one plan.
//!
//! Measured 2026-11-29 on 2 shared cores (release, after the ownership and records rules of #9), scale → median,
//! peak RSS: 0.25 → 25 ms, 33 MiB; 0.5 → 51 ms, 64 MiB; 1 → 120 ms, 124 MiB; 2 → 257 ms, 246 MiB. Linear in the
//! world's size, but above the 50 ms goal (69 ms before #9). `perf` on the whole bench (world building included):
//! `plan` itself 17 %, `memcmp` 10 % (string-keyed lookups), copies 6 %, `malloc` 8 %, cost estimate 4 %; SHA-256
//! (digests, fingerprint) under 2 %. So the next step is fewer string keys and allocations (interned labels, ids
//! by index), not hashing.
//!
//! 23:00-23:25 the same day (#10, first steps: streamed fingerprint, agent ids by `&str`, a pool's price once,
//! apply order on borrowed keys sorted in place, name digests once per pool): the same plan digest at all four
//! sizes and the same peak RSS; at load 2, 1×, three runs each: main medians 98/99/128 ms, this 93/102/111 ms
//! (2× 220 → 212 ms, ½× 43 → 41 ms, ¼× 18 → 17 ms): a few per cent at best. The goal is not reached. A profile of this build (`perf record` on the bench): `assign_pending` 17 %
//! (100,000 jobs' labels projected and grouped), `memcmp` 11 %, copies 7 %, `malloc` 4 %, cost 4 %, the
//! per-pool notes' formatting ~5 %; so next: demand's per-label work, then fewer passes over the instances.
//!
//! 2026-11-30 (#10, P2): three steps, the same plan digest at all four sizes after each. (1) demand: label keys
//! numbered and remembered per position (a job's projection hashes no key), fingerprint sorted unstably; (2)
//! every instance's labels read once into an index by position, claims as arrays per backend, the fingerprint's
//! JSON written by hand into the hash; (3) fewer allocations (currency sums, pre-sized sets, the demand hash taken
//! while projecting, three migration names selected rather than 10,000 sorted). At load 3-5 (never lower in that
//! session), main's binary and this one run alternately, three runs each, medians: ¼× 23/22/21 → 24/15/16 ms,
//! ½× 53/52/52 → 36/35/35 ms, 1× 118/145/134 → 84/83/91 ms, 2× 300/331/306 → 193/245/229 ms; peak RSS 1×
//! 124.0 → 122.9 MiB, 2× 245.3 → 243.6 MiB. CPU time inside `plan()` (perf samples at 1 kHz over a run's six
//! plans, which waiting for a core does not count) grows linearly: 1× 107/122 ms, 2× 217/226 ms at load 6. The
//! 50 ms goal is not reached (about a third less time than main). What is left: reading 100,000 jobs' label trees
//! (demand, 28 %: memory traffic, as every job's 4 labels are a B-tree leaf of 11 slots plus 8 strings), the
//! pools (23 %: agent lookups by name and id, members sorted, creates' labels cloned), the fingerprint (13 %:
//! sorting 10,000 ids), the cost estimate (7 %). The world itself is 111 of the 123 MiB: only interned labels in
//! `model` shrink that.
//!
//! The release profile that keeps the daemon small (fat LTO, one codegen unit, dependencies at `opt-level = "s"`;
//! see Cargo.toml) costs the planner about 10 %: on a quiet machine, alternately, 1×, three runs, medians: the same
//! code with the former profile 105/89/89 ms, with this one 111/99/103 ms (main before the steps above: 140/133/135
//! ms that day, on a machine slower than the one of the figures above). Four sizes with this profile, three series:
//! ¼× 21-26 ms, ½× 47-62 ms, 1× 76-102 ms, 2× 216-228 ms.
//!
//! 2026-11-30, second round (#10, P3; the same plan digest at all four sizes after every step): (1) job labels
//! interned (`model::Labels`: one shared sorted slice of shared strings per label set; demand reads the slice,
//! compares keys by address first and remembers projections per set), which also halves the world; (2) sorts by a
//! key past the strings' shared prefix (`plan::sort_key`), FxHash from `rustc-hash`, an instance's labels read in
//! one pass, running jobs per agent by position, SHA-256 at opt-level 3; (3) in a world of 1,000 instances or
//! more, the pools are planned on up to four cores, and the fingerprint beside them. Release profile as shipped,
//! quiet machine, three series, median of 5 plans: ¼× 8.2-8.8 ms, ½× 19.3-20.1 ms, 1× 43.5-44.2 ms, 2×
//! 95.8-106.5 ms; peak RSS ¼× 17.9, ½× 32.6, 1× 61.4-61.6, 2× 120-123 MiB (the world alone: 13.6, 25.1, 48.0,
//! 93.9 MiB). Main's binary from before, run alternately with this one the same hour: 89-93 ms → 41-45 ms at
//! 1×; on one core (`taskset -c 0`, the threads taking turns) this one takes 59-67 ms. Each doubling costs about
//! 2.2×: the work per instance and job is the same, but the world outgrows the caches (at ¼× it is 14 MiB).
//! Process CPU time (world building included): 0.13, 0.31, 0.68, 1.53 s.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ciscale::model::{
    Agent, AgentId, AgentSpec, BackendBinding, BackendKind, BackendName, BackendObservation, BackendSpec, Billing,
    CiBinding, CiKind, CiName, CiObservation, CiSourceSpec, Desired, FakeSpec, GoDuration, Instance, InstanceId,
    InstanceMode, InstanceState, LabelInterner, Labels, Observed, PoolName, PoolSpec, Price, Queue, ScalePolicy, Task,
    OWNER_LABEL, POOL_LABEL,
};
use jiff::{SignedDuration, Timestamp};

const POOLS: usize = 100;
const INSTANCES: usize = 10_000;
const PENDING: usize = 100_000;
const RUNS: usize = 5;

/// The world's size: `scale` × (pools, instances, pending jobs).
struct Size {
    pools: usize,
    instances: usize,
    pending: usize,
}

impl Size {
    fn scaled(scale: f64) -> Self {
        let times = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        Self { pools: times(POOLS), instances: times(INSTANCES), pending: times(PENDING) }
    }
}

/// `--scale F` (cargo passes `--bench` as well, which is ignored).
fn scale_arg() -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|arg| arg == "--scale")
        .and_then(|at| args.get(at + 1))
        .map(|value| value.parse().unwrap_or_else(|_| panic!("--scale: not a number: {value}")))
        .unwrap_or(1.0)
}

/// Tiny deterministic generator (xorshift), so every run plans the same world.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn world(size: &Size) -> (Desired, Observed, Timestamp) {
    let now: Timestamp = "2026-01-01T12:00:00Z".parse().unwrap_or_default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pools: Vec<PoolSpec> = (0..size.pools)
        .map(|i| PoolSpec {
            name: PoolName::new(format!("pool{i}")),
            ci: CiBinding {
                source: CiName::new("wp"),
                labels: [
                    ("platform".to_owned(), format!("linux/{}", i % 10)),
                    ("size".to_owned(), format!("s{}", i / 10)),
                    ("repo".to_owned(), "*".to_owned()),
                ]
                .into(),
                capabilities: BTreeMap::new(),
            },
            backend: BackendBinding {
                backend: BackendName::new(format!("cloud{}", i % 4)),
                mode: InstanceMode::Create,
                machine: [("serverType".to_owned(), "cx22,cx32".to_owned())].into(),
            },
            agent: AgentSpec {
                image: Some("agent:1".into()),
                env: BTreeMap::new(),
                secret_env: BTreeMap::new(),
                preregistered: None,
            },
            scale: ScalePolicy { max: 150, min_idle: 1, ..ScalePolicy::default() },
        })
        .collect();
    let desired = Desired {
        owner: "ci".into(),
        poll_interval: GoDuration::from_secs(10),
        ci: [(CiName::new("wp"), CiSourceSpec { kind: CiKind::Fake(FakeSpec::default()) })].into(),
        backends: (0..4)
            .map(|b| {
                (
                    BackendName::new(format!("cloud{b}")),
                    BackendSpec {
                        kind: BackendKind::Fake(FakeSpec::default()),
                        billing: Billing::Hourly,
                        create_limit: None,
                        change_timeout: None,
                    },
                )
            })
            .collect(),
        pools,
        images: BTreeMap::new(),
        config_hash: "sha256:bench".into(),
        metrics: None,
    };

    let mut observed = Observed { observed_at: now, ..Observed::default() };
    let prices: BTreeMap<String, Price> =
        [("cx22".to_owned(), Price { hourly: 0.0126, currency: "EUR".into() })].into();
    for b in 0..4 {
        observed.backends.insert(
            BackendName::new(format!("cloud{b}")),
            BackendObservation { instances: Vec::new(), prices: prices.clone(), ..BackendObservation::default() },
        );
    }
    let mut agents = Vec::with_capacity(size.instances);
    let mut running = Vec::new();
    let states = [
        InstanceState::Running,
        InstanceState::Running,
        InstanceState::Running,
        InstanceState::Pending,
        InstanceState::Stopped,
    ];
    for n in 0..size.instances {
        let pool = n % size.pools;
        let name = format!("ci-pool{pool}-{}", n / size.pools + 1);
        let created_at = now - SignedDuration::from_mins(rng.below(300) as i64);
        let instance = Instance {
            id: InstanceId::new(format!("srv-{n}")),
            name: name.clone(),
            state: states[rng.below(states.len())],
            created_at,
            labels: [(OWNER_LABEL.to_owned(), "ci".to_owned()), (POOL_LABEL.to_owned(), format!("pool{pool}"))].into(),
            attributes: [("serverType".to_owned(), if rng.below(20) == 0 { "cx11" } else { "cx22" }.to_owned())].into(),
        };
        if let Some(backend) = observed.backends.get_mut(&BackendName::new(format!("cloud{}", pool % 4))) {
            backend.instances.push(instance);
        }
        if rng.below(10) != 0 {
            let id = AgentId::new(format!("{n}"));
            let busy = rng.below(2) == 0;
            if busy {
                running.push(Task {
                    id: format!("run-{n}").into(),
                    labels: Labels::default(),
                    demands: Vec::new(),
                    agent_id: Some(id.clone()),
                });
            }
            agents.push(Agent {
                id,
                name,
                busy,
                no_schedule: rng.below(8) == 0,
                last_contact: Some(now),
                last_work: Some(now - SignedDuration::from_mins(rng.below(120) as i64)),
                labels: BTreeMap::new(),
                created_at: None,
            });
        }
    }
    // Jobs: 500 repos × 100 label combinations (some matching no pool), so label sets repeat as in real queues.
    // Their labels go through an interner, as a provider reads a queue: each distinct key, value and set once.
    let mut interner = LabelInterner::new();
    let pending = (0..size.pending)
        .map(|n| {
            let platform = rng.below(11);
            Task {
                id: format!("job-{n}").into(),
                labels: interner.labels([
                    ("platform", format!("linux/{platform}")),
                    // As many sizes as the pools have (10 pools per size), so demand grows with the pools.
                    ("size", format!("s{}", rng.below(size.pools.div_ceil(10)))),
                    ("repo", format!("org/repo{}", rng.below(500))),
                    ("woodpecker-ci.org/repo-id", format!("{}", rng.below(500))),
                ]),
                demands: Vec::new(),
                agent_id: None,
            }
        })
        .collect();
    observed.ci.insert(CiName::new("wp"), CiObservation { agents, queue: Queue { pending, running } });
    (desired, observed, now)
}

/// SHA-256 of the plan's JSON (everything in it: changes, reasons, notes, cost, fingerprint), outside the timing.
fn plan_digest(plan: &ciscale::plan::Plan) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(plan).unwrap_or_default();
    Sha256::digest(&json).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let build_started = Instant::now();
    let scale = scale_arg();
    let size = Size::scaled(scale);
    let (desired, observed, now) = world(&size);
    eprintln!(
        "world ×{scale}: {} pools, {} instances, {} pending jobs (built in {:?})",
        size.pools,
        size.instances,
        size.pending,
        build_started.elapsed()
    );
    let rss_before = peak_rss_kib();
    let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
    let mut changes = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        let plan = ciscale::plan::plan(&desired, &observed, now);
        times.push(started.elapsed());
        changes = plan.changes.len();
        std::hint::black_box(&plan);
    }
    times.sort();
    let median = times[RUNS / 2];
    println!(
        "plan: median {median:?} of {RUNS} runs (min {:?}, max {:?}), {changes} changes",
        times[0],
        times[RUNS - 1]
    );

    match (rss_before, peak_rss_kib()) {
        (Some(before), Some(after)) => {
            println!("peak RSS: {:.1} MiB (world built: {:.1} MiB)", after as f64 / 1024.0, before as f64 / 1024.0)
        }
        _ => println!("peak RSS: unavailable (no /proc/self/status)"),
    }
    // A speed-up must not change the plan: compare this line before and after (same scale). After the RSS
    // reading, so the JSON text does not count.
    println!("plan digest: {}", plan_digest(&ciscale::plan::plan(&desired, &observed, now)));
}
