//! TLS material: the settings (`TLS_MODE`, `CERTS_DIR`), where the PEM files are, and loading
//! them with every check done at start-up, so a bad file stops the service with one line naming
//! the file instead of failing per connection. Also what a certificate says: the identities it
//! claims (for caller authorization) and when it expires (the expiry gauges).

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::transport::{Certificate, Identity};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How far in this machine's future a certificate's start may lie and still count as a clock
/// difference rather than a fault. A renewal issued by a machine whose clock runs ahead of ours
/// is then waited for (see [`TlsError::is_early`]); a CA certificate is trusted at once (trust
/// anchors' dates are not checked in a handshake: the leaf's are).
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(5 * 60);

/// How a connection between the services is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Both sides present certificates signed by the shared CA (the default).
    Mutual,
    /// Only the server presents a certificate; clients are not authenticated.
    Server,
    /// Plaintext, for debugging or behind a mesh that does TLS itself.
    Off,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Mutual => "mutual",
            TlsMode::Server => "server",
            TlsMode::Off => "off",
        })
    }
}

impl TlsMode {
    /// Logs the start-up warning every mode weaker than mutual TLS deserves.
    pub fn warn_if_weak(self) {
        match self {
            TlsMode::Mutual => {}
            TlsMode::Server => tracing::warn!(
                tls_mode = %self,
                "TLS without client certificates: any client that can reach the port may call"
            ),
            TlsMode::Off => tracing::warn!(
                tls_mode = %self,
                "TLS is off: traffic is plaintext and callers are not authenticated"
            ),
        }
    }
}

/// Which side of the connection a service is: it decides the default file names in `CERTS_DIR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// recommendations: `server.pem`, `server.key`.
    Server,
    /// marketplace: `client.pem`, `client.key`.
    Client,
}

/// The PEM files one service uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that sign the peer's certificate.
    pub ca: PathBuf,
    /// This service's certificate chain.
    pub cert: PathBuf,
    /// This service's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The original's file names inside `dir`: `ca.pem`, and `server.*` or `client.*` by role.
    pub fn in_dir(dir: &Path, role: Role) -> Self {
        let stem = match role {
            Role::Server => "server",
            Role::Client => "client",
        };
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// The TLS settings both services take: where the files are and how strict to be.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
    /// Directory with the PEM files under the original's names: `ca.pem`, and `server.pem` and
    /// `server.key` (recommendations) or `client.pem` and `client.key` (marketplace).
    #[arg(long, env = "CERTS_DIR", default_value = "certs/dev")]
    pub certs_dir: PathBuf,
    /// `mutual` (both sides authenticated), `server` (only the server is), or `off` (plaintext).
    #[arg(long, env = "TLS_MODE", value_enum, default_value_t = TlsMode::Mutual)]
    pub tls_mode: TlsMode,
    /// CA bundle to verify the peer with, instead of `CERTS_DIR/ca.pem`.
    #[arg(long, env = "TLS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// This service's certificate chain, instead of the one in `CERTS_DIR`.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// This service's private key, instead of the one in `CERTS_DIR`.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Seconds between checks of the TLS files for changes (they are also reloaded at once on
    /// SIGHUP). New connections use new files; open ones keep theirs.
    #[arg(long, env = "TLS_RELOAD_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_reload_secs: u64,
}

impl TlsArgs {
    /// Settings for the PEM files in `certs_dir`, in mode `tls_mode`, with no per-file overrides.
    pub fn new(certs_dir: impl Into<PathBuf>, tls_mode: TlsMode) -> Self {
        TlsArgs {
            certs_dir: certs_dir.into(),
            tls_mode,
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_reload_secs: 5,
        }
    }

    /// How often to check the files for changes.
    pub fn reload_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.tls_reload_secs)
    }

    /// The files to use: each override, or else the original's name in `certs_dir`.
    pub fn files(&self, role: Role) -> TlsFiles {
        let defaults = TlsFiles::in_dir(&self.certs_dir, role);
        TlsFiles {
            ca: self.ca_file.clone().unwrap_or(defaults.ca),
            cert: self.cert_file.clone().unwrap_or(defaults.cert),
            key: self.key_file.clone().unwrap_or(defaults.key),
        }
    }
}

