//! A UDP impairment relay: listens on one UDP address and forwards every
//! datagram to a target, impairing each direction on its own — drop a share
//! of datagrams, delay them (fixed plus uniform jitter), reorder some (held
//! back so later ones overtake them) and duplicate some — with a seeded
//! random generator, so a run is reproducible for a given packet sequence.
//! `tc netem` is not available on the build machine; this stands in for it
//! between two sidecars: point the client's mesh file at the relay instead of
//! the server sidecar.
//!
//! NAT-like: each client address gets its own upstream socket (connected to
//! the target), so replies go back to the right client, and a client whose
//! address changes (QUIC connection migration) shows up as a new flow — the
//! target sees a new source address too. [`Relay::flows`] lists them.
//!
//! Impairments change at run time ([`Relay::set`]): 100 % drop both ways
//! blackholes the target (a dead peer that sends nothing back).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What happens to the datagrams of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Share of datagrams dropped, 0.0..=100.0.
    pub drop_percent: f64,
    /// Every datagram waits this long (one way).
    pub delay: Duration,
    /// Plus a uniform random 0..jitter. Order is kept: a datagram never
    /// leaves before the one ahead of it (as netem with a FIFO would);
    /// reordering is asked for separately.
    pub jitter: Duration,
    /// Share of datagrams (0.0..=100.0) held back by `reorder_gap` more, so
    /// the ones after them overtake them.
    pub reorder_percent: f64,
    /// How long a reordered datagram is held back (default 5 ms when zero).
    pub reorder_gap: Duration,
    /// Share of datagrams (0.0..=100.0) sent twice.
    pub duplicate_percent: f64,
}

impl Impairment {
    /// Nothing impaired.
    pub fn none() -> Self {
        Impairment::default()
    }

    /// Drop `percent` of datagrams, nothing else.
    pub fn loss(percent: f64) -> Self {
        Impairment {
            drop_percent: percent,
            ..Default::default()
        }
    }

    /// Everything dropped: the other side looks dead.
    pub fn blackhole() -> Self {
        Impairment::loss(100.0)
    }

    fn is_none(&self) -> bool {
        self.drop_percent <= 0.0
            && self.delay.is_zero()
            && self.jitter.is_zero()
            && self.reorder_percent <= 0.0
            && self.duplicate_percent <= 0.0
    }
}

/// Which way a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → target.
    Up,
    /// Target → client.
    Down,
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received from the sender.
    pub received: AtomicU64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Datagrams held back so later ones overtook them.
    pub reordered: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub received: u64,
    pub forwarded: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl Counters {
    pub fn snapshot(&self) -> Count {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Count {
            received: g(&self.received),
            forwarded: g(&self.forwarded),
            dropped: g(&self.dropped),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
        }
    }
}

/// How to start a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub up: Impairment,
    pub down: Impairment,
    /// Seeds the generators (one per direction) that decide drops, delays,
    /// reorders and duplicates.
    pub seed: u64,
}

impl RelayConfig {
    /// A relay on an ephemeral loopback port with no impairment.
    pub fn new(target: SocketAddr) -> Self {
        let listen = if target.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        RelayConfig {
            listen: listen.parse().expect("literal address"),
            target,
            up: Impairment::none(),
            down: Impairment::none(),
            seed: 1,
        }
    }

