//! Label selectors in Kubernetes' syntax (`app=web,tier!=db,env in (a,b),!canary`), so that
//! people write here what they write for `kubectl get -l`, and services and policies select
//! endpoints with one meaning.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    Labels, MAX_SELECTOR_TERMS, MAX_SELECTOR_VALUES, ModelError, Shown, check_count, validate_label,
};

/// Every requirement must hold (an empty selector selects everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operator {
    /// `key=value` (or `key==value`)
    Equals(String),
    /// `key!=value`: also holds when the key is absent, as in Kubernetes.
    NotEquals(String),
    /// `key in (a,b)`
    In(BTreeSet<String>),
    /// `key notin (a,b)`: also holds when the key is absent.
    NotIn(BTreeSet<String>),
    /// `key`
    Exists,
    /// `!key`
    DoesNotExist,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The selector made of `key=value` pairs (Kubernetes' `matchLabels`).
    pub fn from_labels(labels: &Labels) -> Selector {
        Selector {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement {
                    key: k.clone(),
                    op: Operator::Equals(v.clone()),
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// A selector as a request may give it: at most [`MAX_SELECTOR_TERMS`] requirements, at
    /// most [`MAX_SELECTOR_VALUES`] values of each `in` and `notin`, keys and values by the
    /// label rules. Parsing (the text, or Kubernetes' form) checks the rules but not the
    /// caps, so that a record stored before a cap existed still reads.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_count(
            "selector terms",
            self.requirements.len(),
            MAX_SELECTOR_TERMS,
            "per selector",
        )?;
        for r in &self.requirements {
            if let Operator::In(values) | Operator::NotIn(values) = &r.op {
                check_count(
                    format!("values of {}", Shown(&r.key)),
                    values.len(),
                    MAX_SELECTOR_VALUES,
                    "per in or notin",
                )?;
            }
            check_key_and_values(r)?;
        }
        Ok(())
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Operator::Equals(v) => value == Some(v),
            Operator::NotEquals(v) => value != Some(v),
            Operator::In(set) => value.is_some_and(|v| set.contains(v)),
            Operator::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl FromStr for Selector {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Selector, ModelError> {
        let bad = |why: String| ModelError::InvalidSelector {
            given: s.to_string(),
            why,
        };
        if s.trim().is_empty() {
            return Ok(Selector::default());
        }
        let parts = split_top_level(s).map_err(&bad)?;
        let mut requirements = Vec::with_capacity(parts.len());
        for part in parts {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad("an empty requirement between commas".into()));
            }
            let r = parse_requirement(part).map_err(&bad)?;
            check_key_and_values(&r).map_err(|e| bad(e.to_string()))?;
            requirements.push(r);
        }
        Ok(Selector { requirements })
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("a ')' without '(' at position {}", i + 1))?
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a '(' is not closed".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let req = |key: &str, op| {
        Ok(Requirement {
            key: key.trim().to_string(),
            op,
        })
    };
    if let Some(key) = part.strip_prefix('!') {
        return req(key, Operator::DoesNotExist);
    }
    if let Some((key, value)) = part.split_once("!=") {
        return req(key, Operator::NotEquals(value.trim().to_string()));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return req(key, Operator::Equals(value.trim().to_string()));
    }
    // `key in (a,b)` / `key notin (a,b)` / `key`
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    let Some(rest) = words.next().map(str::trim) else {
        return req(key, Operator::Exists);
    };
    let (negated, list) = if let Some(list) = rest.strip_prefix("notin") {
        (true, list)
    } else if let Some(list) = rest.strip_prefix("in") {
        (false, list)
    } else {
        return Err(format!(
            "{part:?} is not KEY=VALUE, KEY!=VALUE, KEY in (A,B), KEY notin (A,B), KEY or !KEY"
        ));
    };
    let inner = list
        .trim()
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| format!("in {part:?} the values must be in parentheses: (A,B)"))?;
    let values: BTreeSet<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
    if values.iter().all(String::is_empty) {
        return Err(format!("{part:?} needs at least one value"));
    }
    req(
        key,
        if negated {
            Operator::NotIn(values)
        } else {
            Operator::In(values)
        },
    )
}

