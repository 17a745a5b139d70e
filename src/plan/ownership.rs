//! Ownership and names: how the instances and agent records this deployment makes are named, and how a name is
//! read back.

use super::fasthash::FastSet;
use crate::model::{Desired, PoolName};

/// Name of the `index`-th instance of a pool (index from 1). Deterministic, so a create retried after a crash
/// finds the instance it already made (create-if-absent).
pub fn instance_name(owner: &str, pool: &PoolName, index: u32) -> String {
    format!("{owner}-{pool}-{index}")
}

/// The pool an agent name `{owner}-{pool}-{n}` belongs to: the longest configured pool name that fits, else the
/// middle part of the name as written.
pub(super) fn pool_of_agent_name(desired: &Desired, agent_name: &str) -> PoolName {
    let rest = agent_name.strip_prefix(&format!("{}-", desired.owner)).unwrap_or(agent_name);
    let configured = desired
        .pools
        .iter()
        .filter(|pool| {
            rest.strip_prefix(pool.name.as_str())
                .and_then(|tail| tail.strip_prefix('-'))
                .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
        })
        .max_by_key(|pool| pool.name.as_str().len());
    match configured {
        Some(pool) => pool.name.clone(),
        None => match rest.rsplit_once('-') {
            Some((pool, index)) if index.bytes().all(|b| b.is_ascii_digit()) => PoolName::new(pool),
            _ => PoolName::new(rest),
        },
    }
}

/// Hands out `{owner}-{pool}-{n}` names, lowest `n` first, skipping every name an observed instance (any
/// backend, any state) or an agent record (any CI source) already uses, so a create never collides with a
/// leftover that is still being cleaned up.
pub(super) struct NameAllocator<'a> {
    owner: &'a str,
    pool: &'a PoolName,
    used: &'a FastSet<&'a str>,
    next_index: u32,
}

impl<'a> NameAllocator<'a> {
    pub fn new(owner: &'a str, pool: &'a PoolName, used: &'a FastSet<&'a str>) -> Self {
        Self { owner, pool, used, next_index: 1 }
    }

    pub fn next(&mut self) -> String {
        loop {
            let name = instance_name(self.owner, self.pool, self.next_index);
            self.next_index += 1;
            if !self.used.contains(name.as_str()) {
                return name;
            }
        }
    }
}
