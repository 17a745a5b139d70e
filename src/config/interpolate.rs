//! `${VAR}` interpolation of string values from the environment. As in docker compose, `$$` is a literal `$`
//! (so `$${VAR}` is the text `${VAR}`); a `$NAME` without braces is not read from the environment but reported,
//! since it almost always meant `${NAME}`.
//!
//! Kept apart from parsing so the environment is a plain function: tests pass their own, `load_file` passes
//! `std::env`. What the caller makes of each problem (an error, or a warning when the value is not needed) is
//! decided in `config::interpolate_document`.

use std::ops::Range;

/// A problem in a string; `at` is the byte range in the string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterpolationError {
    /// `${NAME}` whose variable is not set; it interpolates as nothing.
    Missing {
        name: String,
        at: Range<usize>,
    },
    Unterminated {
        at: Range<usize>,
    },
    InvalidName {
        name: String,
        at: Range<usize>,
    },
    /// `$NAME` without braces: kept as it is written, never read from the environment.
    Unbraced {
        name: String,
        at: Range<usize>,
    },
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// The name a `$` at the start of `rest` is followed by without braces (`$HOME` → `HOME`), if any.
fn unbraced_name(rest: &str) -> Option<&str> {
    let after = rest.strip_prefix('$')?;
    let len = after.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(after.len());
    let name = &after[..len];
    is_valid_name(name).then_some(name)
}

/// The string with every `${NAME}` replaced by `env(NAME)` and `$$` by `$`, and every problem in it. A missing
/// variable interpolates as nothing, so the value is usable where the caller decides it is not needed.
pub(crate) fn interpolate(text: &str, env: &dyn Fn(&str) -> Option<String>) -> (String, Vec<InterpolationError>) {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut index = 0;
    while index < text.len() {
        let rest = &text[index..];
        if rest.starts_with("$$") {
            out.push('$');
            index += 2;
        } else if rest.starts_with("${") {
            let Some(close) = rest.find('}') else {
                errors.push(InterpolationError::Unterminated { at: index..text.len() });
                out.push_str(rest);
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
        } else if let Some(name) = unbraced_name(rest) {
            let at = index..index + 1 + name.len();
            errors.push(InterpolationError::Unbraced { name: name.to_owned(), at });
            out.push('$');
            out.push_str(name);
            index += 1 + name.len();
        } else {
            // Advance by one whole character.
            let ch = rest.chars().next().unwrap_or('$');
            out.push(ch);
            index += ch.len_utf8();
        }
    }
    (out, errors)
}

/// The names of the `${NAME}` references in a string, in order (for messages about a value made of them).
pub(crate) fn references(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut index = 0;
    while index < text.len() {
        let rest = &text[index..];
        if rest.starts_with("$$") {
            index += 2;
        } else if let Some(close) = rest.strip_prefix("${").and_then(|inner| inner.find('}')) {
            names.push(&rest[2..close + 2]);
            index += close + 3;
        } else {
            index += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    names
}

/// The text with every `${NAME}` reference removed and `$$` kept: what is left of a secret besides references.
/// Empty (or blank) means the secret is only references, so it is safe to show.
pub(crate) fn literal_part(text: &str) -> String {
    let mut out = String::new();
    let mut index = 0;
    while index < text.len() {
        let rest = &text[index..];
        if rest.starts_with("$$") {
            out.push_str("$$");
            index += 2;
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

    fn clean(text: &str) -> String {
        let (value, errors) = interpolate(text, &env);
        assert_eq!(errors, Vec::new(), "{text}");
        value
    }

    #[test]
    fn replaces_references_and_keeps_the_rest() {
        assert_eq!(clean("Bearer ${TOKEN}!"), "Bearer s3cret!");
        assert_eq!(clean("${TOKEN}${EMPTY}${TOKEN}"), "s3crets3cret");
        assert_eq!(clean("cost: $5, 100$ and $ alone"), "cost: $5, 100$ and $ alone");
        assert_eq!(clean("é${TOKEN}é"), "és3creté");
    }

    #[test]
    fn double_dollar_is_a_literal_dollar() {
        assert_eq!(clean("$${TOKEN} is ${TOKEN}"), "${TOKEN} is s3cret");
        assert_eq!(clean("$$HOME and a$$b"), "$HOME and a$b");
    }

    #[test]
    fn unbraced_names_are_kept_and_reported() {
        let (value, errors) = interpolate("x $HOME/$_y2-z", &env);
        assert_eq!(value, "x $HOME/$_y2-z");
        assert_eq!(
            errors,
            vec![
                InterpolationError::Unbraced { name: "HOME".to_owned(), at: 2..7 },
                InterpolationError::Unbraced { name: "_y2".to_owned(), at: 8..12 },
            ]
        );
    }

    #[test]
    fn references_lists_the_names() {
        assert_eq!(references("${A}-$${B}-${C}"), vec!["A", "C"]);
        assert_eq!(references("plain"), Vec::<&str>::new());
    }

    #[test]
    fn reports_every_problem_with_its_range() {
        let (value, errors) = interpolate("${NOPE} ${1BAD} ${TOKEN} ${OPEN", &env);
        assert_eq!(value, "  s3cret ${OPEN");
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
        assert_eq!(literal_part("$$"), "$$");
        assert_eq!(literal_part("plain"), "plain");
    }
}