/// Keys and values follow the label rules, so a selector can match only what labels can be.
pub(crate) fn check_key_and_values(r: &Requirement) -> Result<(), ModelError> {
    match &r.op {
        Operator::Equals(v) | Operator::NotEquals(v) => validate_label(&r.key, v),
        Operator::In(values) | Operator::NotIn(values) => {
            values.iter().try_for_each(|v| validate_label(&r.key, v))
        }
        Operator::Exists | Operator::DoesNotExist => validate_label(&r.key, ""),
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        match &self.op {
            Operator::Equals(v) => write!(f, "{}={v}", self.key),
            Operator::NotEquals(v) => write!(f, "{}!={v}", self.key),
            Operator::In(s) => write!(f, "{} in ({})", self.key, list(s)),
            Operator::NotIn(s) => write!(f, "{} notin ({})", self.key, list(s)),
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Stored and served as its text.
impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kubernetes_syntax_parses_and_matches() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("env", "prod")]);
        let db = labels(&[("app", "db"), ("env", "dev")]);
        for (sel, on_web, on_db) in [
            ("app=web", true, false),
            ("app==web", true, false),
            ("app!=web", false, true),
            ("tier", true, false),
            ("!tier", false, true),
            ("env in (prod, staging)", true, false),
            ("env notin (prod)", false, true),
            ("missing notin (x)", true, true),
            ("missing!=x", true, true),
            ("app in (web,db),env!=dev", true, false),
            ("", true, true),
        ] {
            let s: Selector = sel.parse().unwrap();
            assert_eq!(s.matches(&web), on_web, "{sel} on web");
            assert_eq!(s.matches(&db), on_db, "{sel} on db");
            // The text round-trips.
            assert_eq!(s.to_string().parse::<Selector>().unwrap(), s, "{sel}");
        }
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_reason() {
        for (sel, why) in [
            ("app=web,", "empty requirement"),
            ("env in (a,b", "not closed"),
            ("env in a,b", "parentheses"),
            ("env in ()", "at least one value"),
            ("env like x", "is not KEY=VALUE"),
            ("-app=web", "the key must be"),
            ("app=we b", "the value must be"),
            ("env)", "without '('"),
        ] {
            let err = sel.parse::<Selector>().unwrap_err().to_string();
            assert!(err.contains(why), "{sel}: {err}");
        }
    }

    #[test]
    fn terms_and_values_are_capped_by_validate_not_by_parsing() {
        let terms = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let check = |text: String| text.parse::<Selector>().unwrap().validate();
        assert_eq!(check(terms(MAX_SELECTOR_TERMS)), Ok(()));
        assert_eq!(
            check(terms(10_000)).unwrap_err().to_string(),
            "too many selector terms: 10000 given, at most 256 per selector"
        );
        let values = |n: usize| {
            let v: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
            format!("env in ({})", v.join(","))
        };
        assert_eq!(check(values(MAX_SELECTOR_VALUES)), Ok(()));
        assert_eq!(
            check(values(257)).unwrap_err().to_string(),
            "too many values of \"env\": 257 given, at most 256 per in or notin"
        );
        // A record stored before the caps still reads.
        let stored = serde_json::to_string(&terms(300)).unwrap();
        assert_eq!(
            serde_json::from_str::<Selector>(&stored)
                .unwrap()
                .requirements
                .len(),
            300
        );
    }

    #[test]
    fn serialized_as_text() {
        let s: Selector = "app=web,env in (a,b)".parse().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"app=web,env in (a,b)\"");
        assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Selector>("\"a in (\"").is_err());
    }
}
