//! A TCP proxy between a service and the broker, so a test can cut live connections the way a
//! network fault would, without touching the broker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards every connection on `addr` to the target until dropped.
pub struct Proxy {
    /// Where services should connect.
    pub addr: SocketAddr,
    live: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` (`host:port`).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy port");
        let addr = listener.local_addr().expect("the proxy's address");
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (l, a, s) = (Arc::clone(&live), Arc::clone(&accepted), stop.clone());
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
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
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
        }
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
