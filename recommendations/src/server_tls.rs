//! The gRPC listener's TLS, owned by the service rather than by the gRPC library, for two
//! reasons:
//!
//! - **Rotation without restart.** The rustls configuration lives behind a lock and is rebuilt
//!   when the files change (see [`bookstore_common::watch`]); each new connection takes the
//!   configuration current at that moment, connections already open keep theirs. A file set that does not load (half-written, key of
//!   another certificate, expired…) is refused with a log line and the old one stays in use.
//! - **Refusals that say why.** A failed handshake is logged with the peer address and the
//!   reason (no certificate, unknown CA, expired, wrong key usage, not TLS at all…), at most a
//!   few lines a minute so a flood cannot fill a disk; every one is counted. The handshakes
//!   themselves run in [`crate::listener`].

use std::sync::{Arc, RwLock};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};

use bookstore_common::{
    metrics::Metrics,
    tls::{TlsError, TlsFiles, TlsMode, load_ca_ders, load_certified_key, provider},
};

/// The server's TLS configuration, reloadable from its files.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    mode: TlsMode,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads and checks the files. `mode` must be `Mutual` or `Server`.
    pub fn load(files: TlsFiles, mode: TlsMode) -> Result<Self, TlsError> {
        let config = build(&files, mode)?;
        Ok(ServerTls {
            files,
            mode,
            current: RwLock::new(config),
        })
    }

    /// The configuration new connections use now.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sets the expiry gauges from the files in use (see [`bookstore_common::tls::record_expiry`]).
    pub fn record_expiry(&self, metrics: &Metrics) {
        let trust = (self.mode == TlsMode::Mutual).then_some(self.files.ca.as_path());
        bookstore_common::tls::record_expiry(metrics, Some(&self.files.cert), trust);
    }

    /// Loads the files again; new connections use them from now on. On error the
    /// configuration in use stays (see [`bookstore_common::watch::watch_files`], which logs both outcomes).
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files, self.mode)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }
}

fn build(files: &TlsFiles, mode: TlsMode) -> Result<Arc<ServerConfig>, TlsError> {
    let identity = load_certified_key(&files.cert, &files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_config(files, e))?;
    let builder = if mode == TlsMode::Mutual {
        let mut roots = RootCertStore::empty();
        for ca in load_ca_ders(&files.ca)? {
            roots.add(ca).map_err(|e| TlsError::BadCertificate {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsError::BadCertificate {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| bad_config(files, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn bad_config(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    }
}
