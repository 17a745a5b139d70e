//! The planner's lookup tables: hash maps and sets with a small, fast, fixed-seed hasher (`rustc-hash`'s FxHash).
//!
//! The std SipHash is built to resist hash flooding; the planner hashes ~10^5 short strings per plan and needs
//! to stay within a poll interval's budget, so it uses this instead. Flooding is not a concern here: the keys are
//! instance/agent names and job label sets from the user's own CI, and the worst case is a slower plan, never a
//! wrong one. Iteration order of these maps never reaches the plan (they are used for lookups and sums only).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

pub(super) use rustc_hash::FxHasher;

pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
pub(super) type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;
