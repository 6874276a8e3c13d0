//! TLS for the player endpoint: TLS 1.3 only, the project's ALPN, and a
//! certificate from files (production) or self-signed at start (development;
//! clients pin its SHA-256, which the coordinator hands out).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use sha2::{Digest, Sha256};

/// A certificate chain, its key, and the SHA-256 of the leaf (hex).
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub sha256: String,
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// A fresh self-signed certificate for `names`.
pub fn self_signed(names: Vec<String>) -> anyhow::Result<Identity> {
    let ck = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    Ok(Identity { sha256: fingerprint(&cert), chain: vec![cert], key })
}

pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificates from {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", cert.display()))?;
    let leaf = chain.first().with_context(|| format!("no certificate in {}", cert.display()))?;
    let sha256 = fingerprint(leaf);
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
    Ok(Identity { chain, key, sha256 })
}

/// Bytes of datagrams (snapshots) a connection queues while its congestion
/// window holds them back: a few snapshots (about 50 ms at 90 Hz). Older
/// ones are dropped first: a snapshot late is worth less than the next one,
/// and the client's acknowledgements keep the deltas right across the gap
/// (quinn's default, 1 MiB, queued seconds of them on a congested link).
pub const SNAPSHOT_SEND_BUFFER: usize = 4 * shared::wire::MAX_DATAGRAM;

/// The QUIC server configuration of the player endpoint.
pub fn server_config(id: &Identity) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is unavailable")?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("the certificate and key do not match")?;
    tls.alpn_protocols = vec![shared::wire::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(std::time::Duration::from_secs(10).try_into().context("idle timeout")?))
        .keep_alive_interval(Some(std::time::Duration::from_secs(2)))
        .datagram_receive_buffer_size(Some(256 * 1024))
        .datagram_send_buffer_size(SNAPSHOT_SEND_BUFFER)
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(4u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}
