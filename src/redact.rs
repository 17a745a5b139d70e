//! The one place secrets are taken out of text: every secret the config holds (each provider's tokens, through
//! [`Desired::secrets`], whose `match`es over the provider kinds are exhaustive, so a new provider cannot be
//! added without saying what its secrets are), plus the per-agent credentials apply learns as it registers
//! agents. Provider errors can echo what they were sent, so every text that leaves ciscale from a provider call
//! (apply outcomes and logs, observation errors of `plan`, `apply`, `observe` and `watch`) passes through here.

use crate::model::Desired;

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Replaces every known secret value in a text with [`MASK`].
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Every secret of the config: the CI sources' and backends' credentials and the pools' `secret_env`.
    pub fn from_desired(desired: &Desired) -> Self {
        let mut redactor = Self::default();
        for secret in desired.secrets() {
            redactor.add(secret.expose());
        }
        redactor
    }

    /// One more secret (a freshly registered agent's token).
    pub fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|known| known == secret) {
            self.secrets.push(secret.to_owned());
            // Longest first, so a secret containing another is replaced whole.
            self.secrets.sort_by_key(|known| std::cmp::Reverse(known.len()));
        }
    }

    pub fn redact(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |text, secret| text.replace(secret.as_str(), MASK))
    }

    /// Whether a text holds any known secret.
    pub fn leaks(&self, text: &str) -> bool {
        self.secrets.iter().any(|secret| text.contains(secret.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_and_empty_ignored() {
        let mut redactor = Redactor::default();
        redactor.add("abc");
        redactor.add("abcdef");
        redactor.add("");
        assert_eq!(redactor.redact("x abcdef y abc"), "x *** y ***");
        assert!(redactor.leaks("..abc.."));
        assert!(!redactor.leaks("ab"));
    }
}
