//! TLS 1.3 with mutual certificates, and the roles certificates stand for.
//!
//! Every connection is TLS 1.3 (rustls, ring provider); nothing listens in plaintext. Both
//! sides present a certificate signed by the deployment's CA ([`crate::wire::pki`]). A client
//! checks that the server's certificate names the role it meant to reach (the process server
//! must be `process-server.deltaback`), and a server checks, after the handshake, that the
//! client's certificate names the one role it serves ([`check_peer_role`]).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
pub use rustls::ClientConfig;
use rustls::{RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// The role a certificate stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs on the source machine and sends its disks.
    Agent,
    /// Relays agents' streams to the master target.
    ProcessServer,
    /// Writes the replicas.
    MasterTarget,
    /// A person (or their automation) running `deltaback` against a master target: points,
    /// status, recover, failover, reprotect, jobs. Every certificate of this role names its
    /// holder, and the master target logs each request with that name.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [
        Role::Agent,
        Role::ProcessServer,
        Role::MasterTarget,
        Role::Operator,
    ];

    /// The role's name, also the stem of its certificate files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
            Role::Operator => "operator",
        }
    }

    /// The role's name in sentences: "agent", "process server", "master target".
    pub fn title(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process server",
            Role::MasterTarget => "master target",
            Role::Operator => "operator",
        }
    }

    /// The DNS name its certificate carries.
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Agent => "agent.deltaback",
            Role::ProcessServer => "process-server.deltaback",
            Role::MasterTarget => "master-target.deltaback",
            Role::Operator => "operator.deltaback",
        }
    }
}

/// The ring provider with AES-128-GCM preferred: as safe for this use and cheaper per byte
/// than AES-256, which matters when the process server decrypts and re-encrypts every block.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn tls_err(e: rustls::Error) -> Error {
    Error::Tls(e.to_string())
}

/// A role's certificate chain and key, and the CA it trusts, loaded from a PKI folder.
pub struct Identity {
    /// The PKI folder it was loaded from (reloaded on SIGHUP).
    dir: std::path::PathBuf,
    role: Role,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// Revocation lists from `crl.pem`, if the folder has one.
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Identity {
    /// Loads `ca.pem`, `<role>.pem` and `<role>-key.pem` from `dir`.
    pub fn load(dir: &Path, role: Role) -> Result<Self> {
        let read_certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| Error::Pki(format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(Error::Pki(format!(
                    "{}: no certificate found",
                    path.display()
                )));
            }
            Ok(certs)
        };
        let ca_path = dir.join("ca.pem");
        let cert_path = dir.join(format!("{}.pem", role.name()));
        let key_path = dir.join(format!("{}-key.pem", role.name()));
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&ca_path)? {
            roots
                .add(ca)
                .map_err(|e| Error::Pki(format!("{}: {e}", ca_path.display())))?;
        }
        let chain = read_certs(&cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| Error::Pki(format!("{}: {e}", key_path.display())))?;
        let crl_path = dir.join("crl.pem");
        let crls = if crl_path.exists() {
            CertificateRevocationListDer::pem_file_iter(&crl_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| Error::Pki(format!("{}: {e}", crl_path.display())))?
        } else {
            Vec::new()
        };
        let identity = Self {
            dir: dir.to_owned(),
            role,
            chain,
            key,
            roots: Arc::new(roots),
            crls,
        };
        if crl_path.exists() {
            identity.check_crls(&crl_path)?;
        }
        Ok(identity)
    }

    /// A `crl.pem` must hold at least one revocation list signed by the CA: one that does
    /// not would make every peer's revocation status unknown (every connection refused), or
    /// hide a real list. Checked by verifying this identity's own certificate against it,
    /// which also catches a service whose own certificate was revoked.
    fn check_crls(&self, path: &Path) -> Result<()> {
        if self.crls.is_empty() {
            return Err(Error::Pki(format!(
                "{} holds no certificate revocation list; restore it from the CA folder \
                 (deltaback pki revoke writes it) or remove it",
                path.display()
            )));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| Error::Pki(format!("{}: {e}", path.display())))?;
        let (own, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| Error::Pki("no certificate to check the revocation list with".into()))?;
        let now = rustls::pki_types::UnixTime::now();
        match verifier.verify_client_cert(own, intermediates, now) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                Err(Error::Pki(format!(
                    "this {}'s own certificate is revoked by {}; issue it a new one",
                    self.role.title(),
                    path.display()
                )))
            }
            // Expiry is checked on every connection; here only the list matters.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. }
                | rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. },
            )) => Ok(()),
            Err(e) => Err(Error::Pki(format!(
                "{} is not a revocation list signed by this CA ({e}); restore it from the CA \
                 folder or remove it",
                path.display()
            ))),
        }
    }

    /// Loads the same identity again from its folder (a new `crl.pem`, say).
    pub fn reload(&self) -> Result<Self> {
        Self::load(&self.dir, self.role)
    }

    /// The role this identity stands for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Server configuration: requires a client certificate from the same CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        Ok(Arc::new(config))
    }

    /// Client configuration: presents this identity and trusts only the CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        Ok(Arc::new(config))
    }
}

