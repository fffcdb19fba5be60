//! Certificate generation: one CA and a certificate with key for each role.
//!
//! Each role's certificate names the role as a DNS subject alternative name
//! (`agent.deltaback`, `process-server.deltaback`, `master-target.deltaback`); that name is
//! what [`crate::tls`] checks, so a certificate of one role cannot pose as another.
//!
//! Layout of a PKI folder:
//! ```text
//! ca.pem  ca-key.pem                       the certificate authority (keep ca-key.pem offline)
//! agent.pem  agent-key.pem                 for deltaback-agent
//! process-server.pem  process-server-key.pem
//! master-target.pem  master-target-key.pem
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};
use crate::tls::Role;

/// How long role certificates stay valid.
pub const CERT_VALIDITY_DAYS: i64 = 825;
/// How long the CA stays valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;

fn pki_err(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

/// Writes a new CA and a certificate and key for every role into `dir`.
///
/// Refuses to overwrite an existing CA unless `force` is set, so a typo cannot invalidate
/// every deployed certificate.
pub fn init(dir: &Path, force: bool) -> Result<()> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() && !force {
        return Err(Error::Invalid(format!(
            "{} already exists; pass --force to replace the whole PKI",
            ca_path.display()
        )));
    }
    fs::create_dir_all(dir).map_err(Error::file("create folder", dir))?;
    let now = OffsetDateTime::now_utc();

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "deltaback CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - Duration::days(1);
    ca_params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let ca_key = KeyPair::generate().map_err(pki_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(pki_err)?;

    for role in Role::ALL {
        let mut params =
            CertificateParams::new(vec![role.dns_name().to_owned()]).map_err(pki_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("deltaback {}", role.name()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(CERT_VALIDITY_DAYS);
        let key = KeyPair::generate().map_err(pki_err)?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(pki_err)?;
        write_file(
            &dir.join(format!("{}.pem", role.name())),
            &cert.pem(),
            0o644,
        )?;
        write_file(
            &dir.join(format!("{}-key.pem", role.name())),
            &key.serialize_pem(),
            0o600,
        )?;
    }
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    write_file(&ca_path, &ca_cert.pem(), 0o644)?;
    Ok(())
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(Error::file("create", path))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(Error::file("write", path))
}
