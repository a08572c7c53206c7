//! Why an object or part of one was not programmed. A fixed set, so it can
//! label a metric (`kpr_skipped_objects_total{reason}`) without letting
//! object names or error text into label values.

use std::fmt;

/// The reason a manifest document, object, port or endpoint was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The document is not valid YAML/JSON or does not match its kind's schema.
    Malformed,
    /// A kind kpr does not consume (anything but v1 Service and discovery.k8s.io/v1 EndpointSlice).
    UnsupportedKind,
    /// A protocol kpr does not balance (SCTP).
    UnsupportedProtocol,
    /// A Service type kpr does not program yet.
    UnsupportedType,
    /// An address that does not parse or does not fit the object's family.
    InvalidAddress,
    /// A port that is missing or out of range.
    InvalidPort,
    /// A second object with the same namespace/name.
    Duplicate,
    /// A manifest path that is missing or a file/directory that could not be read.
    Unreadable,
    /// An annotation kpr reads has a value it does not know; the
    /// annotation is ignored (the object is programmed without it).
    InvalidAnnotation,
    /// A name or namespace that is not a DNS-1123 label or subdomain as the
    /// API server requires (`/`, control characters, upper case...).
    InvalidName,
    /// A manifest file or document over its size limit
    /// (`--manifest-max-file-bytes`, `--manifest-max-document-bytes`).
    TooLarge,
    /// A document nested deeper than `--manifest-max-depth`.
    TooDeep,
    /// A manifest path that is a FIFO, socket, device or directory where a
    /// file is expected: refused without being opened.
    NotRegularFile,
}

impl SkipReason {
    /// Every reason, in label order.
    pub const ALL: [SkipReason; 13] = [
        SkipReason::Malformed,
        SkipReason::UnsupportedKind,
        SkipReason::UnsupportedProtocol,
        SkipReason::UnsupportedType,
        SkipReason::InvalidAddress,
        SkipReason::InvalidPort,
        SkipReason::Duplicate,
        SkipReason::Unreadable,
        SkipReason::InvalidAnnotation,
        SkipReason::InvalidName,
        SkipReason::TooLarge,
        SkipReason::TooDeep,
        SkipReason::NotRegularFile,
    ];

    /// The metric label value.
    pub fn as_label(self) -> &'static str {
        match self {
            SkipReason::Malformed => "malformed",
            SkipReason::UnsupportedKind => "unsupported_kind",
            SkipReason::UnsupportedProtocol => "unsupported_protocol",
            SkipReason::UnsupportedType => "unsupported_type",
            SkipReason::InvalidAddress => "invalid_address",
            SkipReason::InvalidPort => "invalid_port",
            SkipReason::Duplicate => "duplicate",
            SkipReason::Unreadable => "unreadable",
            SkipReason::InvalidAnnotation => "invalid_annotation",
            SkipReason::InvalidName => "invalid_name",
            SkipReason::TooLarge => "too_large",
            SkipReason::TooDeep => "too_deep",
            SkipReason::NotRegularFile => "not_regular_file",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

#[cfg(test)]
mod tests {
    use super::SkipReason;
    use std::collections::BTreeSet;

    #[test]
    fn every_reason_has_a_distinct_snake_case_label() {
        let labels: BTreeSet<&str> = SkipReason::ALL.iter().map(|r| r.as_label()).collect();
        assert_eq!(labels.len(), SkipReason::ALL.len());
        for label in labels {
            assert!(
                label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{label}"
            );
        }
    }

    #[test]
    fn all_lists_every_variant() {
        // Adding a variant breaks this match; add it to ALL too.
        let position = |r: SkipReason| match r {
            SkipReason::Malformed => 0,
            SkipReason::UnsupportedKind => 1,
            SkipReason::UnsupportedProtocol => 2,
            SkipReason::UnsupportedType => 3,
            SkipReason::InvalidAddress => 4,
            SkipReason::InvalidPort => 5,
            SkipReason::Duplicate => 6,
            SkipReason::Unreadable => 7,
            SkipReason::InvalidAnnotation => 8,
            SkipReason::InvalidName => 9,
            SkipReason::TooLarge => 10,
            SkipReason::TooDeep => 11,
            SkipReason::NotRegularFile => 12,
        };
        for (i, r) in SkipReason::ALL.iter().enumerate() {
            assert_eq!(position(*r), i);
        }
    }
}
