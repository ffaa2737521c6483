//! How one call ended, as every kind of target reports it. A module of its own because both
//! `target` and `http1` produce it, and neither should import the other for it.

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The kind of failure, as reports count it.
    Failed(String),
}
