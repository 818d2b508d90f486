//! Where the API server's TLS material comes from: PEM files (`--tls-cert`, `--tls-key`,
//! `--tls-client-ca`) or PEM documents in environment variables (`SETPOINT_TLS_CERT_PEM`,
//! `SETPOINT_TLS_KEY_PEM`, `SETPOINT_TLS_CLIENT_CA_PEM`), the way a secrets store hands them to
//! a container (ECS `secrets`, Kubernetes `secretKeyRef`) whose file system is read-only.
//!
//! The PEM variables have no command-line flags on purpose: a private key on a command line is
//! visible to every user of the machine (`ps`). Nothing here ever shows a PEM value: not in
//! `Debug`, not in an error.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The environment variable holding the server certificate chain (PEM).
pub const CERT_PEM_VAR: &str = "SETPOINT_TLS_CERT_PEM";
/// The environment variable holding the server private key (PEM).
pub const KEY_PEM_VAR: &str = "SETPOINT_TLS_KEY_PEM";
/// The environment variable holding the CA client certificates must chain to (PEM).
pub const CLIENT_CA_PEM_VAR: &str = "SETPOINT_TLS_CLIENT_CA_PEM";

/// One PEM document: a file read when the server starts, or the document itself.
#[derive(Clone)]
pub enum PemSource {
    /// A PEM file.
    File(PathBuf),
    /// A PEM document taken from the environment variable `var`.
    Inline {
        /// Where it came from (named in errors instead of the value).
        var: &'static str,
        /// The document.
        pem: Arc<str>,
    },
}

impl fmt::Debug for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Inline { var, .. } => write!(f, "Inline({var}, redacted)"),
        }
    }
}

impl fmt::Display for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Inline { var, .. } => write!(f, "${var}"),
        }
    }
}

/// Why TLS material could not be used. The messages name files and variables, never the
/// contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A TLS file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error (in the message itself, so it is not a `source` shown twice).
        error: std::io::Error,
    },
    /// The settings do not fit together, or a value is not PEM.
    #[error("{0}")]
    Settings(String),
    /// The certificate, key or client CA cannot be used (malformed, or a key that does not
    /// match the certificate).
    #[error("the API's TLS material ({what}) is not usable: {reason}")]
    Unusable {
        /// Where the material came from (names only).
        what: String,
        /// What the TLS library said.
        reason: String,
    },
}

impl PemSource {
    /// The PEM bytes (a file is read now).
    ///
    /// # Errors
    /// [`TlsError::Read`] when the file cannot be read.
    pub fn load(&self) -> Result<Vec<u8>, TlsError> {
        match self {
            Self::File(path) => std::fs::read(path).map_err(|error| TlsError::Read {
                path: path.clone(),
                error,
            }),
            Self::Inline { pem, .. } => Ok(pem.as_bytes().to_vec()),
        }
    }

    /// The document in environment variable `var`, when it is set and not blank.
    ///
    /// A value stored on one line with literal `\n` sequences (as some secret stores and
    /// `.env` files keep it) is accepted too.
    ///
    /// # Errors
    /// [`TlsError::Settings`] when the value holds no PEM block.
    pub fn from_env(
        var: &'static str,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TlsError> {
        let Some(value) = get(var).filter(|v| !v.trim().is_empty()) else {
            return Ok(None);
        };
        let value = if value.contains('\n') {
            value
        } else {
            value.replace("\\n", "\n")
        };
        if !value.contains("-----BEGIN ") {
            return Err(TlsError::Settings(format!(
                "{var} does not hold a PEM document (no \"-----BEGIN\" line); the value is not \
                 shown"
            )));
        }
        Ok(Some(Self::Inline {
            var,
            pem: value.trim().to_owned().into(),
        }))
    }
}