/// A problem with a TLS file. Every message names the file; none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: no PEM certificate found (expected a `-----BEGIN CERTIFICATE-----` block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a valid certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: certificate expired on {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("{}: certificate is not valid until {not_before}", path.display())]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        /// It starts within [`CLOCK_LEEWAY`] of now.
        soon: bool,
    },
    #[error("{}: no PEM private key found (expected a `-----BEGIN PRIVATE KEY-----` block)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unsupported or corrupt private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
}

impl TlsError {
    /// Whether the only fault is a certificate that starts within [`CLOCK_LEEWAY`]: files to try
    /// again until it has started, not to refuse.
    pub fn is_early(&self) -> bool {
        matches!(self, TlsError::NotYetValid { soon: true, .. })
    }
}

/// Reads `path`, naming it in the error.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Parses every certificate in a PEM file and checks each is a well-formed X.509 certificate
/// valid now.
fn load_certs(path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    for der in &certs {
        check_validity(path, der)?;
    }
    Ok((pem, certs))
}

fn check_validity(path: &Path, der: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
        });
    }
    if now < validity.not_before {
        let ahead = validity.not_before.timestamp() - now.timestamp();
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
            soon: u64::try_from(ahead).is_ok_and(|secs| secs <= CLOCK_LEEWAY.as_secs()),
        });
    }
    Ok(())
}

/// A warning if a private key file can be read by users other than its owner.
pub fn key_exposure(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        // Group read is how Kubernetes hands a Secret to a pod's fsGroup: deliberate sharing.
        (mode & 0o007 != 0).then(|| {
            format!(
                "private key file is readable by others (mode {:o}); chmod 600 or 640 it",
                mode & 0o777
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Loads the CA bundle that verifies peers: its certificates valid now (see [`load_trust`]).
pub fn load_ca(path: &Path) -> Result<Certificate, TlsError> {
    Ok(Certificate::from_pem(load_trust(path)?.pem))
}

/// The CA certificates of a bundle that are valid now, in both forms.
#[derive(Debug)]
pub struct Trust {
    /// The usable certificates' PEM blocks, for tonic's client.
    pub pem: Vec<u8>,
    /// The same certificates, for a rustls root store.
    pub ders: Vec<CertificateDer<'static>>,
}

/// Reads a CA bundle. A CA certificate that starts within [`CLOCK_LEEWAY`] is used; one that
/// has expired or starts later is skipped with a warning rather than refusing the file: during a CA renewal the bundle holds the old and the
/// new CA, and the old one expiring must not stop a service that (re)loads the bundle. The file
/// is refused when no certificate in it is usable, or when any block is not a certificate.
pub fn load_trust(path: &Path) -> Result<Trust, TlsError> {
    let (trust, skipped) = read_trust(path)?;
    for (subject, e) in skipped {
        tracing::warn!(
            %subject,
            "{e}: this CA certificate is skipped; the bundle's others are used"
        );
    }
    Ok(trust)
}

/// [`load_trust`] without the warnings: the usable certificates, and each skipped one's subject
/// with the reason.
fn read_trust(path: &Path) -> Result<(Trust, Vec<(String, TlsError)>), TlsError> {
    let pem = read(path)?;
    let mut trust = Trust {
        pem: Vec::new(),
        ders: Vec::new(),
    };
    let mut skipped = Vec::new();
    for block in certificate_blocks(&pem) {
        let der = CertificateDer::from_pem_slice(block).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // A CA that starts within the clock leeway is trusted as one that has started.
        let validity = check_validity(path, &der).or_else(|e| match e.is_early() {
            true => Ok(()),
            false => Err(e),
        });
        match validity {
            Ok(()) => {
                trust.pem.extend_from_slice(block);
                trust.pem.push(b'\n');
                trust.ders.push(der);
            }
            Err(e @ (TlsError::Expired { .. } | TlsError::NotYetValid { .. })) => {
                skipped.push((subject(&der), e));
            }
            Err(e) => return Err(e),
        }
    }
    if !trust.ders.is_empty() {
        return Ok((trust, skipped));
    }
    Err(skipped.into_iter().next().map_or_else(
        || TlsError::NoCertificate {
            path: path.to_owned(),
        },
        |(_, e)| e,
    ))
}

/// Each `-----BEGIN CERTIFICATE-----` … `-----END CERTIFICATE-----` block of a PEM file.
fn certificate_blocks(pem: &[u8]) -> Vec<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
    };
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let Some(len) = find(&rest[start..], END) else {
            // An unterminated block: kept whole, so parsing it reports the error.
            blocks.push(&rest[start..]);
            break;
        };
        let end = start + len + END.len();
        blocks.push(&rest[start..end]);
        rest = &rest[end..];
    }
    blocks
}

/// A certificate's subject, for log lines.
fn subject(der: &CertificateDer<'_>) -> String {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, cert)| cert.subject().to_string())
        .unwrap_or_default()
}

/// When a certificate stops being valid, in seconds since the Unix epoch.
#[cfg(feature = "service")]
fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Sets `bookstore_tls_certificate_expiry_timestamp_seconds`: for `certificate="identity"` when
/// this service's own certificate (`identity`) expires, for `certificate="trust"` when the last
/// CA of the bundle (`trust`) does: in an overlap bundle the old CA expiring is expected, and
/// trust ends with the last one. Called after every successful load, so an alert on
/// `… - time()` sees each renewal. A file that cannot be read leaves its gauge as it was.
#[cfg(feature = "service")]
pub fn record_expiry(
    metrics: &crate::metrics::Metrics,
    identity: Option<&Path>,
    trust: Option<&Path>,
) {
    let identity = identity
        .and_then(|path| load_certs(path).ok())
        .and_then(|(_, chain)| chain.first().and_then(not_after));
    let trust = trust
        .and_then(|path| read_trust(path).ok())
        .and_then(|(trust, _)| trust.ders.iter().filter_map(not_after).max());
    for (certificate, expiry) in [("identity", identity), ("trust", trust)] {
        if let Some(expiry) = expiry {
            metrics
                .gauge(
                    "bookstore_tls_certificate_expiry_timestamp_seconds",
                    &[("certificate", certificate)],
                )
                .set(expiry as f64);
        }
    }
}

/// Loads this service's certificate chain and private key, and checks that they belong together.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
    let loaded = load_certified_key(cert_path, key_path)?;
    Ok(Identity::from_pem(loaded.cert_pem, loaded.key_pem))
}

