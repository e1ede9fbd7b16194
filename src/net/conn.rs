//! One accepted connection: its I/O, wrapped to enforce the preface deadline and the idle
//! timeout, and what the requests on it learn of it.

use std::{
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

use super::{Connections, Peer, Refusal, Slot};

/// The 24 bytes every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

/// What every request on a connection carries in its extensions (one reference count per
/// call).
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    peer: Arc<Peer>,
    /// The client's certificate chain, when it presented one over mutual TLS.
    certificates: Option<Vec<CertificateDer<'static>>>,
    /// Calls started on this connection: the idle timer's sign of life.
    calls: AtomicU64,
    /// Health watches open on this connection.
    watches: AtomicUsize,
}

impl ConnectionInfo {
    pub(crate) fn peer_ip(&self) -> IpAddr {
        self.0.peer.ip
    }

    pub(crate) fn peer(&self) -> &Arc<Peer> {
        &self.0.peer
    }

    /// The client's certificate, leaf first, when it presented one.
    pub(crate) fn certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.0.certificates.as_deref()
    }

    /// Counts a call started, so the connection is not idle.
    pub(crate) fn call_started(&self) {
        self.0.calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn watches(&self) -> &AtomicUsize {
        &self.0.watches
    }
}

/// A connection's I/O with its [`ConnectionInfo`], holding its place among the open
/// connections until hyper drops it.
#[derive(Debug)]
pub(crate) struct Conn<IO> {
    io: IO,
    info: ConnectionInfo,
    _slot: Slot,
    connections: Arc<Connections>,
    /// Until the HTTP/2 preface has arrived: how many of its bytes are still to come, and the
    /// deadline.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    idle: Idle,
}

#[derive(Debug)]
struct Idle {
    timer: Pin<Box<Sleep>>,
    /// Calls started when the timer was last set.
    calls_seen: u64,
    /// The waker the timer was last polled with: it wakes that task when it fires, so
    /// while reads come from the same task the timer needs no polling (registering a waker
    /// with the timer on every read that waits is most of the timer's cost).
    waker: Option<std::task::Waker>,
}

impl<IO> Conn<IO> {
    pub(super) fn new(
        io: IO,
        certificates: Option<Vec<CertificateDer<'static>>>,
        slot: Slot,
        handshake_deadline: Instant,
        connections: &Arc<Connections>,
    ) -> Self {
        let info = ConnectionInfo(Arc::new(Shared {
            peer: slot.peer.clone(),
            certificates,
            calls: AtomicU64::new(0),
            watches: AtomicUsize::new(0),
        }));
        let idle_timeout = connections.limits.idle_timeout;
        Self {
            io,
            info,
            _slot: slot,
            connections: connections.clone(),
            preface: Some((
                PREFACE_LEN,
                Box::pin(tokio::time::sleep_until(handshake_deadline)),
            )),
            idle: Idle {
                timer: Box::pin(tokio::time::sleep_until(super::after(idle_timeout))),
                calls_seen: 0,
                waker: None,
            },
        }
    }

    /// Whether the connection has been idle past the timeout; re-arms the timer when it
    /// fires on a connection that is in use.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let registered = self
            .idle
            .waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if registered && !self.idle.timer.is_elapsed() {
            return false;
        }
        self.idle.waker = Some(cx.waker().clone());
        loop {
            // Outside the task's budget: polled within it, a timer returns `Pending` without
            // registering the waker once the budget is spent (as it is after a burst of
            // reads), and the stored waker would then stand for a registration never made.
            if unbudgeted(self.idle.timer.as_mut(), cx).is_pending() {
                return false;
            }
            let calls = self.info.0.calls.load(Ordering::Relaxed);
            let watching = self.info.0.watches.load(Ordering::Relaxed) > 0;
            if calls == self.idle.calls_seen && !watching {
                return true;
            }
            self.idle.calls_seen = calls;
            let next = super::after(self.connections.limits.idle_timeout);
            self.idle.timer.as_mut().reset(next);
        }
    }

    fn close(&self, why: Refusal) -> io::Error {
        self.connections.count(why);
        tracing::debug!(peer = %self.info.peer_ip(), reason = why.as_str(), "closing connection");
        io::Error::new(io::ErrorKind::TimedOut, why.as_str())
    }
}

/// Polls `timer` whatever the task's coop budget, so that `Pending` always means the task's
/// waker is registered to be woken when it fires.
fn unbudgeted(timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<()> {
    std::pin::pin!(tokio::task::coop::unconstrained(timer)).poll(cx)
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some((missing, _)) = &mut this.preface {
                    *missing = missing.saturating_sub(buf.filled().len() - before);
                    if *missing == 0 {
                        this.preface = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                if let Some((_, deadline)) = &mut this.preface {
                    if unbudgeted(deadline.as_mut(), cx).is_ready() {
                        return Poll::Ready(Err(this.close(Refusal::HandshakeTimeout)));
                    }
                } else if this.idle_expired(cx) {
                    return Poll::Ready(Err(this.close(Refusal::Idle)));
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO> Connected for Conn<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}
