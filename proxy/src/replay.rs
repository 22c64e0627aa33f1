//! A request body that can be sent more than once (for retries) and copied
//! (for mirrors) while it still streams: the first reader pulls frames from
//! the app's body, forwards them at once and keeps a copy, up to a limit.
//! A retry starts a new reader from the first byte; a mirror is a
//! *follower* that only reads what the primary has already pulled, so a slow
//! mirror never holds the primary back. Past the limit the copy is dropped:
//! the request can no longer be replayed, and readers that lag behind get
//! an error (the same trade linkerd2-proxy's `ReplayBody` makes).
//!
//! Streaming matters: buffering a whole body before sending it would stall
//! a client that waits for the server between messages (gRPC streams).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::{BoxError, ProxyBody};

/// Frames kept for replay; `Err` once the copy was dropped (too big).
struct Shared {
    source: Option<ProxyBody>,
    chunks: Vec<Bytes>,
    /// Data frames pulled from the source (= `chunks.len()` until overflow).
    pulled: usize,
    buffered: usize,
    limit: usize,
    /// The copy was dropped: only the reader at the head may go on.
    overflowed: bool,
    trailers: Option<http::HeaderMap>,
    /// The source ended (cleanly, or with `error`).
    ended: bool,
    error: Option<String>,
    /// Followers waiting for the primary to pull more.
    waiting: Vec<Waker>,
}

/// One reader of a replayable body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Index of the next chunk this reader yields.
    pos: usize,
    trailers_done: bool,
    /// Followers never poll the source themselves.
    follower: bool,
}

impl ReplayBody {
    /// Wrap `body`, keeping up to `limit` bytes for replay.
    pub fn new(body: ProxyBody, limit: usize) -> ReplayBody {
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(body),
                chunks: Vec::new(),
                pulled: 0,
                buffered: 0,
                limit,
                overflowed: false,
                trailers: None,
                ended: false,
                error: None,
                waiting: Vec::new(),
            })),
            pos: 0,
            trailers_done: false,
            follower: false,
        }
    }

    /// A new reader from the first byte, or `None` if the body grew past the
    /// limit and its start is gone.
    pub fn replay(&self) -> Option<ReplayBody> {
        let s = lock(&self.shared);
        (!s.overflowed).then(|| ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_done: false,
            follower: false,
        })
    }

    /// A reader that follows the others (for a mirror); `None` past the limit.
    pub fn follower(&self) -> Option<ReplayBody> {
        self.replay().map(|mut r| {
            r.follower = true;
            r
        })
    }

    /// Whether the body can still be replayed from its start.
    pub fn replayable(&self) -> bool {
        !lock(&self.shared).overflowed
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        // A dropped reader may have been the one whose waker the source
        // holds; let the others poll again so nobody waits forever.
        let waiting = std::mem::take(&mut lock(&self.shared).waiting);
        waiting.into_iter().for_each(Waker::wake);
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = lock(&this.shared);
        // 1. Replay what is kept.
        if this.pos < s.pulled {
            if s.overflowed {
                return Poll::Ready(Some(Err("request body too large to replay".into())));
            }
            let chunk = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        // 2. At the end of what is kept: the source's end, or more from it.
        if s.ended {
            if let Some(e) = &s.error {
                return Poll::Ready(Some(Err(e.clone().into())));
            }
            if !this.trailers_done {
                this.trailers_done = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        if this.follower {
            s.waiting.push(cx.waker().clone());
            return Poll::Pending;
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        match polled {
            Poll::Pending => {
                // Followers are woken when this reader makes progress.
                Poll::Pending
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                this.trailers_done = true;
                wake_all(&mut s);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.ended = true;
                s.source = None;
                s.error = Some(e.to_string());
                wake_all(&mut s);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        s.buffered += data.len();
                        s.pulled += 1;
                        if s.overflowed || s.buffered > s.limit {
                            // Drop the copy; the head reader goes on.
                            s.overflowed = true;
                            s.chunks = Vec::new();
                        } else {
                            s.chunks.push(data.clone());
                        }
                        this.pos = s.pulled;
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            s.trailers = Some(t.clone());
                            s.ended = true;
                            s.source = None;
                            this.trailers_done = true;
                        }
                        frame
                    }
                };
                wake_all(&mut s);
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.ended && self.pos >= s.pulled && (self.trailers_done || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        match &s.source {
            Some(src) if self.pos >= s.pulled => src.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

fn wake_all(s: &mut Shared) {
    s.waiting.drain(..).for_each(Waker::wake);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::ChannelBody;
    use http_body_util::BodyExt;

    async fn collect(b: ReplayBody) -> Result<(Vec<u8>, Option<http::HeaderMap>), BoxError> {
        let c = b.collect().await?;
        let trailers = c.trailers().cloned();
        Ok((c.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn replays_the_whole_body_with_trailers() {
        let (tx, body) = ChannelBody::new();
        let first = ReplayBody::new(crate::body::boxed(body), 1024);
        tx.send(Ok(Frame::data(Bytes::from("hello "))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from("world"))))
            .await
            .unwrap();
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(Frame::trailers(t))).await.unwrap();
        drop(tx);
        let second = first.replay().unwrap();
        let (b1, t1) = collect(first).await.unwrap();
        assert_eq!(b1, b"hello world");
        assert_eq!(t1.unwrap()["grpc-status"], "0");
        let third = second.replay().unwrap();
        let (b2, t2) = collect(second).await.unwrap();
        assert_eq!(b2, b"hello world");
        assert!(t2.is_some());
        assert_eq!(collect(third).await.unwrap().0, b"hello world");
    }

    #[tokio::test]
    async fn streams_before_the_body_ends() {
        let (tx, body) = ChannelBody::new();
        let mut first = ReplayBody::new(crate::body::boxed(body), 1024);
        tx.send(Ok(Frame::data(Bytes::from("ping")))).await.unwrap();
        // The first frame is readable while the sender is still open.
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ping");
        let mut follower = first.follower().unwrap();
        assert_eq!(
            follower
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            "ping"
        );
        // The follower waits for the primary instead of reading the source.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), follower.frame()).await;
        assert!(
            pending.is_err(),
            "a follower must not read ahead of the primary"
        );
        tx.send(Ok(Frame::data(Bytes::from("pong")))).await.unwrap();
        drop(tx);
        let (rest, _) = collect(first).await.unwrap();
        assert_eq!(rest, b"pong");
        assert_eq!(collect(follower).await.unwrap().0, b"pong");
    }

    #[tokio::test]
    async fn past_the_limit_it_streams_but_cannot_replay() {
        let (tx, body) = ChannelBody::new();
        let first = ReplayBody::new(crate::body::boxed(body), 8);
        let early = first.replay().unwrap();
        tokio::spawn(async move {
            for _ in 0..4 {
                tx.send(Ok(Frame::data(Bytes::from("12345"))))
                    .await
                    .unwrap();
            }
        });
        let (all, _) = collect(first).await.unwrap();
        assert_eq!(all.len(), 20, "the head reader gets every byte");
        assert!(!early.replayable());
        assert!(early.replay().is_none());
        assert!(
            collect(early).await.is_err(),
            "a lagging reader errors, never truncates"
        );
    }

    #[tokio::test]
    async fn source_error_reaches_every_reader() {
        let (tx, body) = ChannelBody::new();
        let first = ReplayBody::new(crate::body::boxed(body), 1024);
        let second = first.replay().unwrap();
        tx.send(Err("boom".into())).await.unwrap();
        assert!(collect(first).await.is_err());
        assert!(collect(second).await.is_err());
    }
}
