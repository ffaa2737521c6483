use std::fs;

use rcgen::{CertificateParams, KeyPair};
use time::{Duration, OffsetDateTime};

use super::*;

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, contents).expect("write test file");
    p
}

fn self_signed(not_before: OffsetDateTime, not_after: OffsetDateTime) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.self_signed(&key).expect("cert");
    (cert.pem(), key.serialize_pem())
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .to_vec()
}

#[test]
fn identities_come_from_uri_and_dns_sans_before_the_common_name() {
    let ca = bookstore_certs::Authority::new("CA").expect("ca");
    let spiffe = ca
        .issue(
            "ignored-cn",
            &["spiffe://bookstore/marketplace", "marketplace"],
            bookstore_certs::Usage::Client,
        )
        .expect("cert");
    assert_eq!(
        identities(&der(&spiffe.cert_pem)),
        vec!["spiffe://bookstore/marketplace", "marketplace"]
    );
    let cn_only = ca
        .issue("legacy-client", &[], bookstore_certs::Usage::Client)
        .expect("cert");
    assert_eq!(identities(&der(&cn_only.cert_pem)), vec!["legacy-client"]);
    assert!(identities(b"not a certificate").is_empty());
}

#[test]
fn the_generated_pki_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    bookstore_certs::generate(dir.path(), false).expect("generate");
    for role in [Role::Server, Role::Client] {
        let files = TlsFiles::in_dir(dir.path(), role);
        load_ca(&files.ca).expect("ca");
        load_identity(&files.cert, &files.key).expect("identity");
    }
}

#[cfg(unix)]
#[test]
fn a_key_readable_by_others_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    bookstore_certs::generate(dir.path(), false).expect("generate");
    let key = dir.path().join("server.key");
    assert_eq!(key_exposure(&key), None);
    // Shared with the group, as Kubernetes does for a pod's fsGroup: fine.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(key_exposure(&key), None);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let warning = key_exposure(&key).expect("a warning");
    assert!(warning.contains("mode 644"), "{warning}");
}

#[test]
fn a_missing_file_is_named() {
    let err = load_ca(Path::new("/nonexistent/ca.pem")).expect_err("must fail");
    assert!(matches!(err, TlsError::Read { .. }));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/ca.pem: cannot read")
    );
}

#[test]
fn a_file_that_is_not_pem_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "ca.pem", "hello, not a certificate\n");
    let err = load_ca(&p).expect_err("must fail");
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem"));
}

#[test]
fn an_expired_certificate_is_refused() {
    let now = OffsetDateTime::now_utc();
    let (cert, key) = self_signed(now - Duration::days(10), now - Duration::days(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = write(dir.path(), "server.pem", cert);
    let k = write(dir.path(), "server.key", key);
    let err = load_identity(&c, &k).expect_err("must fail");
    assert!(matches!(err, TlsError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("server.pem: certificate expired"));
}

#[test]
fn a_certificate_not_yet_valid_is_refused() {
    let now = OffsetDateTime::now_utc();
    let (cert, _) = self_signed(now + Duration::days(1), now + Duration::days(10));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = write(dir.path(), "ca.pem", cert);
    let err = load_ca(&c).expect_err("must fail");
    assert!(matches!(err, TlsError::NotYetValid { .. }), "{err}");
    assert!(!err.is_early(), "a day ahead is no clock difference");
}

#[test]
fn a_certificate_starting_within_the_clock_leeway_is_early_and_a_ca_one_is_trusted() {
    let now = OffsetDateTime::now_utc();
    let (cert, key) = self_signed(now + Duration::minutes(2), now + Duration::days(10));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = write(dir.path(), "server.pem", cert);
    let k = write(dir.path(), "server.key", key);
    let err = load_identity(&c, &k).expect_err("not valid yet");
    assert!(err.is_early(), "{err}");
    assert_eq!(load_trust(&c).expect("trusted").ders.len(), 1);
}

#[test]
fn an_expired_ca_in_a_bundle_is_skipped_and_the_others_are_used() {
    let now = OffsetDateTime::now_utc();
    let (old, _) = self_signed(now - Duration::days(400), now - Duration::days(1));
    let (current, _) = self_signed(now - Duration::days(1), now + Duration::days(300));
    let (next, _) = self_signed(now - Duration::days(1), now + Duration::days(700));
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = write(
        dir.path(),
        "ca.pem",
        format!("# the overlap bundle\n{old}{current}\n{next}"),
    );
    let ders = load_ca_ders(&bundle).expect("a bundle with usable CAs loads");
    assert_eq!(ders, vec![der(&current).into(), der(&next).into()]);
    let trust = load_trust(&bundle).expect("trust");
    assert_eq!(
        CertificateDer::pem_slice_iter(&trust.pem)
            .collect::<Result<Vec<_>, _>>()
            .expect("the PEM given to tonic parses"),
        ders
    );
    load_ca(&bundle).expect("the client's loader agrees");

    // Only expired ones: refused, naming the file and the date.
    let expired = write(dir.path(), "old.pem", &old);
    let err = load_ca(&expired).expect_err("nothing usable");
    assert!(matches!(err, TlsError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("old.pem: certificate expired"));

    // A block that is not a certificate still refuses the whole file.
    let broken = write(
        dir.path(),
        "broken.pem",
        format!("{current}-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"),
    );
    assert!(matches!(
        load_ca(&broken).expect_err("broken"),
        TlsError::BadCertificate { .. }
    ));
}

#[test]
#[cfg(feature = "service")]
fn expiry_gauges_show_the_identity_and_the_last_ca_to_expire() {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("ns");
    let (leaf, key) = self_signed(now - Duration::days(1), now + Duration::days(30));
    let (ca_soon, _) = self_signed(now - Duration::days(1), now + Duration::days(20));
    let (ca_late, _) = self_signed(now - Duration::days(1), now + Duration::days(900));
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = write(dir.path(), "server.pem", leaf);
    write(dir.path(), "server.key", key);
    let ca = write(dir.path(), "ca.pem", format!("{ca_late}{ca_soon}"));
    let metrics = crate::metrics::Metrics::new("t", "0");
    record_expiry(&metrics, Some(&cert), Some(&ca));
    let text = metrics.render();
    for (certificate, at) in [
        ("identity", now + Duration::days(30)),
        ("trust", now + Duration::days(900)),
    ] {
        let line = format!(
            "bookstore_tls_certificate_expiry_timestamp_seconds{{certificate=\"{certificate}\"}} {}",
            at.unix_timestamp()
        );
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let now = OffsetDateTime::now_utc();
    let (cert, _) = self_signed(now - Duration::days(1), now + Duration::days(1));
    let (_, other_key) = self_signed(now - Duration::days(1), now + Duration::days(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = write(dir.path(), "server.pem", cert);
    let k = write(dir.path(), "server.key", other_key);
    let err = load_identity(&c, &k).expect_err("must fail");
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("server.key: private key does not match the certificate")
    );
}

#[test]
fn a_key_file_without_a_key_is_refused_without_echoing_it() {
    let now = OffsetDateTime::now_utc();
    let (cert, _) = self_signed(now - Duration::days(1), now + Duration::days(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = write(dir.path(), "server.pem", &cert);
    // A certificate where the key should be: a classic copy-paste slip.
    let k = write(dir.path(), "server.key", &cert);
    let err = load_identity(&c, &k).expect_err("must fail");
    assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
    let body_line = cert.lines().nth(1).expect("a PEM body line");
    assert!(
        !err.to_string().contains(body_line),
        "the file's contents leaked: {err}"
    );
}
