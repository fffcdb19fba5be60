//! Certificate generation: one CA and a certificate with key for each role.
//!
//! Each role's certificate names the role as a DNS subject alternative name
//! (`agent.deltaback`, `process-server.deltaback`, `master-target.deltaback`,
//! `operator.deltaback`); that name is what [`crate::wire::tls`] checks, so a certificate of
//! one role cannot pose as another. Agent and operator certificates issued by name carry a
//! second name binding them to their holder (`<machine>.machine.deltaback`,
//! `<person>.operator.deltaback`).
//!
//! Layout of a PKI folder:
//! ```text
//! ca.pem  ca-key.pem                       the certificate authority (keep ca-key.pem offline)
//! agent.pem  agent-key.pem                 for deltaback-agent
//! process-server.pem  process-server-key.pem
//! master-target.pem  master-target-key.pem
//! operator.pem  operator-key.pem           for the deltaback CLI against a master target
//!                                          (holder "operator")
//! issued.txt                               serial, role, name, expiry of every certificate
//! revoked.txt, crl.pem                     revoked serials and the CA-signed list of them
//! ```
//! `issue` makes more certificates (one per agent machine, say) into a folder of their own,
//! with `ca.pem` and the current `crl.pem` beside them. `revoke` adds a serial to the
//! revocation list; services read `crl.pem` from their PKI folder when they start, and
//! refuse revoked and expired certificates.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};
use crate::wire::tls::Role;

/// How long role certificates stay valid.
pub const CERT_VALIDITY_DAYS: i64 = 825;
/// How long the CA stays valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;

