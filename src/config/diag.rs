//! Located config problems: every problem found in one pass, each with `file:line:col`, a message and an
//! optional hint. Rendered two ways: plain lines (`render_plain`, for logs, CI and tests) and graphically through
//! [`miette::Diagnostic`] (source snippet with labels), chosen by `main`.

use std::fmt;

use miette::{LabeledSpan, NamedSource, SourceCode};

/// Where a problem is: 1-based line and column (in characters) plus the byte span in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub line: usize,
    pub column: usize,
    pub offset: usize,
    pub len: usize,
}

/// A [`Span`] in a named file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Byte offset of the start in the source text.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Severity {
    /// The config cannot be used.
    #[default]
    Error,
    /// The config can be used for what was asked, but something looks wrong or will fail later (a secret an
    /// offline command does not need, `$VAR` without braces in a plain value).
    Warning,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem in a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// Lower-case, identifiers in backticks, never a secret value.
    pub message: String,
    pub hint: Option<String>,
    pub location: Option<Location>,
    /// A second place worth showing (e.g. the first definition of a duplicate), with its label.
    pub related: Option<(Location, String)>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl miette::Diagnostic for Problem {
    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.hint.as_ref().map(|hint| Box::new(hint) as Box<dyn fmt::Display>)
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let primary = self
            .location
            .as_ref()
            .map(|at| LabeledSpan::new_primary_with_span(Some("here".to_owned()), (at.offset, at.len)));
        let secondary = self
            .related
            .as_ref()
            .map(|(at, label)| LabeledSpan::new_with_span(Some(label.clone()), (at.offset, at.len)));
        let labels: Vec<LabeledSpan> = primary.into_iter().chain(secondary).collect();
        if labels.is_empty() {
            None
        } else {
            Some(Box::new(labels.into_iter()))
        }
    }
}

/// All problems of one config file, in source order.
///
/// The source text kept for the graphical rendering has literal secret values blanked out (`*`), so a snippet
/// around a problem never shows a token written inline in the file.
pub struct Diagnostics {
    source_name: String,
    source: NamedSource<String>,
    problems: Vec<Problem>,
}

impl Diagnostics {
    pub(crate) fn new(source_name: &str, redacted_source: String, mut problems: Vec<Problem>) -> Self {
        // Source order reads best; problems without a place (none today) go first.
        problems.sort_by(|a, b| {
            let key = |p: &Problem| p.location.as_ref().map(|at| (at.offset, at.len));
            key(a).cmp(&key(b)).then_with(|| a.message.cmp(&b.message))
        });
        problems.dedup();
        Self {
            source_name: source_name.to_owned(),
            source: NamedSource::new(source_name, redacted_source).with_language("yaml"),
            problems,
        }
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// One `file:line:col: error: message` (or `warning:`) line per problem, each followed by an indented
    /// `hint:` line when a fix is known. Ends with a newline.
    pub fn render_plain(&self) -> String {
        let mut out = String::new();
        for problem in &self.problems {
            match &problem.location {
                Some(at) => out.push_str(&format!("{}:{}:{}: ", at.file, at.line, at.column)),
                None => out.push_str(&format!("{}: ", self.source_name)),
            }
            out.push_str(problem.severity.label());
            out.push_str(": ");
            out.push_str(&problem.message);
            out.push('\n');
            if let Some(hint) = &problem.hint {
                out.push_str("  hint: ");
                out.push_str(hint);
                out.push('\n');
            }
        }
        out
    }
}

impl fmt::Debug for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the source text: it is long, and it is what the problems point into anyway.
        f.debug_struct("Diagnostics").field("source_name", &self.source_name).field("problems", &self.problems).finish()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        if self.problems.iter().all(|problem| problem.severity == Severity::Warning) {
            let noun = if count == 1 { "warning" } else { "warnings" };
            return write!(f, "config `{}`: {count} {noun}", self.source_name);
        }
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(f, "invalid config `{}`: {count} {noun}", self.source_name)
    }
}

impl std::error::Error for Diagnostics {}

impl miette::Diagnostic for Diagnostics {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new("ciscale::config"))
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.source)
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        Some(Box::new(self.problems.iter().map(|problem| problem as &dyn miette::Diagnostic)))
    }
}

