//! The bookstore's development PKI, made in pure Rust with `rcgen`.
//!
//! Unlike the original tutorial's openssl recipe (X.509 v1, no subjectAltName, which rustls
//! rejects), every certificate here is X.509 v3 with the extensions a verifier checks: CA basic
//! constraints and key usages, subjectAltNames, and the server/client extended key usages.
//!
//! The PKI is written as files (and, with `share`, per-service copies), or by `kubernetes` as
//! the two TLS Secrets through the API server.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub mod kubernetes;

/// Names the recommendations certificate answers to: local runs, the compose service name, and
/// the Kubernetes Service in namespace `bookstore` in all its spellings.
pub const SERVER_NAMES: &[&str] = &[
    "recommendations",
    "localhost",
    "127.0.0.1",
    "::1",
    "recommendations.bookstore",
    "recommendations.bookstore.svc",
    "recommendations.bookstore.svc.cluster.local",
];

/// The identity in the marketplace's client certificate.
pub const CLIENT_NAME: &str = "marketplace";

/// The files `generate` writes, with the original's names.
pub const FILES: &[&str] = &[
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

/// What each service is given: the CA certificate and its own certificate and key, never the
/// CA's key or the other service's key. The names are the files in that service's `CERTS_DIR`,
/// and the keys of its Kubernetes Secret `<service>-tls`.
pub const SHARES: &[(&str, &[&str])] = &[
    ("recommendations", &["ca.pem", "server.pem", "server.key"]),
    ("marketplace", &["ca.pem", "client.pem", "client.key"]),
];

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server authentication (`serverAuth`).
    Server,
    /// TLS client authentication (`clientAuth`).
    Client,
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can issue leaf certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    issued: Issued,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed CA valid for ten years.
    pub fn new(common_name: &str) -> Result<Self> {
        let now = OffsetDateTime::now_utc();
        Self::valid(
            common_name,
            now - Duration::hours(1),
            now + Duration::days(3650),
        )
    }

    /// A new self-signed CA with an explicit validity window (tests make renewed and expired
    /// CAs).
    pub fn valid(
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params
            .self_signed(&key)
            .context("signing the CA certificate")?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Authority {
            issuer: Issuer::new(params, key),
            issued,
        })
    }

    /// The CA certificate and key.
    pub fn issued(&self) -> &Issued {
        &self.issued
    }

    /// Issues a leaf certificate valid for about two years from now.
    pub fn issue(&self, common_name: &str, names: &[&str], usage: Usage) -> Result<Issued> {
        let now = OffsetDateTime::now_utc();
        self.issue_valid(
            common_name,
            names,
            usage,
            now - Duration::hours(1),
            now + Duration::days(825),
        )
    }

    /// Issues a leaf certificate with an explicit validity window (tests make expired ones).
    pub fn issue_valid(
        &self,
        common_name: &str,
        names: &[&str],
        usage: Usage,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().context("generating a key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate for {common_name}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// An IP address becomes an IP SAN, a name with a scheme (`spiffe://…`) a URI SAN, anything
/// else a DNS SAN.
fn san(name: &str) -> Result<SanType> {
    Ok(match name.parse() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) if name.contains("://") => SanType::URI(
            name.try_into()
                .with_context(|| format!("{name:?} is not a valid URI"))?,
        ),
        Err(_) => SanType::DnsName(
            name.try_into()
                .with_context(|| format!("{name:?} is not a valid DNS name"))?,
        ),
    })
}

/// What `generate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    /// A new PKI was written.
    Created,
    /// A complete PKI was already there and was left alone.
    AlreadyPresent,
}

/// Writes a complete development PKI into `dir` (created if needed): `ca.pem`/`ca.key`,
/// `server.pem`/`server.key` for recommendations and `client.pem`/`client.key` for the
/// marketplace. Key files are created with mode 0600.
///
/// An existing complete PKI is left alone unless `force` is set; a partial one is an error, so a
/// stray file never silently mixes with new ones.
pub fn generate(dir: &Path, force: bool) -> Result<Generated> {
    let present: Vec<&str> = FILES
        .iter()
        .copied()
        .filter(|f| dir.join(f).exists())
        .collect();
    if !force && present.len() == FILES.len() {
        return Ok(Generated::AlreadyPresent);
    }
    if !force && !present.is_empty() {
        bail!(
            "{}: partial PKI ({} present, {} missing); pass --force to recreate all of it",
            dir.display(),
            present.join(", "),
            FILES
                .iter()
                .filter(|f| !present.contains(f))
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    DevPki::new()?.write(dir)?;
    Ok(Generated::Created)
}

/// Copies each service's files ([`SHARES`]) from the PKI in `pki` into `<into>/<service>/`
/// (created if needed): what docker-compose.yaml mounts into each container, so no long-running
/// container can read the CA's key or another service's key. A file that differs is replaced
/// (a renewed PKI reaches the services at their next reload); an identical one is left alone.
pub fn share(pki: &Path, into: &Path) -> Result<()> {
    for (service, files) in SHARES {
        let dir = into.join(service);
        fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        for file in *files {
            let from = pki.join(file);
            let contents = fs::read_to_string(&from)
                .with_context(|| format!("{}: cannot read", from.display()))?;
            let to = dir.join(file);
            if fs::read_to_string(&to).is_ok_and(|current| current == contents) {
                continue;
            }
            let mode = if file.ends_with(".key") { 0o600 } else { 0o644 };
            write_file(&to, &contents, mode)?;
        }
    }
    Ok(())
}

/// A complete development PKI in memory: the CA (which can issue more) and the two service
/// certificates.
#[derive(Debug)]
pub struct DevPki {
    pub ca: Authority,
    pub server: Issued,
    pub client: Issued,
}

impl DevPki {
    /// A new CA, the recommendations server certificate for [`SERVER_NAMES`] and the marketplace
    /// client certificate for [`CLIENT_NAME`].
    pub fn new() -> Result<Self> {
        let ca = Authority::new("Bookstore development CA")?;
        let server = ca.issue("recommendations", SERVER_NAMES, Usage::Server)?;
        let client = ca.issue(CLIENT_NAME, &[CLIENT_NAME], Usage::Client)?;
        Ok(DevPki { ca, server, client })
    }

    /// Writes the six files of [`FILES`] into `dir` (created if needed), overwriting.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        for (stem, issued) in [
            ("ca", self.ca.issued()),
            ("server", &self.server),
            ("client", &self.client),
        ] {
            write_issued(dir, stem, issued)?;
        }
        Ok(())
    }
}

