//! Recommend's own errors and the gRPC status each becomes. (Refusals made before a call
//! reaches Recommend are made where they are decided: `authz`, `edge`, `call_layer`.)

use tonic::{Code, Status};

/// Everything a `Recommend` call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A request field is out of its range; the message names the field.
    #[error("{field} {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The category is unknown or has no books (the original's wording).
    #[error("Category not found")]
    CategoryNotFound,
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::CategoryNotFound => Code::NotFound,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_grpc_codes_and_messages() {
        let s = Status::from(Error::CategoryNotFound);
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "Category not found")
        );
        let s = Status::from(Error::InvalidArgument {
            field: "max_results",
            reason: "must be between 0 and 1000, got -1".into(),
        });
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::InvalidArgument,
                "max_results must be between 0 and 1000, got -1"
            )
        );
    }
}
