//! Connections, before any gRPC: accepting them with caps on how many are open (in all and
//! per client IP), a deadline for the TLS handshake and the HTTP/2 preface, and an idle
//! timeout; and an accept loop that backs off, instead of spinning, when the process runs out
//! of file descriptors.
//!
//! Each connection is a [`Conn`]: its I/O plus a [`ConnectionInfo`] that every request on it
//! carries in its extensions, so the layers above can count per connection (health watches)
//! and per peer (fair shares of the in-flight limit) without a map lookup per call.

mod conn;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError, atomic::AtomicUsize},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

pub(crate) use conn::{Conn, ConnectionInfo};

use crate::tls::ReloadableTls;

/// File descriptors kept back from the connection cap for the database pool, the listeners,
/// the SQLite files and the logs (the metrics listener's connections come on top).
const RESERVED_DESCRIPTORS: u64 = 64;

/// How connections are held in bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionLimits {
    /// Open connections in all; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Open connections from one client IP.
    pub max_connections_per_ip: usize,
    /// From accept to the end of the TLS handshake (if any) and of the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection on which no call has started for this long, and none is open, is closed.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits with `max_connections` lowered, if need be, to what the process's
    /// descriptor limit allows once `others` (other listeners' connections) and our own
    /// reserve are kept back, so the cap (not `EMFILE`) is what turns connections away.
    pub(crate) fn within_descriptor_limit(self, others: usize) -> Self {
        match descriptor_limit() {
            Some(limit) => {
                let reserved = RESERVED_DESCRIPTORS + others as u64;
                let usable = if limit > 2 * reserved {
                    limit - reserved
                } else {
                    limit / 2
                };
                let usable = usize::try_from(usable).unwrap_or(usize::MAX).max(1);
                if usable < self.max_connections {
                    tracing::info!(
                        max_connections = usable,
                        descriptor_limit = limit,
                        "connection cap lowered to fit the descriptor limit (ulimit -n)"
                    );
                }
                Self {
                    max_connections: self.max_connections.min(usable),
                    ..self
                }
            }
            None => self,
        }
    }
}

#[cfg(unix)]
fn descriptor_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(not(unix))]
fn descriptor_limit() -> Option<u64> {
    None
}

/// One client IP with connections open: what it holds of the server.
#[derive(Debug)]
pub(crate) struct Peer {
    ip: IpAddr,
    /// Calls in flight from this IP, for its fair share when no callers file names callers.
    pub(crate) in_flight: AtomicUsize,
}

impl Peer {
    pub(crate) fn ip(&self) -> IpAddr {
        self.ip
    }
}

/// Why a connection was closed by the server before the client closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over `max_connections`.
    Limit,
    /// Over `max_connections_per_ip`.
    PeerLimit,
    /// No TLS handshake or HTTP/2 preface within `handshake_timeout`.
    HandshakeTimeout,
    /// No call for `idle_timeout`.
    Idle,
}

impl Refusal {
    pub(crate) const ALL: [Self; 4] = [
        Self::Limit,
        Self::PeerLimit,
        Self::HandshakeTimeout,
        Self::Idle,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Limit => "limit",
            Self::PeerLimit => "peer_limit",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Idle => "idle",
        }
    }
}

/// Every open connection, by peer, and the counts the metrics show.
#[derive(Debug)]
pub(crate) struct Connections {
    limits: ConnectionLimits,
    open: Mutex<Open>,
    /// Connections the server closed, by [`Refusal`]: Prometheus counters, which the metrics
    /// register.
    pub refused: Family<RefusalLabel, Counter>,
}

/// The label of a [`Refusal`] in the metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabel {
    reason: &'static str,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Each peer and its open connections.
    peers: HashMap<IpAddr, (Arc<Peer>, usize)>,
}

impl Connections {
    pub(crate) fn new(limits: ConnectionLimits) -> Arc<Self> {
        let refused = Family::default();
        // Every reason is shown from the start, at zero.
        for why in Refusal::ALL {
            drop(refused.get_or_create(&RefusalLabel {
                reason: why.as_str(),
            }));
        }
        Arc::new(Self {
            limits,
            open: Mutex::default(),
            refused,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }

    fn count(&self, why: Refusal) {
        self.refused
            .get_or_create(&RefusalLabel {
                reason: why.as_str(),
            })
            .inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a connection from `ip`, or why there is none.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut open = self.lock();
        if open.total >= self.limits.max_connections {
            return Err(Refusal::Limit);
        }
        let (peer, count) = open.peers.entry(ip).or_insert_with(|| {
            let peer = Peer {
                ip,
                in_flight: AtomicUsize::new(0),
            };
            (Arc::new(peer), 0)
        });
        if *count >= self.limits.max_connections_per_ip {
            return Err(Refusal::PeerLimit);
        }
        *count += 1;
        let peer = peer.clone();
        open.total += 1;
        Ok(Slot {
            connections: self.clone(),
            peer,
        })
    }
}

/// A connection's place in [`Connections`], given back when the connection is dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    connections: Arc<Connections>,
    peer: Arc<Peer>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        open.total -= 1;
        if let Some((_, count)) = open.peers.get_mut(&self.peer.ip) {
            *count -= 1;
            if *count == 0 {
                open.peers.remove(&self.peer.ip);
            }
        }
    }
}

/// Connections ready for the gRPC server, plain or TLS.
#[derive(Debug)]
pub(crate) enum Incoming {
    Plain(ReceiverStream<io::Result<Conn<TcpStream>>>),
    Tls(ReceiverStream<io::Result<Conn<TlsStream<TcpStream>>>>),
}

