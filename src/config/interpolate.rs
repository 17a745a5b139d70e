//! `${VAR}` interpolation of string values from the environment; `$${` is a literal `${`.
//!
//! Kept apart from parsing so the config hash is taken before it (no secret ever feeds the hash) and so the
//! environment is a plain function: tests pass their own, `load_file` passes `std::env`.

use std::ops::Range;

/// Why a string could not be interpolated; `at` is the byte range in the string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterpolationError {
    Missing { name: String, at: Range<usize> },
    Unterminated { at: Range<usize> },
    InvalidName { name: String, at: Range<usize> },
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// Replaces every `${NAME}` with `env(NAME)` and `$${` with `${`. All problems of the string are returned.
pub(crate) fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<InterpolationError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut index = 0;
    while index < text.len() {
        let rest = &text[index..];
        if rest.starts_with("$${") {
            out.push_str("${");
            index += 3;
        } else if rest.starts_with("${") {
            let Some(close) = rest.find('}') else {
                errors.push(InterpolationError::Unterminated { at: index..text.len() });
                break;
            };
            let name = &rest[2..close];
            let at = index..index + close + 1;
            if !is_valid_name(name) {
                errors.push(InterpolationError::InvalidName { name: name.to_owned(), at });
            } else {
                match env(name) {
                    Some(value) => out.push_str(&value),
                    None => errors.push(InterpolationError::Missing { name: name.to_owned(), at }),
                }
            }
            index += close + 1;
        } else {
            // Advance by one whole character.
            let ch = rest.chars().next().unwrap_or('$');
            out.push(ch);
            index += ch.len_utf8();
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The text with every `${NAME}` reference removed and `$${` kept: what is left of a secret besides references.
/// Empty (or blank) means the secret is only references, so it is safe to show and to hash.
pub(crate) fn literal_part(text: &str) -> String {
    let mut out = String::new();
    let mut index = 0;
    while index < text.len() {
        let rest = &text[index..];
        if rest.starts_with("$${") {
            out.push_str("$${");
            index += 3;
        } else if let Some(close) = rest.strip_prefix("${").and_then(|inner| inner.find('}')) {
            index += close + 3;
        } else {
            let ch = rest.chars().next().unwrap_or('$');
            out.push(ch);
            index += ch.len_utf8();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_references_and_keeps_the_rest() {
        assert_eq!(interpolate("Bearer ${TOKEN}!", &env), Ok("Bearer s3cret!".to_owned()));
        assert_eq!(interpolate("${TOKEN}${EMPTY}${TOKEN}", &env), Ok("s3crets3cret".to_owned()));
        assert_eq!(interpolate("cost: $5 and $HOME", &env), Ok("cost: $5 and $HOME".to_owned()));
        assert_eq!(interpolate("é${TOKEN}é", &env), Ok("és3creté".to_owned()));
    }

    #[test]
    fn double_dollar_escapes_a_reference() {
        assert_eq!(interpolate("$${TOKEN} is ${TOKEN}", &env), Ok("${TOKEN} is s3cret".to_owned()));
    }

    #[test]
    fn reports_every_problem_with_its_range() {
        let errors = interpolate("${NOPE} ${1BAD} ${TOKEN} ${OPEN", &env).unwrap_err();
        assert_eq!(
            errors,
            vec![
                InterpolationError::Missing { name: "NOPE".to_owned(), at: 0..7 },
                InterpolationError::InvalidName { name: "1BAD".to_owned(), at: 8..15 },
                InterpolationError::Unterminated { at: 25..31 },
            ]
        );
    }

    #[test]
    fn literal_part_drops_only_references() {
        assert_eq!(literal_part("${A}${B}"), "");
        assert_eq!(literal_part("x-${A}"), "x-");
        assert_eq!(literal_part("$${A}"), "$${A}");
        assert_eq!(literal_part("plain"), "plain");
    }
}
