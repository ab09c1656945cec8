//! Size caps on what berth accepts. They live here, beside the validation that enforces them,
//! so that every front-end (the API and CLI, CNI, Docker) refuses the same input with the same
//! message. docs/api.md lists them all with the reasons for their values: each is well above
//! real use (Kubernetes' own limits where it has them) and far below what would let one request
//! take a daemon's memory or time.

use std::fmt;

use crate::ModelError;

/// The largest request body the daemon reads (its API and Docker plugin sockets), and the
/// largest network configuration berth-cni reads.
pub const MAX_BODY: usize = 2 << 20;

/// Labels per endpoint. Kubernetes counts no labels, only bytes (its objects stay under
/// etcd's 1.5 MiB); this many of the longest labels still fit in a request body.
pub const MAX_LABELS: usize = 1024;
/// DNS aliases per endpoint.
pub const MAX_ALIASES: usize = 256;
/// Named ports per endpoint.
pub const MAX_NAMED_PORTS: usize = 1024;
/// Published ports per endpoint: four whole `--publish` ranges.
pub const MAX_PUBLISHED_PORTS: usize = 4 * crate::MAX_RANGE;
/// Requested addresses per endpoint: one per address family.
pub const MAX_REQUESTED_IPS: usize = 2;
/// Requirements (comma-separated terms) per label selector.
pub const MAX_SELECTOR_TERMS: usize = 256;
/// Values of one `in` or `notin` requirement.
pub const MAX_SELECTOR_VALUES: usize = 256;
/// Ports per service: over twice Kubernetes' 100 (its EndpointSlices take no more).
pub const MAX_SERVICE_PORTS: usize = 256;
/// Published ports (node ports) per service: a service's records are one store transaction,
/// which etcd caps at 128 operations.
pub const MAX_NODE_PORTS: usize = 64;
/// Virtual IPs per service: one per address family.
pub const MAX_VIPS: usize = 2;
/// Attachments a CNI GC may name as valid: 75 times Kubernetes' default of 110 pods per node,
/// and as many of the longest as fit in a request body.
pub const MAX_GC_ATTACHMENTS: usize = 8192;
/// A container id's length: containerd's ids are at most 76 characters, Docker's and CRI-O's
/// 64.
pub const MAX_CONTAINER_ID: usize = 128;
/// A network-namespace path's length: Linux's PATH_MAX less the terminating NUL.
pub const MAX_NETNS_PATH: usize = 4095;
/// A network, sandbox, endpoint or policy name's length: Docker's.
pub const MAX_NAME: usize = 64;
/// A label key's name (`NAME` of `PREFIX/NAME`), as Kubernetes has it.
pub const MAX_LABEL_NAME: usize = 63;
/// A label key's prefix (a DNS subdomain), as Kubernetes has it.
pub const MAX_LABEL_PREFIX: usize = 253;
/// A label value, as Kubernetes has it.
pub const MAX_LABEL_VALUE: usize = 63;

/// Refuses a list of `given` entries when it is over `cap`; `what` names the list as the
/// request calls it, `per` what it is counted per ("per endpoint").
pub fn check_count(
    what: impl Into<String>,
    given: usize,
    cap: usize,
    per: &'static str,
) -> Result<(), ModelError> {
    if given > cap {
        return Err(ModelError::TooMany {
            what: what.into(),
            given,
            cap,
            per,
        });
    }
    Ok(())
}

/// Refuses a string longer than `cap` bytes; `what` names it as the request calls it.
pub fn check_length(what: impl Into<String>, value: &str, cap: usize) -> Result<(), ModelError> {
    if value.len() > cap {
        return Err(ModelError::TooLong {
            what: what.into(),
            value: value.to_string(),
            cap,
        });
    }
    Ok(())
}

/// A value from a request as an error message quotes it: whole when short, else its start
/// and its length, so that a refused megabyte does not come back as a megabyte of message.
pub struct Shown<'a>(pub &'a str);

/// [`Shown`] without the length, for a message that gives it anyway.
pub(crate) struct ShownStart<'a>(pub &'a str);

/// The longest value quoted whole, in characters.
const SHOWN_WHOLE: usize = 80;
/// How much of a longer one is quoted.
const SHOWN_START: usize = 48;

/// The start of `s` that is quoted, when `s` is too long to quote whole.
fn cut(s: &str) -> Option<&str> {
    s.char_indices().nth(SHOWN_WHOLE)?;
    let end = s
        .char_indices()
        .nth(SHOWN_START)
        .map_or(s.len(), |(i, _)| i);
    Some(&s[..end])
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match cut(self.0) {
            None => write!(f, "{:?}", self.0),
            Some(start) => write!(f, "{start:?}... ({} bytes)", self.0.len()),
        }
    }
}

impl fmt::Display for ShownStart<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match cut(self.0) {
            None => write!(f, "{:?}", self.0),
            Some(start) => write!(f, "{start:?}..."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_over_its_cap_is_refused_naming_it_the_cap_and_its_size() {
        assert_eq!(check_count("labels", 1024, 1024, "per endpoint"), Ok(()));
        let e = check_count("labels", 100_000, 1024, "per endpoint").unwrap_err();
        assert_eq!(
            e.to_string(),
            "too many labels: 100000 given, at most 1024 per endpoint"
        );
        assert_eq!(check_length("container id", &"c".repeat(128), 128), Ok(()));
        let e = check_length("container id", &"c".repeat(129), 128).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "invalid container id {:?}...: 129 bytes long, at most 128",
                "c".repeat(48)
            )
        );
    }

    #[test]
    fn long_values_are_quoted_by_their_start_and_length() {
        assert_eq!(Shown("web").to_string(), "\"web\"");
        let at_limit = "x".repeat(80);
        assert_eq!(Shown(&at_limit).to_string(), format!("{at_limit:?}"));
        let long = "é".repeat(1000);
        assert_eq!(
            Shown(&long).to_string(),
            format!("{:?}... (2000 bytes)", "é".repeat(48))
        );
    }
}