    /// The same impairment both ways.
    pub fn both(mut self, i: Impairment) -> Self {
        self.up = i;
        self.down = i;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// One direction's impairment and the generator that applies it.
struct Shaper {
    impairment: Impairment,
    rng: StdRng,
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fate {
    drop: bool,
    /// Copies to send (1, or 2 when duplicated).
    copies: u8,
    delay: Duration,
    /// Held back for `reorder_gap` beyond `delay`.
    reorder: bool,
}

impl Shaper {
    fn fate(&mut self) -> Fate {
        let i = self.impairment;
        let mut roll = |p: f64| p > 0.0 && self.rng.random_range(0.0..100.0) < p;
        let drop = roll(i.drop_percent);
        let duplicate = roll(i.duplicate_percent);
        let reorder = roll(i.reorder_percent);
        let jitter = if i.jitter.is_zero() {
            Duration::ZERO
        } else {
            i.jitter.mul_f64(self.rng.random_range(0.0..1.0))
        };
        Fate {
            drop,
            copies: if duplicate { 2 } else { 1 },
            delay: i.delay + jitter,
            reorder,
        }
    }
}

struct Dir {
    shaper: Mutex<Shaper>,
    counters: Counters,
}

impl Dir {
    fn new(impairment: Impairment, seed: u64) -> Self {
        Dir {
            shaper: Mutex::new(Shaper {
                impairment,
                rng: StdRng::seed_from_u64(seed),
            }),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shaper> {
        self.shaper.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a datagram goes once its time comes.
#[derive(Clone)]
enum Out {
    /// On the flow's upstream socket (connected to the target).
    Upstream(Arc<UdpSocket>),
    /// From the listening socket to the client.
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Out {
    async fn send(&self, data: &[u8]) {
        // A full socket buffer or an unreachable peer loses the datagram,
        // as the network would.
        let _ = match self {
            Out::Upstream(s) => s.send(data).await,
            Out::Client(s, to) => s.send_to(data, to).await,
        };
    }
}

/// One direction of one flow: applies fates and keeps order among the
/// datagrams that are not reordered.
struct Lane {
    dir: Arc<Dir>,
    out: Out,
    /// Delayed datagrams, in order, to the lane's sender task.
    queue: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    /// The latest departure queued, so jitter never reorders.
    last: Mutex<Instant>,
}

impl Lane {
    fn new(dir: Arc<Dir>, out: Out) -> (Arc<Lane>, JoinHandle<()>) {
        let (queue, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let sender = out.clone();
        let task = tokio::spawn(async move {
            while let Some((at, data)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                sender.send(&data).await;
            }
        });
        let lane = Arc::new(Lane {
            dir,
            out,
            queue,
            last: Mutex::new(Instant::now()),
        });
        (lane, task)
    }

    async fn pass(&self, data: &[u8]) {
        let c = &self.dir.counters;
        c.received.fetch_add(1, Ordering::Relaxed);
        let (fate, gap) = {
            let mut s = self.dir.lock();
            let gap = if s.impairment.reorder_gap.is_zero() {
                Duration::from_millis(5)
            } else {
                s.impairment.reorder_gap
            };
            let fate = if s.impairment.is_none() {
                None
            } else {
                Some(s.fate())
            };
            (fate, gap)
        };
        let Some(fate) = fate else {
            // Fast path: nothing to do but forward.
            c.forwarded.fetch_add(1, Ordering::Relaxed);
            self.out.send(data).await;
            return;
        };
        if fate.drop {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if fate.copies > 1 {
            c.duplicated
                .fetch_add(u64::from(fate.copies - 1), Ordering::Relaxed);
        }
        c.forwarded
            .fetch_add(u64::from(fate.copies), Ordering::Relaxed);
        let now = Instant::now();
        if fate.reorder {
            c.reordered.fetch_add(1, Ordering::Relaxed);
            let at = now + fate.delay + gap;
            let out = self.out.clone();
            let data = data.to_vec();
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                for _ in 0..fate.copies {
                    out.send(&data).await;
                }
            });
            return;
        }
        let at = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let at = (now + fate.delay).max(*last);
            *last = at;
            at
        };
        if at <= now {
            // Nothing is waiting ahead of it (loss or duplication only).
            for _ in 0..fate.copies {
                self.out.send(data).await;
            }
            return;
        }
        for _ in 0..fate.copies {
            let _ = self.queue.send((at, data.to_vec()));
        }
    }
}

struct Flow {
    up: Arc<Lane>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Shared {
    up: Arc<Dir>,
    down: Arc<Dir>,
    flows: Mutex<HashMap<SocketAddr, Flow>>,
    /// Client addresses in the order they first appeared.
    seen: Mutex<Vec<SocketAddr>>,
}

/// A running relay; dropping it stops it.
pub struct Relay {
    pub addr: SocketAddr,
    pub target: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// Socket buffers: the relay holds a whole congestion window in flight.
const BUFFER_BYTES: usize = 4 << 20;

fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(BUFFER_BYTES);
    let _ = s.set_send_buffer_size(BUFFER_BYTES);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

impl Relay {
    pub async fn start(cfg: RelayConfig) -> std::io::Result<Relay> {
        let socket = Arc::new(bind(cfg.listen)?);
        let addr = socket.local_addr()?;
        let shared = Arc::new(Shared {
            up: Arc::new(Dir::new(cfg.up, cfg.seed)),
            // A different stream of numbers for the other direction.
            down: Arc::new(Dir::new(cfg.down, cfg.seed ^ 0x9E37_79B9_7F4A_7C15)),
            flows: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(serve(socket, cfg.target, shared.clone()));
        Ok(Relay {
            addr,
            target: cfg.target,
            shared,
            task,
        })
    }

    /// Change one direction's impairment from now on.
    pub fn set(&self, dir: Direction, i: Impairment) {
        self.dir(dir).lock().impairment = i;
    }

    /// Change both directions' impairments.
    pub fn set_both(&self, i: Impairment) {
        self.set(Direction::Up, i);
        self.set(Direction::Down, i);
    }

    pub fn counts(&self, dir: Direction) -> Count {
        self.dir(dir).counters.snapshot()
    }

    /// Every client address seen so far, in order of first appearance.
    pub fn flows(&self) -> Vec<SocketAddr> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn dir(&self, dir: Direction) -> &Dir {
        match dir {
            Direction::Up => &self.shared.up,
            Direction::Down => &self.shared.down,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.shared
            .flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

async fn serve(socket: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors from earlier sends surface here on some kernels.
            Err(_) => continue,
        };
        let lane = match flow(&socket, target, &shared, from) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("impair relay: no upstream socket for {from}: {e}");
                continue;
            }
        };
        lane.pass(&buf[..n]).await;
    }
}

/// The client→target lane of `from`'s flow, made on its first datagram.
fn flow(
    socket: &Arc<UdpSocket>,
    target: SocketAddr,
    shared: &Arc<Shared>,
    from: SocketAddr,
) -> std::io::Result<Arc<Lane>> {
    let mut flows = shared.flows.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = flows.get(&from) {
        return Ok(f.up.clone());
    }
    let local: SocketAddr = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal address");
    let upstream = bind(local)?;
    let std = upstream.into_std()?;
    std.connect(target)?;
    let upstream = Arc::new(UdpSocket::from_std(std)?);
    let (up, up_task) = Lane::new(shared.up.clone(), Out::Upstream(upstream.clone()));
    let (down, down_task) = Lane::new(shared.down.clone(), Out::Client(socket.clone(), from));
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            match upstream.recv(&mut buf).await {
                Ok(n) => down.pass(&buf[..n]).await,
                // ECONNREFUSED (target not listening yet): keep waiting.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    flows.insert(
        from,
        Flow {
            up: up.clone(),
            tasks: vec![up_task, down_task, reader],
        },
    );
    shared
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(from);
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shaper(i: Impairment, seed: u64) -> Shaper {
        Shaper {
            impairment: i,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    #[test]
    fn drop_ratio_is_close_to_the_setting_and_reproducible() {
        let run = |seed| {
            let mut s = shaper(Impairment::loss(2.0), seed);
            (0..100_000).filter(|_| s.fate().drop).count()
        };
        let dropped = run(7);
        // 2 % of 100k = 2000; the binomial's sd is ~44: ±5 sd.
        assert!((1780..=2220).contains(&dropped), "dropped {dropped}");
        assert_eq!(run(7), dropped, "same seed, same drops");
        assert_ne!(run(8), dropped, "another seed, other drops");
    }

    #[test]
    fn no_impairment_never_drops_delays_or_duplicates() {
        let mut s = shaper(Impairment::none(), 1);
        for _ in 0..1000 {
            let f = s.fate();
            assert!(!f.drop && !f.reorder && f.copies == 1 && f.delay.is_zero());
        }
    }

    #[test]
    fn jitter_stays_within_delay_plus_jitter() {
        let i = Impairment {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(5),
            ..Default::default()
        };
        let mut s = shaper(i, 3);
        for _ in 0..1000 {
            let d = s.fate().delay;
            assert!(d >= Duration::from_millis(10) && d < Duration::from_millis(15));
        }
    }

    /// A receiver on loopback and a relay in front of it.
    async fn relay_to_sink(cfg: impl FnOnce(SocketAddr) -> RelayConfig) -> (Relay, UdpSocket) {
        // Large buffers: the test reads only after everything was sent.
        let sink = bind("127.0.0.1:0".parse().expect("addr")).expect("bind sink");
        let relay = Relay::start(cfg(sink.local_addr().expect("addr")))
            .await
            .expect("relay");
        (relay, sink)
    }

    async fn recv_seq(sink: &UdpSocket, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while out.len() < n {
            let got = tokio::time::timeout(Duration::from_secs(5), sink.recv(&mut buf)).await;
            match got {
                Ok(Ok(4)) => out.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])),
                Ok(_) => panic!("unexpected datagram"),
                Err(_) => break,
            }
        }
        out
    }

    #[tokio::test]
    async fn fixed_delay_is_applied_and_order_kept() {
        let delay = Duration::from_millis(50);
        let (relay, sink) = relay_to_sink(|t| {
            RelayConfig::new(t).both(Impairment {
                delay,
                jitter: Duration::from_millis(20),
                ..Default::default()
            })
        })
        .await;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let start = Instant::now();
        for i in 0..200u32 {
            client
                .send_to(&i.to_be_bytes(), relay.addr)
                .await
                .expect("send");
        }
        let got = recv_seq(&sink, 200).await;
        assert!(start.elapsed() >= delay, "arrived before the delay");
        assert_eq!(got, (0..200).collect::<Vec<_>>(), "order changed");
        assert_eq!(relay.counts(Direction::Up).forwarded, 200);
    }

    #[tokio::test]
    async fn replies_go_back_to_each_client_through_its_own_flow() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let relay = Relay::start(RelayConfig::new(echo_addr))
            .await
            .expect("relay");
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        a.send_to(b"a", relay.addr).await.expect("send");
        b.send_to(b"b", relay.addr).await.expect("send");
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), a.recv(&mut buf))
            .await
            .expect("a answered")
            .expect("recv");
        assert_eq!(&buf[..n], b"a");
        let n = tokio::time::timeout(Duration::from_secs(5), b.recv(&mut buf))
            .await
            .expect("b answered")
            .expect("recv");
        assert_eq!(&buf[..n], b"b");
        assert_eq!(relay.flows().len(), 2);
        assert_eq!(relay.counts(Direction::Down).forwarded, 2);
    }

    #[tokio::test]
    async fn reorder_and_duplicate_are_counted_and_blackhole_drops_all() {
        let (relay, sink) = relay_to_sink(|t| {
            RelayConfig::new(t)
                .both(Impairment {
                    reorder_percent: 20.0,
                    duplicate_percent: 10.0,
                    ..Default::default()
                })
                .seed(42)
        })
        .await;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        for i in 0..500u32 {
            client
                .send_to(&i.to_be_bytes(), relay.addr)
                .await
                .expect("send");
        }
        let all_in = crate::wait_until(Duration::from_secs(5), || async {
            relay.counts(Direction::Up).received == 500
        })
        .await;
        assert!(all_in, "the relay did not receive everything");
        let c = relay.counts(Direction::Up);
        let got = recv_seq(&sink, 500 + c.duplicated as usize).await;
        assert!(c.reordered > 50 && c.duplicated > 20, "{c:?}");
        assert_eq!(got.len() as u64, c.forwarded);
        assert!(got.windows(2).any(|w| w[1] < w[0]), "nothing reordered");

        relay.set_both(Impairment::blackhole());
        for i in 0..100u32 {
            client
                .send_to(&i.to_be_bytes(), relay.addr)
                .await
                .expect("send");
        }
        let mut buf = [0u8; 8];
        let quiet = tokio::time::timeout(Duration::from_millis(200), sink.recv(&mut buf)).await;
        assert!(quiet.is_err(), "a blackholed datagram arrived");
        assert_eq!(relay.counts(Direction::Up).dropped, 100);
    }
}
