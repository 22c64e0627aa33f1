//! Body plumbing between hyper and h3: a bounded channel body, and pumps
//! that move frames from an h3 stream into it or from a hyper body onto an h3
//! stream. Bodies stream: at most [`CHANNEL_FRAMES`] frames are buffered.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

/// Frames in flight between the two sides of a proxied body. Small, so a slow
/// reader pushes back on the writer (QUIC flow control does the rest).
pub const CHANNEL_FRAMES: usize = 8;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body fed by a channel; an `Err` item aborts the body.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl ChannelBody {
    pub fn new() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Self) {
        let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
        (tx, ChannelBody { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// Run a pump now if it can finish without waiting; otherwise hand it to
/// a task of its own. Small bodies are usually in hand already (a GET's
/// empty body, a 1 KiB response in the packet with its head), and then this
/// saves a task, its scheduling and a wake-up per body. The first poll uses
/// a no-op waker: a spawned task is polled again at once, with its own.
pub fn run_or_spawn<F>(fut: F) -> Option<tokio::task::JoinHandle<()>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(()) => None,
        Poll::Pending => Some(tokio::spawn(fut)),
    }
}

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn boxed(body: ChannelBody) -> ProxyBody {
    body.boxed_unsync()
}

/// A body that adds the length of each data frame to a counter as it
/// passes (`weft_request_bytes_total`, `weft_response_bytes_total`): one
/// atomic add per frame, nothing buffered.
pub struct Counted {
    inner: ProxyBody,
    counter: prometheus_client::metrics::counter::Counter,
}

/// `body`, counting its data bytes into `counter`.
pub fn counted(
    body: ProxyBody,
    counter: prometheus_client::metrics::counter::Counter,
) -> ProxyBody {
    Counted {
        inner: body,
        counter,
    }
    .boxed_unsync()
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.len() as u64);
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a pump stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("reading the HTTP/3 stream: {0}")]
    H3(#[from] h3::error::StreamError),
    #[error("reading the body: {0}")]
    Body(BoxError),
    #[error("the receiver went away")]
    Closed,
}

/// Something body frames can be read from: the receive half of an h3
/// request stream, client or server side.
pub trait H3Source {
    fn recv_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, h3::error::StreamError>> + Send;
    fn recv_trailers(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<http::HeaderMap>, h3::error::StreamError>> + Send;
}

impl<S: h3::quic::RecvStream + Send> H3Source for h3::server::RequestStream<S, Bytes> {
    async fn recv_chunk(&mut self) -> Result<Option<Bytes>, h3::error::StreamError> {
        Ok(self
            .recv_data()
            .await?
            .map(|mut b| b.copy_to_bytes(b.remaining())))
    }
    async fn recv_trailers(&mut self) -> Result<Option<http::HeaderMap>, h3::error::StreamError> {
        h3::server::RequestStream::recv_trailers(self).await
    }
}

impl<S: h3::quic::RecvStream + Send> H3Source for h3::client::RequestStream<S, Bytes> {
    async fn recv_chunk(&mut self) -> Result<Option<Bytes>, h3::error::StreamError> {
        Ok(self
            .recv_data()
            .await?
            .map(|mut b| b.copy_to_bytes(b.remaining())))
    }
    async fn recv_trailers(&mut self) -> Result<Option<http::HeaderMap>, h3::error::StreamError> {
        h3::client::RequestStream::recv_trailers(self).await
    }
}

/// Move data and trailers from an h3 receive stream into `tx`. Returns the
/// number of body bytes moved. On error the body receives an error item, so
/// the far side sees an aborted body, not a truncated one.
pub async fn h3_to_channel<R: H3Source>(
    mut recv: R,
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
) -> Result<u64, PumpError> {
    let result = async {
        let mut n = 0u64;
        while let Some(bytes) = recv.recv_chunk().await? {
            n += bytes.len() as u64;
            tx.send(Ok(Frame::data(bytes)))
                .await
                .map_err(|_| PumpError::Closed)?;
        }
        if let Some(trailers) = recv.recv_trailers().await? {
            tx.send(Ok(Frame::trailers(trailers)))
                .await
                .map_err(|_| PumpError::Closed)?;
        }
        Ok::<u64, PumpError>(n)
    }
    .await;
    if let Err(e) = &result {
        let _ = tx.send(Err(e.to_string().into())).await;
    }
    result
}

/// Something that can take body frames: the send half of an h3 request
/// stream, client or server side.
pub trait H3Sink {
    fn send_data(
        &mut self,
        b: Bytes,
    ) -> impl std::future::Future<Output = Result<(), h3::error::StreamError>> + Send;
    fn send_trailers(
        &mut self,
        t: http::HeaderMap,
    ) -> impl std::future::Future<Output = Result<(), h3::error::StreamError>> + Send;
    fn finish(
        &mut self,
    ) -> impl std::future::Future<Output = Result<(), h3::error::StreamError>> + Send;
    /// Abort the stream (RESET_STREAM with H3_REQUEST_CANCELLED).
    fn cancel(&mut self);
}

impl<S: h3::quic::SendStream<Bytes> + Send> H3Sink for h3::server::RequestStream<S, Bytes> {
    async fn send_data(&mut self, b: Bytes) -> Result<(), h3::error::StreamError> {
        h3::server::RequestStream::send_data(self, b).await
    }
    async fn send_trailers(&mut self, t: http::HeaderMap) -> Result<(), h3::error::StreamError> {
        h3::server::RequestStream::send_trailers(self, t).await
    }
    async fn finish(&mut self) -> Result<(), h3::error::StreamError> {
        h3::server::RequestStream::finish(self).await
    }
    fn cancel(&mut self) {
        self.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    }
}

impl<S: h3::quic::SendStream<Bytes> + Send> H3Sink for h3::client::RequestStream<S, Bytes> {
    async fn send_data(&mut self, b: Bytes) -> Result<(), h3::error::StreamError> {
        h3::client::RequestStream::send_data(self, b).await
    }
    async fn send_trailers(&mut self, t: http::HeaderMap) -> Result<(), h3::error::StreamError> {
        h3::client::RequestStream::send_trailers(self, t).await
    }
    async fn finish(&mut self) -> Result<(), h3::error::StreamError> {
        h3::client::RequestStream::finish(self).await
    }
    fn cancel(&mut self) {
        self.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    }
}

/// Move a hyper body onto an h3 send stream, then finish it. If the body
/// fails, the stream is reset so the peer sees an abort, not a short body.
pub async fn body_to_h3<B, K>(mut body: B, sink: &mut K) -> Result<u64, PumpError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    K: H3Sink,
{
    let mut n = 0u64;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                sink.cancel();
                return Err(PumpError::Body(e.into()));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    n += data.len() as u64;
                    sink.send_data(data).await?;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        sink.send_trailers(trailers).await?;
                        break;
                    }
                }
            },
        }
    }
    sink.finish().await?;
    Ok(n)
}
