//! Copy bytes both ways between a TCP connection and a QUIC stream,
//! preserving half-close: EOF on one side becomes FIN on the other, and the
//! other direction keeps flowing until it ends too. An error in either
//! direction aborts both: the QUIC stream is reset and the TCP connection
//! gets an RST, so neither side mistakes an abort for a clean end.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest read per system call / QUIC chunk. 64 KiB matches what GSO can
/// send in one batch and keeps per-connection memory small.
const CHUNK: usize = 64 << 10;

/// What a copy did.
#[derive(Debug, Default)]
pub struct CopyResult {
    /// Bytes read from TCP and sent on the QUIC stream.
    pub to_peer: u64,
    /// Bytes received on the QUIC stream and written to TCP.
    pub from_peer: u64,
    pub error: Option<String>,
}

/// Copy until both directions end. With `idle`, a stream that moves no byte
/// either way for that long is aborted like an error (RST and reset).
pub async fn bidi(
    tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    idle: Option<Duration>,
) -> CopyResult {
    let (mut tr, mut tw) = tcp.into_split();
    let mut to_peer = 0u64;
    let mut from_peer = 0u64;
    // Milliseconds from `start` to the last byte either way.
    let start = tokio::time::Instant::now();
    let last_activity = std::sync::atomic::AtomicU64::new(0);
    let touch = || last_activity.store(start.elapsed().as_millis() as u64, Relaxed);
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tr.read(&mut buf).await?;
            if n == 0 {
                send.finish().map_err(std::io::Error::other)?;
                return Ok::<_, std::io::Error>(());
            }
            touch();
            send.write_all(&buf[..n])
                .await
                .map_err(std::io::Error::from)?;
            to_peer += n as u64;
        }
    };
    let down = async {
        // Gather what has arrived into one buffer and write it with one
        // system call: a QUIC stream hands its data over by packet (about
        // 1.2 KB each), and a TCP write per packet made the receiving
        // sidecar the bottleneck of a bulk transfer.
        let mut buf = vec![0u8; CHUNK];
        while let Some(n) = recv.read(&mut buf).await.map_err(std::io::Error::from)? {
            touch();
            tw.write_all(&buf[..n]).await?;
            from_peer += n as u64;
        }
        tw.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let watchdog = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let due = start + Duration::from_millis(last_activity.load(Relaxed)) + idle;
            if tokio::time::Instant::now() >= due {
                return std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("idle for {}", humantime::format_duration(idle)),
                );
            }
            tokio::time::sleep_until(due).await;
        }
    };
    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r,
        e = watchdog => Err(e),
    };
    let error = match result {
        Ok(_) => None,
        Err(e) => {
            let _ = send.reset(0u32.into());
            let _ = recv.stop(0u32.into());
            if let Ok(tcp) = tr.reunite(tw) {
                reset(tcp);
            }
            Some(e.to_string())
        }
    };
    CopyResult {
        to_peer,
        from_peer,
        error,
    }
}

/// Close a TCP connection with an RST rather than a FIN.
pub fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}
