//! The UDP socket under a quinn endpoint: large kernel buffers, and a cap on the datagrams per
//! `sendmsg` so that GSO batches stay under the kernel's 64 KiB limit at jumbo datagram sizes
//! (quinn 0.11 otherwise batches up to 10, the send fails above ~6.5 KB per datagram, and quinn
//! falls back to 1200-byte packets).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use socket2::{Domain, Protocol, Socket, Type};

/// Binds a UDP socket with the requested kernel buffer sizes. Returns the socket and the
/// receive buffer size the kernel actually granted (it may cap it at `net.core.rmem_max`).
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> io::Result<(std::net::UdpSocket, usize)> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers on a wildcard IPv6 bind, as most daemons do.
        let _ = sock.set_only_v6(false);
    }
    // Failing to enlarge a buffer costs throughput, not correctness.
    let _ = sock.set_recv_buffer_size(buffer_bytes);
    let _ = sock.set_send_buffer_size(buffer_bytes);
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    // Linux reports double the requested value (bookkeeping overhead included).
    let granted = sock.recv_buffer_size().unwrap_or(0) / 2;
    Ok((sock.into(), granted))
}

/// A runtime UDP socket that reports at most `segments_max` datagrams per transmit.
#[derive(Debug)]
pub struct CappedGsoSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    segments_max: usize,
}

impl CappedGsoSocket {
    pub fn wrap(
        runtime: &dyn Runtime,
        socket: std::net::UdpSocket,
        segments_max: usize,
    ) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = runtime.wrap_udp_socket(socket)?;
        Ok(Arc::new(CappedGsoSocket {
            inner,
            segments_max: segments_max.max(1),
        }))
    }
}

impl AsyncUdpSocket for CappedGsoSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.segments_max)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
