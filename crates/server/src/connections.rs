//! The listener: every connection is counted and timed before a byte of it is read.
//!
//! A client that opens sockets and sends nothing (or a header a byte at a time) costs the
//! server a file descriptor and a task each; unbounded, a few thousand of them exhaust the
//! descriptors and `accept` fails for everyone. So connections are capped in total and per
//! client address *before* authentication (a connection over a cap gets a one-line 503 and
//! is closed), and a connection that does not finish a request's headers within the header
//! timeout (which also bounds how long an idle keep-alive connection waits for its next
//! request) is closed by hyper. Request bodies have their own deadline (`read_body`), and
//! a client that takes nothing of its response for the send timeout is disconnected.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tower::ServiceExt;

use prometheus::{IntCounter, IntGauge};

/// How many connections the server holds and how long it waits for their bytes.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, in total.
    pub max_open: usize,
    /// Connections open at once from one client address (IPv6: one /64).
    pub max_per_address: usize,
    /// Time a connection has to send a request's headers, counted from when the server
    /// starts waiting for them (so also the idle keep-alive timeout).
    pub header_timeout: Duration,
    /// Time a request has to send its whole body once its headers are in.
    pub body_timeout: Duration,
    /// Time a client may take nothing of a response being sent before the connection is
    /// closed (what the response holds is then freed).
    pub send_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_open: 8192,
            max_per_address: 512,
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// What the listener counts for `/v1/metrics`.
pub struct ConnectionMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
}

/// Open connections, in total and by client address.
struct Counts {
    limits: ConnectionLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it gives its place back.
struct Admitted {
    counts: Arc<Counts>,
    address: IpAddr,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    ServerFull,
    AddressFull,
}

impl Counts {
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refusal> {
        let address = address_key(peer);
        let mut open = self.open.lock().expect("connection counts lock");
        let (total, by_address) = &mut *open;
        if *total >= self.limits.max_open {
            return Err(Refusal::ServerFull);
        }
        let from_address = by_address.entry(address).or_default();
        if *from_address >= self.limits.max_per_address {
            return Err(Refusal::AddressFull);
        }
        *from_address += 1;
        *total += 1;
        Ok(Admitted {
            counts: self.clone(),
            address,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("connection counts lock");
        let (total, by_address) = &mut *open;
        *total -= 1;
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// The address a connection is counted under: IPv4 as is, IPv6 by its /64 (one host
/// usually holds a whole /64, so counting single addresses would bound nothing).
fn address_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
        v4 => v4,
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting and waits for
/// the connections' in-flight requests to finish.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let counts = Arc::new(Counts {
        limits,
        open: Mutex::new((0, HashMap::new())),
    });
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory for a moment: the caps should prevent
                    // it, but never spin on it.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admitted = match counts.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                metrics.refused.inc();
                refuse(&socket, refusal);
                continue;
            }
        };
        // Streamed events go out as they are written, not after Nagle's delay.
        let _ = socket.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let socket = SendTimeout::new(socket, limits.send_timeout);
        let connection = graceful.watch(http.serve_connection(TokioIo::new(socket), service));
        let open = metrics.open.clone();
        open.inc();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
            open.dec();
            drop(admitted);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// A socket whose writes fail once the client has taken nothing for `limit`: hyper has
/// no write timeout, and a client that never reads would hold its response (and its
/// share of the results budget) for as long as it kept the connection.
struct SendTimeout<T> {
    io: T,
    limit: Duration,
    /// Since when writes have made no progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendTimeout<T> {
    fn new(io: T, limit: Duration) -> SendTimeout<T> {
        SendTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// A write could not go on: `Ready` with the error once it has stalled too long.
    fn poll_stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(
        &mut self,
        ready: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match ready {
            Poll::Pending => self.poll_stalled(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let ready = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(ready, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let ready = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(ready, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let ready = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(ready, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Tells a refused client why, if its socket takes the few bytes at once, and closes it.
fn refuse(socket: &TcpStream, refusal: Refusal) {
    let message = match refusal {
        Refusal::ServerFull => "the server has as many connections open as it allows",
        Refusal::AddressFull => "this client address has as many connections open as allowed",
    };
    let body = format!(r#"{{"error":{{"kind":"too_many_connections","message":"{message}"}}}}"#);
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.try_write(response.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(max_open: usize, max_per_address: usize) -> Arc<Counts> {
        Arc::new(Counts {
            limits: ConnectionLimits {
                max_open,
                max_per_address,
                ..ConnectionLimits::default()
            },
            open: Mutex::new((0, HashMap::new())),
        })
    }

    #[test]
    fn caps_hold_per_address_and_in_total_and_places_come_back() {
        let counts = counts(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = counts.admit(a).unwrap();
        let _second = counts.admit(a).unwrap();
        assert_eq!(counts.admit(a).err(), Some(Refusal::AddressFull));
        let _third = counts.admit(b).unwrap();
        assert_eq!(counts.admit(b).err(), Some(Refusal::ServerFull));
        drop(first);
        assert!(counts.admit(a).is_ok());
        assert_eq!(counts.open.lock().unwrap().0, 2);
    }

    #[test]
    fn ipv6_hosts_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(address_key(one), address_key(other));
        assert_ne!(
            address_key(one),
            address_key("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            address_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
