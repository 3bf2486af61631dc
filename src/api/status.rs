//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::index::IndexError;
use crate::ingest::IngestError;
use crate::query::QueryError;
use crate::sink::SinkError;

/// Why a request failed, as the API reports it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed; `field` names the offending field path.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// `field` names the request field that held the unknown id.
    #[error("{field}: {what} {id:?} not found")]
    NotFound {
        field: String,
        what: &'static str,
        id: String,
    },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Query(#[from] QueryError),
    /// No valid token, or one outside its scope or namespaces.
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("internal task failed: {0}")]
    Task(String),
    /// A write sent to a reader (`mboxd serve --reader`).
    #[error(
        "{rpc}: this mboxd is a reader (serve --reader): it serves every daemon's data \
         from the shared storage root and accepts no writes; send writes to a writer \
         (the sidecar or standalone mboxd)"
    )]
    ReadOnly { rpc: &'static str },
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn experiment_not_found(field: &str, id: &str) -> Self {
        Self::NotFound {
            field: field.to_owned(),
            what: "experiment",
            id: id.to_owned(),
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        ApiError::Auth(err).into()
    }
}

/// RESOURCE_EXHAUSTED with gRPC's retry pushback (proposal A6), which gRPC clients
/// that retry, and the SDK, honour.
pub fn retry_later(message: String, retry_after: std::time::Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    if let Ok(v) = retry_after.as_millis().to_string().parse() {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            ApiError::Auth(e) if e.is_unauthenticated() => Status::unauthenticated(e.to_string()),
            ApiError::Auth(e) => Status::permission_denied(e.to_string()),
            ApiError::NotFound { .. } => Status::not_found(err.to_string()),
            ApiError::ReadOnly { .. } => Status::failed_precondition(err.to_string()),
            ApiError::Index(IndexError::ExperimentNotFound(id)) => {
                Status::not_found(format!("parent_id: experiment {id:?} not found"))
            }
            // Not durable yet: a retry finds the experiment (answered as existing)
            // once the next checkpoint has made it durable.
            ApiError::Index(IndexError::Journal { ref source, .. })
                if source.kind() == std::io::ErrorKind::StorageFull =>
            {
                Status::resource_exhausted(format!("data folder is full: {err}"))
            }
            ApiError::Index(IndexError::Journal { .. }) => {
                Status::unavailable(format!("storage is failing: {err}"))
            }
            ApiError::Ingest(IngestError::Full { retry_after, .. }) => {
                retry_later(err.to_string(), retry_after)
            }
            ApiError::Ingest(IngestError::TooLarge { .. }) => {
                Status::resource_exhausted(err.to_string())
            }
            ApiError::Ingest(IngestError::ShuttingDown) => Status::unavailable(err.to_string()),
            // Storage trouble is retryable: nothing of the request was accepted.
            ApiError::Ingest(IngestError::Wal(e)) if e.is_out_of_space() => {
                Status::resource_exhausted(format!("data folder is full: {e}"))
            }
            ApiError::Ingest(IngestError::Wal(e)) => {
                Status::unavailable(format!("storage is failing: {e}"))
            }
            ApiError::Query(QueryError::Token(reason)) => {
                Status::invalid_argument(format!("page_token: {reason}"))
            }
            // A file already uploaded cannot be fetched: the store is unreachable.
            ApiError::Query(QueryError::Open(SinkError::Remote { .. })) => {
                Status::unavailable(format!("reading from the remote store failed: {err}"))
            }
            ApiError::Ingest(_) | ApiError::Index(_) | ApiError::Query(_) | ApiError::Task(_) => {
                // Details go to the log, not to the client.
                tracing::error!(error = %err, "request failed");
                Status::new(Code::Internal, "internal error; see the mboxd log")
            }
        }
    }
}
