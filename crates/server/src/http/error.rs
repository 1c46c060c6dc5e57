//! Errors of the HTTP API as JSON, with the HTTP status and the gRPC code the gRPC API answers
//! the same failure with (docs/http.md).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tonic::Code;

/// An HTTP API error: `{"error": {"message", "type", "code", "param"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// The gRPC code name (`INVALID_ARGUMENT`, `UNAUTHENTICATED`, ...).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// INVALID_ARGUMENT (400) on `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "INVALID_ARGUMENT",
            message: message.into(),
            param: Some(param),
        }
    }

    /// NOT_FOUND (404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "NOT_FOUND",
            message: message.into(),
            param: None,
        }
    }

    /// The body of the error (also sent as an SSE `error` event).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind(self.status),
                "code": self.code,
                "param": self.param,
            }
        })
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let (status, code) = http_status(s.code());
        Self {
            status,
            code,
            message: s.message().to_string(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// The HTTP status of a gRPC code (the mapping of Google's HTTP/gRPC transcoding) and its name.
pub fn http_status(code: Code) -> (StatusCode, &'static str) {
    use StatusCode as H;
    match code {
        Code::Ok => (H::OK, "OK"),
        Code::Cancelled => (H::REQUEST_TIMEOUT, "CANCELLED"),
        Code::Unknown => (H::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        Code::InvalidArgument => (H::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::DeadlineExceeded => (H::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
        Code::NotFound => (H::NOT_FOUND, "NOT_FOUND"),
        Code::AlreadyExists => (H::CONFLICT, "ALREADY_EXISTS"),
        Code::PermissionDenied => (H::FORBIDDEN, "PERMISSION_DENIED"),
        Code::ResourceExhausted => (H::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        Code::FailedPrecondition => (H::BAD_REQUEST, "FAILED_PRECONDITION"),
        Code::Aborted => (H::CONFLICT, "ABORTED"),
        Code::OutOfRange => (H::BAD_REQUEST, "OUT_OF_RANGE"),
        Code::Unimplemented => (H::NOT_IMPLEMENTED, "UNIMPLEMENTED"),
        Code::Internal => (H::INTERNAL_SERVER_ERROR, "INTERNAL"),
        Code::Unavailable => (H::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::DataLoss => (H::INTERNAL_SERVER_ERROR, "DATA_LOSS"),
        Code::Unauthenticated => (H::UNAUTHORIZED, "UNAUTHENTICATED"),
    }
}

/// The OpenAI-style error `type` of an HTTP status.
fn kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grpc_code_has_a_distinct_name_and_an_error_status() {
        let codes = (1..=16).map(Code::from_i32).collect::<Vec<_>>();
        let names: std::collections::HashSet<_> = codes.iter().map(|&c| http_status(c).1).collect();
        assert_eq!(names.len(), 16);
        for c in codes {
            let (s, name) = http_status(c);
            assert!(s.is_client_error() || s.is_server_error(), "{name} -> {s}");
        }
        assert_eq!(
            http_status(Code::Unauthenticated).0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            http_status(Code::ResourceExhausted).0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn a_status_becomes_a_json_error_with_its_code() {
        let e = ApiError::from(tonic::Status::invalid_argument("bad method"));
        let b = e.body();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(b["error"]["code"], "INVALID_ARGUMENT");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["message"], "bad method");
    }
}