/// Accepts connections on `listener` within `connections`' limits and hands them over, TLS
/// ones once their handshake is done, until the task is aborted or the receiver dropped.
pub(crate) fn accept(
    listener: TcpListener,
    connections: Arc<Connections>,
    tls: Option<Arc<ReloadableTls>>,
) -> (Incoming, JoinHandle<()>) {
    match tls {
        None => {
            let (tx, rx) = mpsc::channel(64);
            let task = tokio::spawn(async move {
                let mut accepting = Accepting::new(listener);
                while let Some((stream, slot, deadline)) = accepting.next(&connections).await {
                    let conn = Conn::new(stream, None, slot, deadline, &connections);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
            });
            (Incoming::Plain(ReceiverStream::new(rx)), task)
        }
        Some(tls) => {
            let (tx, rx) = mpsc::channel(64);
            let task = tokio::spawn(async move {
                let mut accepting = Accepting::new(listener);
                while let Some((stream, slot, deadline)) = accepting.next(&connections).await {
                    if tx.is_closed() {
                        return;
                    }
                    // Handshakes run side by side, so a slow client holds up no one else; the
                    // slot bounds how many there can be.
                    let (acceptor, tx, connections) =
                        (tls.acceptor(), tx.clone(), connections.clone());
                    tokio::spawn(async move {
                        let peer = slot.peer.ip;
                        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                let certs = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .map(|certs| certs.to_vec());
                                let conn = Conn::new(stream, certs, slot, deadline, &connections);
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            }
                            Err(_) => {
                                connections.count(Refusal::HandshakeTimeout);
                                tracing::debug!(%peer, "TLS handshake timed out");
                            }
                        }
                    });
                }
            });
            (Incoming::Tls(ReceiverStream::new(rx)), task)
        }
    }
}

/// A listener's accept loop: admits within the limits, closes the rest, and backs off when
/// accepting fails for want of descriptors or memory.
struct Accepting {
    listener: TcpListener,
    backoff: Backoff,
}

impl Accepting {
    fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            backoff: Backoff::default(),
        }
    }

    /// The next admitted connection, its slot and its handshake deadline.
    async fn next(&mut self, connections: &Arc<Connections>) -> Option<(TcpStream, Slot, Instant)> {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    self.backoff.failed(&err).await;
                    continue;
                }
            };
            self.backoff.reset();
            match admit(connections, stream, addr) {
                Some(admitted) => return Some(admitted),
                None => continue,
            }
        }
    }
}

fn admit(
    connections: &Arc<Connections>,
    stream: TcpStream,
    addr: SocketAddr,
) -> Option<(TcpStream, Slot, Instant)> {
    let deadline = after(connections.limits.handshake_timeout);
    match connections.admit(addr.ip()) {
        Ok(slot) => {
            let _ = stream.set_nodelay(true);
            Some((stream, slot, deadline))
        }
        Err(why) => {
            connections.count(why);
            tracing::debug!(peer = %addr.ip(), reason = why.as_str(), "connection refused");
            // Dropping the stream closes it.
            None
        }
    }
}

/// The instant `timeout` from now; a timeout too long to add (`--idle-timeout 100000000d`) is
/// a century.
fn after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Accepting again at once after `EMFILE` spins a core and floods the logs; wait a little
/// longer after each failure in a row, and report them once per interval.
#[derive(Debug)]
pub(crate) struct Backoff {
    delay: Duration,
    failures: u64,
    reported: Option<std::time::Instant>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const REPORT_EVERY: Duration = Duration::from_secs(10);

impl Default for Backoff {
    fn default() -> Self {
        Self {
            delay: BACKOFF_MIN,
            failures: 0,
            reported: None,
        }
    }
}

impl Backoff {
    pub(crate) async fn failed(&mut self, err: &io::Error) {
        self.failures += 1;
        let due = self.reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY);
        if due {
            tracing::warn!(
                error = %err,
                failures = self.failures,
                "accepting connections fails; backing off (out of file descriptors? raise ulimit -n or lower --max-connections)"
            );
            self.reported = Some(std::time::Instant::now());
            self.failures = 0;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    pub(crate) fn reset(&mut self) {
        self.delay = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            handshake_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn connections_over_the_caps_are_refused_and_slots_come_back_when_closed() {
        let connections = Connections::new(limits(3, 2));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = connections.admit(a).unwrap();
        let _second = connections.admit(a).unwrap();
        assert_eq!(connections.admit(a).unwrap_err(), Refusal::PeerLimit);
        let _third = connections.admit(b).unwrap();
        assert_eq!(connections.admit(b).unwrap_err(), Refusal::Limit);
        assert_eq!(connections.open(), 3);
        drop(first);
        assert_eq!(connections.open(), 2);
        assert!(
            connections.admit(a).is_ok(),
            "a closed connection frees its slot"
        );
    }

    #[test]
    fn a_peer_is_forgotten_once_its_last_connection_closes() {
        let connections = Connections::new(limits(10, 10));
        let ip: IpAddr = "::1".parse().unwrap();
        let slot = connections.admit(ip).unwrap();
        slot.peer
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        drop(slot);
        assert!(connections.lock().peers.is_empty());
        let again = connections.admit(ip).unwrap();
        assert_eq!(
            again
                .peer
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn the_connection_cap_stays_below_the_descriptor_limit() {
        let capped = limits(usize::MAX, 10).within_descriptor_limit(64);
        if let Some(limit) = descriptor_limit() {
            assert!((capped.max_connections as u64) < limit);
        }
    }
}