fn pki_err(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

fn ca_params(now: OffsetDateTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "deltaback CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    Ok(params)
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
    let ca_key = KeyPair::generate().map_err(pki_err)?;
    let ca_cert = ca_params(OffsetDateTime::now_utc())?
        .self_signed(&ca_key)
        .map_err(pki_err)?;
    for name in ["issued.txt", "revoked.txt", "crl.pem"] {
        crate::storage::durable::remove(&dir.join(name))?;
    }
    for role in Role::ALL {
        // The operator certificate made here names its holder "operator"; agents' is a
        // fleet certificate, bound to no machine.
        issue_into(
            dir,
            &ca_cert,
            &ca_key,
            role,
            role.name(),
            CERT_VALIDITY_DAYS,
            dir,
            role == Role::Operator,
        )?;
    }
    write_file(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    write_file(&ca_path, &ca_cert.pem(), 0o644)?;
    Ok(())
}

/// The CA of a PKI folder, ready to sign: its key, and its parameters rebuilt around it
/// (signing needs only the issuer's name and key).
fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair)> {
    let key_path = dir.join("ca-key.pem");
    let pem = fs::read_to_string(&key_path).map_err(Error::file("read CA key", &key_path))?;
    let key = KeyPair::from_pem(&pem).map_err(pki_err)?;
    let cert = ca_params(OffsetDateTime::now_utc())?
        .self_signed(&key)
        .map_err(pki_err)?;
    Ok((cert, key))
}

/// Issues a certificate for `role`, named `name`, valid for `days` from now (0: it expires
/// at once, for testing rotation), into `out` (created) with `ca.pem` and `crl.pem` beside
/// it. Returns its serial number. An agent certificate is bound to machine `name`: it can
/// speak only as that machine; an operator certificate names its holder `name`. `name` is checked like a machine name, and `out` must be
/// another folder than the PKI and must not hold that role's certificate already.
pub fn issue(dir: &Path, role: Role, name: &str, days: i64, out: &Path) -> Result<u64> {
    if !(0..=CA_VALIDITY_DAYS).contains(&days) {
        return Err(Error::Invalid(format!(
            "--days {days} is outside 0 to {CA_VALIDITY_DAYS}"
        )));
    }
    crate::block::geometry::SafeName::new("certificate name", name)?;
    let same_folder = match (fs::canonicalize(dir), fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_folder {
        return Err(Error::Invalid(format!(
            "--out {} is the PKI folder itself: issuing there would replace its {} \
             certificate; give a new folder",
            out.display(),
            role.name()
        )));
    }
    let existing = out.join(format!("{}.pem", role.name()));
    if existing.exists() {
        return Err(Error::Invalid(format!(
            "{} exists already; deltaback never overwrites a certificate: give a new folder",
            existing.display()
        )));
    }
    let (ca_cert, ca_key) = load_ca(dir)?;
    fs::create_dir_all(out).map_err(Error::file("create folder", out))?;
    let bind = matches!(role, Role::Agent | Role::Operator);
    let serial = issue_into(dir, &ca_cert, &ca_key, role, name, days, out, bind)?;
    for file in ["ca.pem", "crl.pem"] {
        let from = dir.join(file);
        if from.exists() {
            fs::copy(&from, out.join(file)).map_err(Error::file("copy", &from))?;
        }
    }
    Ok(serial)
}

#[allow(clippy::too_many_arguments)] // one call site each in init and issue, all plain values
fn issue_into(
    dir: &Path,
    ca_cert: &Certificate,
    ca_key: &KeyPair,
    role: Role,
    name: &str,
    days: i64,
    out: &Path,
    bind_holder: bool,
) -> Result<u64> {
    let now = OffsetDateTime::now_utc();
    let serial = loop {
        let candidate = u64::from_be_bytes(rand::random::<[u8; 8]>()) >> 1;
        if candidate != 0 {
            break candidate;
        }
    };
    let mut names = vec![role.dns_name().to_owned()];
    if bind_holder {
        names.push(crate::wire::tls::holder_dns_name(role, name)?);
    }
    let mut params = CertificateParams::new(names).map_err(pki_err)?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("deltaback {} {name}", role.name()),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(SerialNumber::from(serial));
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
    let key = KeyPair::generate().map_err(pki_err)?;
    let cert = params.signed_by(&key, ca_cert, ca_key).map_err(pki_err)?;
    write_file(
        &out.join(format!("{}.pem", role.name())),
        &cert.pem(),
        0o644,
    )?;
    write_file(
        &out.join(format!("{}-key.pem", role.name())),
        &key.serialize_pem(),
        0o600,
    )?;
    let line = format!(
        "{serial:016x} {} {name} {}\n",
        role.name(),
        (now + Duration::days(days)).unix_timestamp()
    );
    append_line(&dir.join("issued.txt"), &line)?;
    Ok(serial)
}

/// Revokes the certificate with serial `serial` (hexadecimal, as `issued.txt` lists it)
/// and rewrites `crl.pem`. Copy the new `crl.pem` into every service's PKI folder.
pub fn revoke(dir: &Path, serial_hex: &str) -> Result<()> {
    let serial = u64::from_str_radix(serial_hex.trim(), 16)
        .map_err(|_| Error::Invalid(format!("serial {serial_hex:?} is not hexadecimal")))?;
    let issued = fs::read_to_string(dir.join("issued.txt")).unwrap_or_default();
    if !issued
        .lines()
        .any(|l| l.starts_with(&format!("{serial:016x} ")))
    {
        return Err(Error::Invalid(format!(
            "no certificate with serial {serial:016x} was issued from {}",
            dir.display()
        )));
    }
    let revoked_path = dir.join("revoked.txt");
    let mut revoked: Vec<u64> = fs::read_to_string(&revoked_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .collect();
    if !revoked.contains(&serial) {
        revoked.push(serial);
        append_line(&revoked_path, &format!("{serial:016x}\n"))?;
    }
    let (ca_cert, ca_key) = load_ca(dir)?;
    let now = OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CA_VALIDITY_DAYS),
        crl_number: SerialNumber::from(u64::try_from(revoked.len()).unwrap_or(u64::MAX)),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|&s| RevokedCertParams {
                serial_number: SerialNumber::from(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca_cert, &ca_key)
    .map_err(pki_err)?;
    write_file(&dir.join("crl.pem"), &crl.pem().map_err(pki_err)?, 0o644)
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(Error::file("open", path))?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(Error::file("write", path))
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
