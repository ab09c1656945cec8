//! Policy files (`berth policy apply -f`): YAML as Kubernetes manifests are written, or JSON,
//! read with the position of every mistake.

use serde_saphyr::MessageFormatter;

use super::Policy;
use super::k8s::{Policies, unique_names};

/// A mistake in a policy file and where it is (line and column from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct PolicyFileError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Reads the policies of a file: JSON when it starts with `{` or `[` (a policy, or an array of
/// them), YAML otherwise (documents separated by `---`, empty ones skipped). A document may
/// also be a Kubernetes `kind: List` with the policies as `items`. A name may be used once.
///
/// YAML is read with serde-saphyr: it is maintained (serde_yaml is archived), pure Rust, and,
/// unlike serde_yaml's forks, reports an error raised in a `Deserialize` impl (a bad CIDR, an
/// unknown field) at the offending value instead of at the collection around it.
pub fn parse_policy_documents(text: &str) -> Result<Vec<Policy>, PolicyFileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    unique_names(|| {
        if text.trim_start().starts_with(['{', '[']) {
            serde_json::from_str::<Policies>(text)
                .map(|p| p.0)
                .map_err(|e| json_error(&e))
        } else {
            serde_saphyr::from_multiple::<Policies>(text)
                .map(|docs| docs.into_iter().flat_map(|p| p.0).collect())
                .map_err(|e| yaml_error(&e))
        }
    })
}

fn json_error(e: &serde_json::Error) -> PolicyFileError {
    let message = e.to_string();
    // serde_json's text ends with the position, which the error gives apart.
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    PolicyFileError {
        line: e.line().max(1),
        column: e.column().max(1),
        message: message
            .strip_suffix(&suffix)
            .unwrap_or(&message)
            .to_string(),
    }
}

fn yaml_error(e: &serde_saphyr::Error) -> PolicyFileError {
    let (line, column) = e
        .location()
        .map_or((1, 1), |l| (position(l.line()), position(l.column())));
    let message = serde_saphyr::DefaultMessageFormatter.format_message(e.without_snippet());
    PolicyFileError {
        line,
        column,
        // Advice for serde-saphyr's callers, not for whoever wrote the file.
        message: message
            .trim_end_matches(", set DuplicateKeyPolicy in Options if acceptable")
            .to_string(),
    }
}

fn position(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}
