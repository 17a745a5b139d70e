//! Digests the planner and apply agree on: the agent settings an instance was created with (spec drift), and
//! the parts of an observation a saved plan depends on.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::{AgentSpec, InstanceState, Observed, OWNER_LABEL, POOL_LABEL};

/// Digest of the agent settings an instance is created with (image and plain env; secrets are left out so a
/// rotated token does not replace every agent). First 12 hex chars of a SHA-256, stored on the instance as the
/// `ciscale.agent-hash` label and compared for spec drift.
pub fn agent_hash(agent: &AgentSpec) -> String {
    let mut hasher = Sha256::new();
    // NUL separators keep the encoding unambiguous (`a=b` + `c` never equals `a` + `b=c`).
    hasher.update(b"image\0");
    hasher.update(agent.image.as_deref().unwrap_or_default().as_bytes());
    hasher.update(b"\0");
    for (key, value) in &agent.env {
        hasher.update(b"env\0");
        hasher.update(key.as_bytes());
        hasher.update(b"\0");
        hasher.update(value.as_bytes());
        hasher.update(b"\0");
    }
    let mut hex = to_hex(&hasher.finalize());
    hex.truncate(12);
    hex
}

/// Digest of the parts of an observation that make a saved plan stale: per backend the instances (id, state,
/// owner and pool labels), per CI source the agents (id, drained). Timestamps and the queue are left out: they
/// change on every poll without making the plan's changes wrong.
pub fn fingerprint(observed: &Observed) -> String {
    #[derive(Serialize)]
    struct InstanceKey<'a> {
        id: &'a str,
        state: InstanceState,
        owner: Option<&'a str>,
        pool: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct AgentKey<'a> {
        id: &'a str,
        no_schedule: bool,
    }
    #[derive(Serialize)]
    struct Inventory<'a> {
        backends: BTreeMap<&'a str, Vec<InstanceKey<'a>>>,
        ci: BTreeMap<&'a str, Vec<AgentKey<'a>>>,
    }
    let backends = observed
        .backends
        .iter()
        .map(|(name, backend)| {
            let mut instances: Vec<InstanceKey<'_>> = backend
                .instances
                .iter()
                .map(|instance| InstanceKey {
                    id: instance.id.as_str(),
                    state: instance.state,
                    owner: instance.labels.get(OWNER_LABEL).map(String::as_str),
                    pool: instance.labels.get(POOL_LABEL).map(String::as_str),
                })
                .collect();
            // Unstable is enough: keys that compare equal are equal in every field, so no order of them shows.
            instances.sort_unstable_by(|a, b| (a.id, a.state, a.owner, a.pool).cmp(&(b.id, b.state, b.owner, b.pool)));
            (name.as_str(), instances)
        })
        .collect();
    let ci = observed
        .ci
        .iter()
        .map(|(name, source)| {
            let mut agents: Vec<AgentKey<'_>> = source
                .agents
                .iter()
                .map(|agent| AgentKey { id: agent.id.as_str(), no_schedule: agent.no_schedule })
                .collect();
            agents.sort_unstable_by(|a, b| (a.id, a.no_schedule).cmp(&(b.id, b.no_schedule)));
            (name.as_str(), agents)
        })
        .collect();
    // Streamed into the hash: the same bytes as hashing the JSON text, without holding it (a megabyte at 10,000
    // instances). Serialising plain strings, bools and enums into a hash cannot fail.
    let mut hasher = HashWriter { hash: Sha256::new(), buffer: Vec::with_capacity(HashWriter::BUFFER) };
    let _ = serde_json::to_writer(&mut hasher, &Inventory { backends, ci });
    format!("sha256:{}", to_hex(&hasher.finish()))
}

/// An `io::Write` that feeds a SHA-256 (serde_json writes through `io::Write`). serde_json writes a few bytes
/// at a time (a quote, a key, a comma), and each `update` of the hash has a fixed cost, so the bytes are
/// gathered into blocks first: the same bytes reach the hash, in the same order.
struct HashWriter {
    hash: Sha256,
    buffer: Vec<u8>,
}

impl HashWriter {
    const BUFFER: usize = 16 * 1024;

    fn finish(mut self) -> sha2::digest::Output<Sha256> {
        self.hash.update(&self.buffer);
        self.hash.finalize()
    }
}

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buffer.len() + bytes.len() > Self::BUFFER {
            self.hash.update(&self.buffer);
            self.buffer.clear();
        }
        if bytes.len() >= Self::BUFFER {
            self.hash.update(bytes);
        } else {
            self.buffer.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    // By table, not `write!("{:02x}")`: the planner hashes every owned name on every call, and a simulated month
    // calls it a hundred thousand times (the formatter was a quarter of `ciscale simulate`'s time).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::to_hex;

    #[test]
    fn hex_is_two_lower_case_digits_per_byte() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff, 0x10]), "000fa5ff10");
        assert_eq!(to_hex(&[]), "");
    }
}
