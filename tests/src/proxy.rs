//! A TCP proxy between a service and the broker, so a test can cut live connections the way a
//! network fault would, or withhold the broker's publisher confirms, without touching the
//! broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards every connection on `addr` to the target until dropped.
pub struct Proxy {
    /// Where services should connect.
    pub addr: SocketAddr,
    live: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
    /// Set: drop the broker's `basic.ack` and `basic.nack` frames (publisher confirms).
    withhold: Option<Arc<AtomicBool>>,
    withheld: Arc<AtomicUsize>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` (`host:port`).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: String) -> Self {
        Self::listen(target, None).await
    }

    /// As [`Proxy::start`], reading the broker's side frame by frame so that
    /// [`Proxy::withhold_confirms`] can drop its publisher confirms: a broker that takes
    /// publishes and never confirms them, while deliveries and heartbeats flow.
    pub async fn confirm_filter(target: String) -> Self {
        Self::listen(target, Some(Arc::new(AtomicBool::new(false)))).await
    }

    async fn listen(target: String, withhold: Option<Arc<AtomicBool>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy port");
        let addr = listener.local_addr().expect("the proxy's address");
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let withheld = Arc::new(AtomicUsize::new(0));
        let (l, a, s) = (Arc::clone(&live), Arc::clone(&accepted), stop.clone());
        let (filter, counted) = (withhold.clone(), Arc::clone(&withheld));
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    () = s.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                a.fetch_add(1, Ordering::SeqCst);
                let cut = l.lock().expect("proxy lock").clone();
                let target = target.clone();
                let (filter, counted) = (filter.clone(), Arc::clone(&counted));
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(&target).await else {
                        return;
                    };
                    match filter {
                        None => tokio::select! {
                            () = cut.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        },
                        Some(withhold) => {
                            let (mut client_in, client_out) = client.into_split();
                            let (broker_in, mut broker_out) = upstream.into_split();
                            tokio::select! {
                                () = cut.cancelled() => {}
                                _ = tokio::io::copy(&mut client_in, &mut broker_out) => {}
                                _ = frames(broker_in, client_out, &withhold, &counted) => {}
                            }
                        }
                    }
                    // Dropping both sockets closes them: each side sees its peer vanish.
                });
            }
        });
        Self {
            addr,
            live,
            accepted,
            stop,
            withhold,
            withheld,
        }
    }

    /// Starts or stops dropping the broker's publisher confirms (a proxy made with
    /// [`Proxy::confirm_filter`]).
    ///
    /// # Panics
    /// When the proxy was made with [`Proxy::start`].
    pub fn withhold_confirms(&self, withhold: bool) {
        self.withhold
            .as_ref()
            .expect("a proxy made with Proxy::confirm_filter")
            .store(withhold, Ordering::SeqCst);
    }

    /// Confirms dropped so far.
    pub fn withheld(&self) -> usize {
        self.withheld.load(Ordering::SeqCst)
    }

    /// Closes every connection open now; new connections are forwarded as before.
    pub fn cut(&self) {
        let mut live = self.live.lock().expect("proxy lock");
        live.cancel();
        *live = CancellationToken::new();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

/// Copies AMQP frames from the broker to the client, dropping `basic.ack` and `basic.nack`
/// (class 60, methods 80 and 120: from the broker these are only publisher confirms) while
/// `withhold` is set. A frame is a 7-byte header (type, channel, payload size), the payload and
/// an end octet.
async fn frames(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    withhold: &AtomicBool,
    withheld: &AtomicUsize,
) -> std::io::Result<()> {
    const METHOD: u8 = 1;
    let mut header = [0u8; 7];
    let mut frame = Vec::new();
    loop {
        from.read_exact(&mut header).await?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        frame.resize(size + 1, 0);
        from.read_exact(&mut frame).await?;
        let confirm =
            header[0] == METHOD && matches!(frame.get(..4), Some([0, 60, 0, 80] | [0, 60, 0, 120]));
        if confirm && withhold.load(Ordering::SeqCst) {
            withheld.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        to.write_all(&header).await?;
        to.write_all(&frame).await?;
    }
}
