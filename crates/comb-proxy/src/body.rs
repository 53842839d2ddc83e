//! Streaming bodies with accounting: the request body forwarded upstream (counted, size
//! limited) and the response body sent downstream (counted, gRPC status from trailers, the
//! request's telemetry record emitted when it ends or is dropped).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::conn_clock::RequestGuard;
use crate::telemetry::{RequestRecord, ResponseFlags, Telemetry};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the request body tells the response side: bytes read, and whether it hit the limit.
#[derive(Default)]
pub struct RequestProgress {
    pub bytes: AtomicU64,
    pub too_large: AtomicBool,
}

/// The downstream request body on its way upstream.
pub struct RequestBody {
    inner: Incoming,
    /// A frame read before the request went upstream (`Expect: 100-continue`), sent first.
    first: Option<Frame<Bytes>>,
    progress: Arc<RequestProgress>,
    seen: u64,
    limit: u64,
}

impl RequestBody {
    pub fn new(inner: Incoming, progress: Arc<RequestProgress>, limit: u64) -> Self {
        Self {
            inner,
            first: None,
            progress,
            seen: 0,
            limit,
        }
    }

    /// `new` with a frame already read from `inner`, which goes out first.
    pub fn with_first(
        inner: Incoming,
        first: Option<Frame<Bytes>>,
        progress: Arc<RequestProgress>,
        limit: u64,
    ) -> Self {
        Self {
            first,
            ..Self::new(inner, progress, limit)
        }
    }
}

#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than the limit")
    }
}

impl std::error::Error for BodyTooLarge {}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match self.first.take() {
            Some(f) => Poll::Ready(Some(Ok(f))),
            None => Pin::new(&mut self.inner).poll_frame(cx),
        };
        let frame = match polled {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            self.seen += n;
            self.progress.bytes.fetch_add(n, Ordering::Relaxed);
            if self.seen > self.limit {
                self.progress.too_large.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.inner.size_hint();
        if let Some(n) = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
        {
            h = match h.exact() {
                Some(rest) => SizeHint::with_exact(rest + n),
                None => {
                    let mut g = SizeHint::new();
                    g.set_lower(h.lower() + n);
                    if let Some(u) = h.upper() {
                        g.set_upper(u + n);
                    }
                    g
                }
            };
        }
        h
    }
}

/// The request's telemetry, completed as the response goes out and emitted on drop.
pub struct Recorder {
    pub record: RequestRecord,
    pub t0: Instant,
    pub telemetry: Arc<Telemetry>,
    pub progress: Arc<RequestProgress>,
    ended: Option<Instant>,
}

impl Recorder {
    pub fn new(
        record: RequestRecord,
        t0: Instant,
        telemetry: Arc<Telemetry>,
        progress: Arc<RequestProgress>,
    ) -> Self {
        Self {
            record,
            t0,
            telemetry,
            progress,
            ended: None,
        }
    }

    pub fn flag(&mut self, flag: u32) {
        self.record.response_flags.0 |= flag;
    }

    /// gRPC status of a trailers-only response or of the trailers.
    pub fn grpc_status_from(&mut self, headers: &HeaderMap) {
        if let Some(s) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
        {
            self.record.grpc_status = Some(s);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let end = match self.ended {
            Some(t) => t,
            None => {
                // The body did not finish: downstream went away (or the stream was reset).
                if self.record.response_code != 0 {
                    self.flag(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
                }
                Instant::now()
            }
        };
        self.record.duration = end - self.t0;
        self.record.request_bytes = self.progress.bytes.load(Ordering::Relaxed);
        self.telemetry.record_request(&self.record);
    }
}

enum Kind {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// The body the proxy answers with: the upstream's, streamed, or a local reply.
pub struct ResponseBody {
    kind: Kind,
    rec: Option<Box<Recorder>>,
    /// Keeps the request counted as in flight on its connection until the body is done.
    _request: Option<RequestGuard>,
}

impl ResponseBody {
    pub fn upstream(body: Incoming, rec: Option<Box<Recorder>>) -> Self {
        let mut b = Self {
            kind: Kind::Upstream(body),
            rec,
            _request: None,
        };
        b.mark_if_ended();
        b
    }

    pub fn full(bytes: Bytes, rec: Option<Box<Recorder>>) -> Self {
        let mut b = Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            rec,
            _request: None,
        };
        if let Some(r) = b.rec.as_mut()
            && let Kind::Full(Some(d)) = &b.kind
        {
            r.record.response_bytes = d.len() as u64;
        }
        b.mark_if_ended();
        b
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new(), None)
    }

    /// Holds `g` (the request in flight on its connection) until this body is dropped.
    pub(crate) fn hold(mut self, g: RequestGuard) -> Self {
        self._request = Some(g);
        self
    }

    pub fn recorder(&mut self) -> Option<&mut Recorder> {
        self.rec.as_deref_mut()
    }

    /// hyper does not poll a body that says it has ended (HEAD, 204, local empty replies).
    fn mark_if_ended(&mut self) {
        if self.is_end_stream()
            && let Some(r) = self.rec.as_mut()
            && r.ended.is_none()
        {
            r.ended = Some(Instant::now());
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Full(data) => {
                let out = data.take().map(|d| Ok(Frame::data(d)));
                this.mark_if_ended();
                Poll::Ready(out)
            }
            Kind::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx);
                match polled {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(r) = this.rec.as_deref_mut() {
                            if let Some(d) = frame.data_ref() {
                                r.record.response_bytes += d.len() as u64;
                            } else if let Some(t) = frame.trailers_ref() {
                                r.grpc_status_from(t);
                            }
                        }
                        this.mark_if_ended();
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        if let Some(r) = this.rec.as_deref_mut() {
                            r.flag(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
                            r.ended = Some(Instant::now());
                        }
                        Poll::Ready(Some(Err(e.into())))
                    }
                    Poll::Ready(None) => {
                        if let Some(r) = this.rec.as_deref_mut()
                            && r.ended.is_none()
                        {
                            r.ended = Some(Instant::now());
                        }
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(d) => d.is_none(),
            Kind::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Upstream(b) => b.size_hint(),
        }
    }
}
