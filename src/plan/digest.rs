//! Digests the planner and apply agree on: the agent settings an instance was created with (spec drift), and
//! the parts of an observation a saved plan depends on.

use sha2::{Digest, Sha256};

use super::sort_key::SortKey;

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
///
/// The digest is the SHA-256 of this JSON text (serde_json's compact form of the inventory; saved plans carry
/// it, so the encoding is pinned by a test):
/// `{"backends":{NAME:[{"id":ID,"state":STATE,"owner":OWNER|null,"pool":POOL|null},...],...},
/// "ci":{NAME:[{"id":ID,"no_schedule":BOOL},...],...}}`, instances and agents sorted by every field in that
/// order. The text is written here by hand, straight into the hash: serde's derive went through a call per
/// punctuation mark, a fifth of a large plan's time.
pub fn fingerprint(observed: &Observed) -> String {
    let mut out = HashWriter { hash: Sha256::new(), buffer: Vec::with_capacity(HashWriter::BUFFER) };
    out.put(b"{\"backends\":{");
    // Each entry leads with its id's sort key (see `sort_key`): sorted as the ids are, without a `memcmp` per
    // comparison.
    let mut instances: Vec<(u64, &str, InstanceState, Option<&str>, Option<&str>)> = Vec::new();
    for (n, (name, backend)) in observed.backends.iter().enumerate() {
        instances.clear();
        let key = SortKey::new(backend.instances.iter().map(|instance| instance.id.as_str()));
        instances.extend(backend.instances.iter().map(|instance| {
            let label = |key: &str| instance.labels.get(key).map(String::as_str);
            let id = instance.id.as_str();
            (key.of(id), id, instance.state, label(OWNER_LABEL), label(POOL_LABEL))
        }));
        // Unstable is enough: entries that compare equal are equal in every field, so no order of them shows.
        instances.sort_unstable();
        if n > 0 {
            out.put(b",");
        }
        out.string(name.as_str());
        out.put(b":[");
        for (i, (_, id, state, owner, pool)) in instances.iter().enumerate() {
            out.put(if i == 0 { b"{\"id\":" } else { b",{\"id\":" });
            out.string(id);
            out.put(b",\"state\":");
            out.put(state_json(*state));
            out.put(b",\"owner\":");
            out.optional(*owner);
            out.put(b",\"pool\":");
            out.optional(*pool);
            out.put(b"}");
        }
        out.put(b"]");
    }
    out.put(b"},\"ci\":{");
    let mut agents: Vec<(u64, &str, bool)> = Vec::new();
    for (n, (name, source)) in observed.ci.iter().enumerate() {
        agents.clear();
        let key = SortKey::new(source.agents.iter().map(|agent| agent.id.as_str()));
        agents.extend(
            source.agents.iter().map(|agent| (key.of(agent.id.as_str()), agent.id.as_str(), agent.no_schedule)),
        );
        agents.sort_unstable();
        if n > 0 {
            out.put(b",");
        }
        out.string(name.as_str());
        out.put(b":[");
        for (i, (_, id, no_schedule)) in agents.iter().enumerate() {
            out.put(if i == 0 { b"{\"id\":" } else { b",{\"id\":" });
            out.string(id);
            out.put(if *no_schedule { b",\"no_schedule\":true}" } else { b",\"no_schedule\":false}" });
        }
        out.put(b"]");
    }
    out.put(b"}}");
    format!("sha256:{}", to_hex(&out.finish()))
}

/// An instance state as serde writes it (a JSON string of its kebab-case name).
fn state_json(state: InstanceState) -> &'static [u8] {
    match state {
        InstanceState::Pending => b"\"pending\"",
        InstanceState::Running => b"\"running\"",
        InstanceState::Stopping => b"\"stopping\"",
        InstanceState::Stopped => b"\"stopped\"",
        InstanceState::Deleting => b"\"deleting\"",
        InstanceState::Terminated => b"\"terminated\"",
        InstanceState::Unknown => b"\"unknown\"",
    }
}

/// Feeds a SHA-256 in blocks: the fingerprint's text comes a few bytes at a time, and each `update` of the hash
/// has a fixed cost. The same bytes reach the hash, in the same order.
struct HashWriter {
    hash: Sha256,
    buffer: Vec<u8>,
}

impl HashWriter {
    const BUFFER: usize = 16 * 1024;

    fn put(&mut self, bytes: &[u8]) {
        if self.buffer.len() + bytes.len() > Self::BUFFER {
            self.hash.update(&self.buffer);
            self.buffer.clear();
        }
        if bytes.len() >= Self::BUFFER {
            self.hash.update(bytes);
        } else {
            self.buffer.extend_from_slice(bytes);
        }
    }

    /// A JSON string as serde_json writes it: quoted, and only `"`, `\` and control characters escaped (so a
    /// string without them is its bytes; one with them goes through serde_json itself).
    fn string(&mut self, value: &str) {
        // Without an early exit, so the check runs on whole vectors of bytes (ids and names are short).
        let needs_escape =
            value.bytes().fold(false, |found, byte| found | (byte < 0x20) | (byte == b'"') | (byte == b'\\'));
        if needs_escape {
            // Writing a string into memory cannot fail.
            let escaped = serde_json::to_vec(value).unwrap_or_default();
            self.put(&escaped);
        } else {
            self.put(b"\"");
            self.put(value.as_bytes());
            self.put(b"\"");
        }
    }

    fn optional(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.string(value),
            None => self.put(b"null"),
        }
    }

    fn finish(mut self) -> sha2::digest::Output<Sha256> {
        self.hash.update(&self.buffer);
        self.hash.finalize()
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
