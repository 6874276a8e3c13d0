//! A scripted player for the multi-process tests: connects over QUIC with
//! the development token (or a real ticket), joins, sends edits on its
//! control stream and reads the answers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use glam::DVec3;
use shared::PlayerId;
use shared::edit::EditOp;
use shared::wire::{
    ALPN, ClientControl, JoinRole, PROTOCOL_VERSION, ServerControl, decode_frame, encode_frame, frame_len,
};

#[derive(Debug)]
pub struct TestPlayer {
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    /// Frames the reader task decoded from the control stream.
    frames: tokio::sync::mpsc::UnboundedReceiver<ServerControl>,
    /// Decodes snapshots (this client acknowledges none: each is a full state).
    snapshots: shared::snapshot::Receiver,
    _endpoint: quinn::Endpoint,
}

impl TestPlayer {
    /// Connects to the game server at `quic` (certificate pinned by its
    /// SHA-256) and joins as `player` at `spawn` (the server puts it on the
    /// ground). Returns the player and the server's answer.
    pub async fn join(
        quic: SocketAddr,
        cert: &str,
        player: u64,
        spawn: DVec3,
    ) -> anyhow::Result<(Self, ServerControl)> {
        let hello = ClientControl::Hello {
            version: PROTOCOL_VERSION,
            schema: shared::component::Registry::builtin().schema(),
            ticket: crate::DEV_TOKEN.into(),
            player: PlayerId(player),
            name: format!("test-{player}"),
            role: JoinRole::Play,
            spawn: Some(spawn),
        };
        Self::hello(quic, cert, hello).await
    }

    /// Connects and sends `hello`; returns the player and the server's answer.
    pub async fn hello(quic: SocketAddr, cert: &str, hello: ClientControl) -> anyhow::Result<(Self, ServerControl)> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        endpoint.set_default_client_config(bot_swarm::tls::client_config(cert, ALPN)?);
        let conn = endpoint.connect(quic, "localhost")?.await.context("QUIC handshake")?;
        let (send, mut recv) = conn.open_bi().await?;
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        // One reader for the stream's life, so a timed-out wait never
        // leaves half a frame read.
        tokio::spawn(async move {
            loop {
                let mut prefix = [0u8; 4];
                if recv.read_exact(&mut prefix).await.is_err() {
                    return;
                }
                let Ok(len) = frame_len(prefix) else { return };
                let mut body = vec![0u8; len];
                if recv.read_exact(&mut body).await.is_err() {
                    return;
                }
                let Ok(f) = decode_frame::<ServerControl>(&body) else { return };
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        let mut p = Self { conn, send, frames, snapshots: Default::default(), _endpoint: endpoint };
        p.send(&hello).await?;
        let answer = p.next(Duration::from_secs(10)).await?.context("no answer to hello")?;
        Ok((p, answer))
    }

    pub async fn send(&mut self, msg: &ClientControl) -> anyhow::Result<()> {
        self.send.write_all(&encode_frame(msg)?).await?;
        Ok(())
    }

    pub async fn edit(&mut self, id: u32, op: EditOp) -> anyhow::Result<()> {
        self.send(&ClientControl::Edit { id, op }).await
    }

    /// The next control frame, or `None` if none came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<ServerControl>> {
        match tokio::time::timeout(wait, self.frames.recv()).await {
            Ok(Some(f)) => Ok(Some(f)),
            Ok(None) => anyhow::bail!("the control stream closed"),
            Err(_) => Ok(None),
        }
    }

    /// The next snapshot, or `None` if none came within `wait`.
    pub async fn snapshot(&mut self, wait: Duration) -> anyhow::Result<Option<shared::wire::Snapshot>> {
        match tokio::time::timeout(wait, self.conn.read_datagram()).await {
            Ok(d) => Ok(Some(self.snapshots.receive(&d?)?)),
            Err(_) => Ok(None),
        }
    }
}