/// Maps the YAML parser's character positions to byte offsets and finds where a scalar's text ends, so labels
/// cover exactly the offending value.
pub(crate) struct SourceMap<'a> {
    text: &'a str,
    /// Byte offset of every character, plus the text length at the end.
    char_offsets: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let mut char_offsets: Vec<usize> = text.char_indices().map(|(offset, _)| offset).collect();
        char_offsets.push(text.len());
        Self { text, char_offsets }
    }

    pub(crate) fn text(&self) -> &'a str {
        self.text
    }

    pub(crate) fn byte_offset(&self, char_index: usize) -> usize {
        self.char_offsets.get(char_index).copied().unwrap_or(self.text.len())
    }

    /// Span of a marked-yaml marker with the given byte length.
    pub(crate) fn span_at(&self, marker: &marked_yaml::Marker, len: usize) -> Span {
        let offset = self.byte_offset(marker.character());
        Span { line: marker.line(), column: marker.column(), offset, len: len.min(self.text.len() - offset) }
    }

    /// Byte length of the scalar whose text starts at `offset` and whose parsed value is `value`.
    pub(crate) fn scalar_len(&self, offset: usize, value: &str) -> usize {
        let rest = &self.text[offset.min(self.text.len())..];
        let line_len = rest.find('\n').unwrap_or(rest.len());
        match rest.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                // Find the closing quote: `\"` escapes in double quotes, `''` in single quotes.
                let mut chars = rest.char_indices().skip(1).peekable();
                while let Some((index, ch)) = chars.next() {
                    if quote == '"' && ch == '\\' {
                        chars.next();
                    } else if ch == quote {
                        if quote == '\'' && chars.peek().is_some_and(|(_, next)| *next == '\'') {
                            chars.next();
                            continue;
                        }
                        return index + 1;
                    }
                }
                line_len
            }
            // A plain one-line scalar is its own value; anything else (block scalars, folded lines): its line.
            _ if !value.is_empty() && rest.starts_with(value) => value.len(),
            _ => line_len.max(1).min(rest.len()),
        }
    }

    /// Length of the first line starting at `offset` (for labelling a mapping or list by its first line).
    pub(crate) fn line_len(&self, offset: usize) -> usize {
        let rest = &self.text[offset.min(self.text.len())..];
        rest.find('\n').unwrap_or(rest.len()).max(1).min(rest.len())
    }

    /// Line and column (1-based, column in characters) of a byte offset.
    pub(crate) fn line_column(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |index| index + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

/// Collects problems while checking; turns [`Span`]s into [`Location`]s in the named file.
pub(crate) struct Problems {
    source_name: String,
    pub(crate) list: Vec<Problem>,
}

impl Problems {
    pub(crate) fn new(source_name: &str) -> Self {
        Self { source_name: source_name.to_owned(), list: Vec::new() }
    }

    pub(crate) fn location(&self, span: Span) -> Location {
        Location {
            file: self.source_name.clone(),
            line: span.line,
            column: span.column,
            offset: span.offset,
            len: span.len,
        }
    }

    pub(crate) fn push(&mut self, span: Option<Span>, message: impl Into<String>, hint: Option<String>) {
        let location = span.map(|span| self.location(span));
        self.list.push(Problem { severity: Severity::Error, message: message.into(), hint, location, related: None });
    }

    /// A warning: reported, but the config stays usable.
    pub(crate) fn warn(&mut self, span: Option<Span>, message: impl Into<String>, hint: Option<String>) {
        let location = span.map(|span| self.location(span));
        self.list.push(Problem { severity: Severity::Warning, message: message.into(), hint, location, related: None });
    }

    pub(crate) fn push_related(
        &mut self,
        span: Option<Span>,
        message: impl Into<String>,
        hint: Option<String>,
        related: Option<(Span, &str)>,
    ) {
        let location = span.map(|span| self.location(span));
        let related = related.map(|(span, label)| (self.location(span), label.to_owned()));
        self.list.push(Problem { severity: Severity::Error, message: message.into(), hint, location, related });
    }

    /// No errors (warnings do not count).
    pub(crate) fn is_empty(&self) -> bool {
        self.list.iter().all(|problem| problem.severity == Severity::Warning)
    }

    /// Takes the warnings out, leaving the errors.
    pub(crate) fn take_warnings(&mut self) -> Vec<Problem> {
        let (warnings, errors) =
            std::mem::take(&mut self.list).into_iter().partition(|problem| problem.severity == Severity::Warning);
        self.list = errors;
        warnings
    }
}

/// `did you mean `x`?` when one candidate is close to `input` (Jaro-Winkler, so typos and case slips match but
/// unrelated names do not).
pub(crate) fn did_you_mean<'c>(input: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<String> {
    let lowered = input.to_lowercase();
    candidates
        .into_iter()
        .map(|candidate| (strsim::jaro_winkler(&lowered, &candidate.to_lowercase()), candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| format!("did you mean `{candidate}`?"))
}

/// `` `a`, `b`, `c` `` for hints listing names.
pub(crate) fn backticked<'c>(names: impl IntoIterator<Item = &'c str>) -> String {
    names.into_iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", ")
}