/// A certificate chain and its private key, checked to belong together, in both forms.
pub struct LoadedKey {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Names the certificate chain's length only: a key is not for logs.
impl std::fmt::Debug for LoadedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedKey")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<LoadedKey, TlsError> {
    let (cert_pem, chain) = load_certs(cert_path)?;
    let key_pem = read(key_path)?;
    if let Some(warning) = key_exposure(key_path) {
        tracing::warn!(path = %key_path.display(), "{warning}");
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_path.to_owned(),
        },
        other => TlsError::BadKey {
            path: key_path.to_owned(),
            reason: other.to_string(),
        },
    })?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(
        |e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                key: key_path.to_owned(),
                cert: cert_path.to_owned(),
            },
            other => TlsError::BadKey {
                path: key_path.to_owned(),
                reason: other.to_string(),
            },
        },
    )?;
    Ok(LoadedKey {
        cert_pem,
        key_pem,
        chain,
        key,
    })
}

/// The CA certificates of a PEM bundle, checked as [`load_ca`] checks them.
pub fn load_ca_ders(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_trust(path).map(|trust| trust.ders)
}

/// The one crypto provider both services use (ring: no C toolchain beyond gcc needed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identities a certificate claims, in the order callers are matched: URI SANs (such as
/// SPIFFE ids `spiffe://…`), then DNS SANs; the subject common name only if it has no SANs of
/// either kind. An unparseable certificate has none.
pub fn identities(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(sans)) = cert.subject_alternative_name() {
        for name in &sans.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    uris.append(&mut dns);
    if uris.is_empty() {
        uris.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_owned),
        );
    }
    uris
}

#[cfg(test)]
mod tests;
