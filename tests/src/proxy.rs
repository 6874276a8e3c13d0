//! A TCP proxy on loopback that can play a database outage: while "down"
//! it cuts every open connection and closes new ones at once, as clients of
//! a stopped server see it. The test PostgreSQL is shared by tests running
//! in parallel, so an outage is played here rather than by stopping it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct OutageProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    /// Bumped on every outage: connections alive at the time end.
    cut: watch::Sender<u64>,
}

impl OutageProxy {
    /// Starts forwarding 127.0.0.1:<port> to `target` on the current runtime.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let proxy = Self { addr, down: down.clone(), cut: cut.clone() };
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut_rx = cut.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Ok(proxy)
    }

    /// Starts (true) or ends (false) an outage.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}
