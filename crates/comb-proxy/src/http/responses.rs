//! Replies the proxy makes itself (Envoy's wording, so clients and dashboards read them the
//! same): RBAC denial, upstream failure, limits.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{Recorder, ResponseBody};

pub const RBAC_DENIED: &str = "RBAC: access denied";

fn text(status: StatusCode, body: Bytes, mut rec: Option<Box<Recorder>>) -> Response<ResponseBody> {
    if let Some(r) = rec.as_mut() {
        r.record.response_code = status.as_u16();
    }
    let mut resp = Response::new(ResponseBody::full(body, rec));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// 403 `RBAC: access denied`, or for gRPC a trailers-only HTTP 200 with `grpc-status: 7`
/// (PERMISSION_DENIED): gRPC clients read the status, not the HTTP code.
pub fn denied(grpc: bool, mut rec: Option<Box<Recorder>>) -> Response<ResponseBody> {
    if !grpc {
        return text(
            StatusCode::FORBIDDEN,
            Bytes::from_static(RBAC_DENIED.as_bytes()),
            rec,
        );
    }
    if let Some(r) = rec.as_mut() {
        r.record.response_code = 200;
        r.record.grpc_status = Some(7);
    }
    let mut resp = Response::new(ResponseBody::full(Bytes::new(), rec));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    h.insert("grpc-message", HeaderValue::from_static(RBAC_DENIED));
    resp
}

/// 503 after an upstream failure before response headers; `reason` like Envoy's reset
/// reasons ("connection failure", "connection timeout", "connection termination").
pub fn upstream_failure(reason: &str, rec: Option<Box<Recorder>>) -> Response<ResponseBody> {
    let body = format!(
        "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    );
    text(StatusCode::SERVICE_UNAVAILABLE, Bytes::from(body), rec)
}

pub fn status(
    status: StatusCode,
    body: &'static str,
    rec: Option<Box<Recorder>>,
) -> Response<ResponseBody> {
    text(status, Bytes::from_static(body.as_bytes()), rec)
}