/// Writes `issued` as `<stem>.pem` and `<stem>.key` (mode 0600) in `dir`.
pub fn write_issued(dir: &Path, stem: &str, issued: &Issued) -> Result<()> {
    write_file(&dir.join(format!("{stem}.pem")), &issued.cert_pem, 0o644)?;
    write_file(&dir.join(format!("{stem}.key")), &issued.key_pem, 0o600)
}

/// Writes `contents` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file, with `mode` set from creation (a key is never world-readable, even briefly).
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options
        .open(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use x509_parser::{extensions::GeneralName, prelude::*};

    use super::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        pem.contents
    }

    #[test]
    fn the_server_certificate_is_v3_with_every_service_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            generate(dir.path(), false).expect("generate"),
            Generated::Created
        );
        let der = parse(&fs::read_to_string(dir.path().join("server.pem")).expect("read"));
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        assert_eq!(cert.version(), X509Version::V3);
        let sans = cert
            .subject_alternative_name()
            .expect("ext")
            .expect("SAN present");
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).expect("4")).to_string()
                }
                GeneralName::IPAddress(b) => {
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).expect("16")).to_string()
                }
                other => format!("{other:?}"),
            })
            .collect();
        for want in SERVER_NAMES {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        let eku = cert
            .extended_key_usage()
            .expect("ext")
            .expect("EKU present");
        assert!(eku.value.server_auth && !eku.value.client_auth);
    }

    #[test]
    fn the_client_certificate_is_for_client_auth_as_marketplace() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), false).expect("generate");
        let der = parse(&fs::read_to_string(dir.path().join("client.pem")).expect("read"));
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        let cn = cert.subject().iter_common_name().next().expect("CN");
        assert_eq!(cn.as_str().expect("utf8"), CLIENT_NAME);
        let eku = cert
            .extended_key_usage()
            .expect("ext")
            .expect("EKU present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), false).expect("generate");
        for key in ["ca.key", "server.key", "client.key"] {
            let mode = fs::metadata(dir.path().join(key))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    #[test]
    fn an_existing_pki_is_kept_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), false).expect("generate");
        let before = fs::read(dir.path().join("ca.pem")).expect("read");
        assert_eq!(
            generate(dir.path(), false).expect("again"),
            Generated::AlreadyPresent
        );
        assert_eq!(fs::read(dir.path().join("ca.pem")).expect("read"), before);
        assert_eq!(
            generate(dir.path(), true).expect("forced"),
            Generated::Created
        );
        assert_ne!(fs::read(dir.path().join("ca.pem")).expect("read"), before);
    }

    #[test]
    fn each_service_share_holds_its_own_files_and_never_the_ca_key() {
        let (pki, shared) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        generate(pki.path(), false).expect("generate");
        share(pki.path(), shared.path()).expect("share");
        for (service, files) in SHARES {
            let mut found: Vec<String> = fs::read_dir(shared.path().join(service))
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            found.sort();
            let mut want: Vec<String> = files.iter().map(|f| (*f).to_owned()).collect();
            want.sort();
            assert_eq!(found, want, "{service}");
            for file in *files {
                assert_eq!(
                    fs::read(shared.path().join(service).join(file)).expect("read"),
                    fs::read(pki.path().join(file)).expect("read"),
                    "{service}/{file}"
                );
            }
        }
        // A renewed PKI replaces the copies.
        generate(pki.path(), true).expect("renew");
        share(pki.path(), shared.path()).expect("share again");
        assert_eq!(
            fs::read(shared.path().join("marketplace/client.pem")).expect("read"),
            fs::read(pki.path().join("client.pem")).expect("read")
        );
    }

    #[test]
    fn a_partial_pki_is_an_error_naming_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), false).expect("generate");
        fs::remove_file(dir.path().join("client.key")).expect("rm");
        let err = generate(dir.path(), false).expect_err("partial");
        assert!(
            err.to_string().contains("client.key missing") || err.to_string().contains("missing")
        );
        assert!(err.to_string().contains("client.key"), "{err}");
    }
}