/// The server name a client must verify to reach `role`.
pub fn server_name(role: Role) -> Result<ServerName<'static>> {
    ServerName::try_from(role.dns_name()).map_err(|e| Error::Tls(e.to_string()))
}

/// The DNS suffix of the name that binds an agent certificate to one machine:
/// `<machine>.machine.deltaback`.
pub const MACHINE_SUFFIX: &str = ".machine.deltaback";

/// The DNS suffix of the name that says who holds an operator certificate:
/// `<name>.operator.deltaback`.
pub const OPERATOR_SUFFIX: &str = ".operator.deltaback";

/// The subject-alternative DNS name that binds an agent certificate to `machine`, refused
/// when the machine name cannot be one.
pub fn machine_dns_name(machine: &str) -> Result<String> {
    holder_dns_name(Role::Agent, machine)
}

/// The subject-alternative DNS name that binds a certificate to holder `name` of `role`
/// (a machine for agents, a person for operators), refused when the name cannot be one.
pub fn holder_dns_name(role: Role, name: &str) -> Result<String> {
    let (suffix, holder) = match role {
        Role::Operator => (OPERATOR_SUFFIX, "an operator"),
        _ => (MACHINE_SUFFIX, "a machine"),
    };
    let dns = format!("{name}{suffix}");
    rustls::pki_types::DnsName::try_from(dns.as_str()).map_err(|_| {
        Error::Invalid(format!(
            "{name} cannot name {holder} in a certificate: use letters, digits and hyphens, \
             not at the start or end of a dot-separated part"
        ))
    })?;
    Ok(dns)
}

/// The holder name the peer's certificate carries under `suffix`, if any.
fn holder(peer_certs: Option<&[CertificateDer<'_>]>, suffix: &str) -> Option<String> {
    let cert = peer_certs.and_then(|c| c.first())?;
    let end_entity = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = end_entity
        .valid_dns_names()
        .find_map(|name| name.strip_suffix(suffix).map(str::to_owned));
    name
}

/// The operator an operator certificate names. Call only on a certificate the TLS
/// handshake verified.
pub fn bound_operator(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    holder(peer_certs, OPERATOR_SUFFIX)
}

/// The machine an agent certificate is bound to (`pki issue --role agent --name M`), or
/// `None` for a fleet certificate that may speak for any machine (`pki init`'s). Call only
/// on a certificate the TLS handshake verified.
pub fn bound_machine(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    holder(peer_certs, MACHINE_SUFFIX)
}

/// Checks that the peer's end-entity certificate names `expected` (its chain was already
/// verified against the CA during the handshake).
pub fn check_peer_role(peer_certs: Option<&[CertificateDer<'_>]>, expected: Role) -> Result<()> {
    let cert = peer_certs
        .and_then(|c| c.first())
        .ok_or_else(|| Error::Tls("peer presented no certificate".into()))?;
    let end_entity = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| Error::Tls(format!("unreadable peer certificate: {e}")))?;
    end_entity
        .verify_is_valid_for_subject_name(&server_name(expected)?)
        .map_err(|_| {
            Error::Tls(format!(
                "peer certificate does not name the {} role ({})",
                expected.name(),
                expected.dns_name()
            ))
        })
}