/// The server's TLS: its certificate chain and key, and optionally the CA that client
/// certificates must chain to (mutual TLS; without it any client may connect, and the bearer
/// token still decides what it may do).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Server certificate chain.
    pub cert: PemSource,
    /// Server private key.
    pub key: PemSource,
    /// CA client certificates must chain to; `None` asks for no client certificate.
    pub client_ca: Option<PemSource>,
}

impl TlsConfig {
    /// TLS from three PEM files.
    pub fn from_files(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Self {
        Self {
            cert: PemSource::File(cert),
            key: PemSource::File(key),
            client_ca: client_ca.map(PemSource::File),
        }
    }

    /// The TLS a server's settings describe; `None` when none of them is given (plaintext).
    /// `items` holds, for the certificate, the key and the client CA in that order, the path
    /// from the flag (or its environment variable) and the path from the configuration file.
    /// Each item comes from its flag, else its PEM variable (read with `get`), else the file.
    ///
    /// # Errors
    /// [`TlsError::Settings`] when one item is given both by flag and by PEM variable, a
    /// certificate comes without its key (or the reverse), a client CA comes without a server
    /// certificate, or a PEM variable holds no PEM.
    pub fn resolve(
        items: [(Option<PathBuf>, Option<PathBuf>); 3],
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TlsError> {
        let [cert, key, client_ca] = items;
        let one = |flag: &str,
                   (path, file_path): (Option<PathBuf>, Option<PathBuf>),
                   var: &'static str|
         -> Result<Option<PemSource>, TlsError> {
            match (path, PemSource::from_env(var, get)?) {
                (Some(_), Some(_)) => Err(TlsError::Settings(format!(
                    "{flag} and {var} are both set: give each TLS item one way"
                ))),
                (Some(path), None) => Ok(Some(PemSource::File(path))),
                (None, Some(inline)) => Ok(Some(inline)),
                (None, None) => Ok(file_path.map(PemSource::File)),
            }
        };
        let cert = one("--tls-cert (SETPOINT_TLS_CERT)", cert, CERT_PEM_VAR)?;
        let key = one("--tls-key (SETPOINT_TLS_KEY)", key, KEY_PEM_VAR)?;
        let client_ca = one(
            "--tls-client-ca (SETPOINT_TLS_CLIENT_CA)",
            client_ca,
            CLIENT_CA_PEM_VAR,
        )?;
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert,
                key,
                client_ca,
            })),
            (Some(_), None) => Err(TlsError::Settings(format!(
                "a TLS certificate without its private key: set --tls-key (SETPOINT_TLS_KEY), \
                 {KEY_PEM_VAR} or api.tls_key"
            ))),
            (None, Some(_)) => Err(TlsError::Settings(format!(
                "a TLS private key without its certificate: set --tls-cert (SETPOINT_TLS_CERT), \
                 {CERT_PEM_VAR} or api.tls_cert"
            ))),
            (None, None) if client_ca.is_some() => Err(TlsError::Settings(format!(
                "a client CA without a server certificate: mutual TLS needs the server's \
                 certificate and key too (--tls-cert and --tls-key, {CERT_PEM_VAR} and \
                 {KEY_PEM_VAR}, or api.tls_cert and api.tls_key)"
            ))),
            (None, None) => Ok(None),
        }
    }

    /// The material, each item read once, checked to hold the kind of PEM block it must: the
    /// commonest mistake (a certificate and a key swapped) is then named by its item.
    fn load(&self) -> Result<Loaded, TlsError> {
        let cert = self.cert.load()?;
        expect_section(&self.cert, &cert, Section::Certificate, "certificate")?;
        let key = self.key.load()?;
        expect_section(&self.key, &key, Section::PrivateKey, "private key")?;
        let client_ca = match &self.client_ca {
            Some(src) => {
                let ca = src.load()?;
                expect_section(src, &ca, Section::Certificate, "CA certificate")?;
                Some(ca)
            }
            None => None,
        };
        Ok(Loaded {
            cert,
            key,
            client_ca,
        })
    }

    /// `server` serving this TLS (files are read now, once, and the material parsed), and when
    /// the server certificate (the first of the chain) expires, if that can be read from it.
    ///
    /// # Errors
    /// [`TlsError::Read`] for an unreadable file, [`TlsError::Settings`] for an item without
    /// the PEM block it needs, [`TlsError::Unusable`] for material the TLS library refuses.
    pub fn apply(
        &self,
        server: tonic::transport::Server,
    ) -> Result<(tonic::transport::Server, Option<DateTime<Utc>>), TlsError> {
        let loaded = self.load()?;
        let not_after = super::cert_expiry::not_after(&loaded.cert);
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(loaded.cert, loaded.key));
        if let Some(ca) = loaded.client_ca {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        let server = server.tls_config(config).map_err(|e| TlsError::Unusable {
            what: self.describe(),
            reason: error_chain(&e),
        })?;
        Ok((server, not_after))
    }

    /// Loads and parses the material as the server will, without serving: a start-up check
    /// that can fail before anything else starts.
    ///
    /// # Errors
    /// As [`TlsConfig::apply`].
    pub fn check(&self) -> Result<(), TlsError> {
        self.apply(tonic::transport::Server::builder()).map(drop)
    }

    /// A rustls configuration of this material for an HTTPS listener of the engine's own (the
    /// web console), offering the `alpn` protocols: the same certificate and key, and, with a
    /// client CA, the same demand for client certificates that chain to it.
    ///
    /// # Errors
    /// As [`TlsConfig::apply`].
    pub fn rustls_server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let loaded = self.load()?;
        let unusable = |reason: String| TlsError::Unusable {
            what: self.describe(),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(&loaded.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unusable(format!("the certificate chain: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&loaded.key)
            .map_err(|e| unusable(format!("the private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable(e.to_string()))?;
        let builder = match &loaded.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    let c = c.map_err(|e| unusable(format!("the client CA: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| unusable(format!("the client CA: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| unusable(format!("the client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| unusable(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// Where the material comes from, for the start-up log (names only, never contents).
    pub fn describe(&self) -> String {
        match &self.client_ca {
            Some(ca) => format!(
                "certificate {}, key {}, client CA {ca} (mutual TLS)",
                self.cert, self.key
            ),
            None => format!("certificate {}, key {}", self.cert, self.key),
        }
    }
}

/// The material of a [`TlsConfig`], read.
struct Loaded {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// What a TLS item must hold.
#[derive(Debug, Clone, Copy)]
enum Section {
    /// A certificate (the server's chain, or a CA).
    Certificate,
    /// A private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Refuses `pem` (read from `src`) unless it holds a readable section of `kind`, naming `src`
/// and `what` it should hold, never the contents.
fn expect_section(src: &PemSource, pem: &[u8], kind: Section, what: &str) -> Result<(), TlsError> {
    let (found, label) = match kind {
        Section::Certificate => (
            CertificateDer::pem_slice_iter(pem)
                .next()
                .is_some_and(|c| c.is_ok()),
            "CERTIFICATE",
        ),
        Section::PrivateKey => (PrivateKeyDer::from_pem_slice(pem).is_ok(), "… PRIVATE KEY"),
    };
    if found {
        Ok(())
    } else {
        Err(TlsError::Settings(format!(
            "{src} holds no {what} (no readable \"-----BEGIN {label}-----\" section); the value \
             is not shown"
        )))
    }
}

/// An error and its sources, one line (tonic's own message is only "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str =
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n";

    fn env(pairs: &[(&'static str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(&'static str, String)> =
            pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }

    fn err(
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
        vars: &[(&'static str, &str)],
    ) -> String {
        TlsConfig::resolve(
            [
                (cert.map(PathBuf::from), None),
                (key.map(PathBuf::from), None),
                (ca.map(PathBuf::from), None),
            ],
            &env(vars),
        )
        .expect_err("refused")
        .to_string()
    }

    #[test]
    fn nothing_given_is_plaintext() {
        let none = TlsConfig::resolve(Default::default(), &env(&[(KEY_PEM_VAR, "  \n")]));
        assert!(none.expect("ok").is_none());
    }

    #[test]
    fn files_and_variables_mix_per_item() {
        let tls = TlsConfig::resolve(
            [
                (Some("/etc/setpoint/cert.pem".into()), None),
                (None, Some("/etc/setpoint/key.pem".into())),
                (None, None),
            ],
            &env(&[(KEY_PEM_VAR, PEM), (CLIENT_CA_PEM_VAR, PEM)]),
        )
        .expect("ok")
        .expect("tls");
        assert!(matches!(tls.cert, PemSource::File(_)));
        // The environment overrides the file.
        assert!(matches!(
            tls.key,
            PemSource::Inline {
                var: KEY_PEM_VAR,
                ..
            }
        ));
        let shown = format!("{tls:?} {}", tls.describe());
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains(KEY_PEM_VAR), "{shown}");
    }

    #[test]
    fn the_file_gives_what_flags_and_variables_do_not() {
        let tls = TlsConfig::resolve(
            [
                (None, Some("cert.pem".into())),
                (None, Some("key.pem".into())),
                (None, None),
            ],
            &env(&[]),
        )
        .expect("ok")
        .expect("tls");
        assert_eq!(tls.describe(), "certificate cert.pem, key key.pem");
    }

    #[test]
    fn one_line_values_with_escaped_newlines_are_pem() {
        let one_line = PEM.replace('\n', "\\n");
        let src = PemSource::from_env(KEY_PEM_VAR, &env(&[(KEY_PEM_VAR, &one_line)]))
            .expect("ok")
            .expect("set");
        assert_eq!(src.load().expect("load"), PEM.trim().as_bytes());
    }

    #[test]
    fn contradictions_and_halves_are_refused_by_name() {
        let e = err(Some("c.pem"), None, None, &[(CERT_PEM_VAR, PEM)]);
        assert!(e.contains("--tls-cert") && e.contains(CERT_PEM_VAR), "{e}");
        let e = err(None, None, None, &[(CERT_PEM_VAR, PEM)]);
        assert!(e.contains("without its private key"), "{e}");
        let e = err(None, None, None, &[(KEY_PEM_VAR, PEM)]);
        assert!(e.contains("without its certificate"), "{e}");
        let e = err(None, None, Some("ca.pem"), &[]);
        assert!(e.contains("client CA without a server certificate"), "{e}");
    }

    #[test]
    fn the_wrong_kind_of_pem_is_refused_by_item_without_showing_it() {
        // A key where the certificate belongs (a swap): the certificate's variable is named.
        let tls = TlsConfig::resolve(
            Default::default(),
            &env(&[(CERT_PEM_VAR, PEM), (KEY_PEM_VAR, PEM)]),
        )
        .expect("ok")
        .expect("tls");
        let e = tls.check().expect_err("not a certificate").to_string();
        assert!(
            e.contains(CERT_PEM_VAR) && e.contains("holds no certificate"),
            "{e}"
        );
        assert!(!e.contains(KEY_PEM_VAR), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn material_the_tls_library_refuses_is_unusable_without_showing_it() {
        let cert = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let tls = TlsConfig::resolve(
            Default::default(),
            &env(&[(CERT_PEM_VAR, cert), (KEY_PEM_VAR, PEM)]),
        )
        .expect("ok")
        .expect("tls");
        let e = tls.check().expect_err("not usable").to_string();
        assert!(e.contains("not usable"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn a_value_that_is_not_pem_is_refused_without_showing_it() {
        let e = err(None, None, None, &[(KEY_PEM_VAR, "hunter2-not-a-key")]);
        assert!(e.contains(KEY_PEM_VAR) && e.contains("PEM"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
