//! TLS for either side of a route: certificates and keys read from PEM files at start (a file
//! that is missing, holds nothing usable, or a key that does not match its certificate stops
//! the start with the file's name), the rustls configurations built from them (the `ring`
//! provider), and the handshakes.
//!
//! Private keys are never logged or displayed: errors name the file, never its content.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The TLS options of one route, as given (flags or routes-file fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// The listener's certificate chain and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Require client certificates signed by these CAs.
    pub client_ca: Option<PathBuf>,
    /// Trust these CAs for the broker (default: the platform's roots).
    pub upstream_ca: Option<PathBuf>,
    /// The client certificate the proxy presents to the broker.
    pub upstream_cert: Option<PathBuf>,
    pub upstream_key: Option<PathBuf>,
    /// SNI and verification name, when it differs from the upstream host.
    pub upstream_server_name: Option<String>,
    /// Accept any broker certificate (logged as a warning).
    pub upstream_insecure: bool,
}

impl TlsOptions {
    /// The first listener option given (its flag), if any.
    pub fn listener_given(&self) -> Option<&'static str> {
        first_given(&[
            ("--tls-cert", self.cert.is_some()),
            ("--tls-key", self.key.is_some()),
            ("--tls-client-ca", self.client_ca.is_some()),
        ])
    }

    /// The first upstream option given (its flag), if any.
    pub fn upstream_given(&self) -> Option<&'static str> {
        first_given(&[
            ("--upstream-ca", self.upstream_ca.is_some()),
            ("--upstream-cert", self.upstream_cert.is_some()),
            ("--upstream-key", self.upstream_key.is_some()),
            ("--upstream-server-name", self.upstream_server_name.is_some()),
            ("--upstream-insecure", self.upstream_insecure),
        ])
    }
}

fn first_given(options: &[(&'static str, bool)]) -> Option<&'static str> {
    options.iter().find_map(|&(flag, given)| given.then_some(flag))
}

/// Why a TLS configuration could not be built; `field` names the flag or routes-file field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}{}{file}: {message}", if file.is_empty() { "" } else { " " })]
pub struct TlsError {
    pub field: &'static str,
    pub file: String,
    pub message: String,
}

/// A listener's TLS: the server configuration (ALPN is echoed per connection).
pub struct ServerSide {
    pub config: Arc<ServerConfig>,
    /// Whether client certificates are required (`--tls-client-ca`).
    pub client_auth: bool,
}

/// An upstream's TLS: the client configuration and the name it verifies.
pub struct ClientSide {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    pub insecure: bool,
}

impl std::fmt::Debug for ServerSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSide").field("client_auth", &self.client_auth).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ClientSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSide")
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError { field, file: path.display().to_string(), message };
    std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")".into()));
    }
    Ok(certs)
}

fn key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |message: String| TlsError { field, file: path.display().to_string(), message };
    std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    // The parser's own error could quote key material; say only what kind of problem it is.
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            err("holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into())
        }
        rustls_pki_types::pem::Error::Io(e) => err(e.to_string()),
        _ => err("not a readable PEM private key".into()),
    })
}

fn roots(field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(field, path)? {
        store.add(cert).map_err(|e| TlsError {
            field,
            file: path.display().to_string(),
            message: format!("a certificate is not a usable CA: {e}"),
        })?;
    }
    Ok(store)
}

/// The certificate chain and key, checked to belong together.
fn certified(
    fields: (&'static str, &'static str),
    cert: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs(fields.0, cert)?;
    let key = key(fields.1, key_file)?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), provider).map_err(|e| TlsError {
        field: fields.1,
        file: key_file.display().to_string(),
        message: match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("does not match the certificate in {}", cert.display())
            }
            _ => format!("cannot be used with the certificate in {}: {e}", cert.display()),
        },
    })?;
    Ok((chain, key))
}

/// The listener side of a `mqtts`/`wss` route.
pub fn server_side(o: &TlsOptions) -> Result<ServerSide, TlsError> {
    let (Some(cert), Some(key_file)) = (&o.cert, &o.key) else {
        let (field, missing) =
            if o.cert.is_none() { ("--tls-cert", "certificate") } else { ("--tls-key", "private key") };
        return Err(TlsError {
            field,
            file: String::new(),
            message: format!("a TLS listener needs its {missing} (PEM file)"),
        });
    };
    let provider = provider();
    let (chain, key) = certified(("--tls-cert", "--tls-key"), cert, key_file, &provider)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { field: "--tls-cert", file: String::new(), message: e.to_string() })?;
    let builder = match &o.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("--tls-client-ca", ca)?),
                provider,
            )
            .build()
            .map_err(|e| TlsError {
                field: "--tls-client-ca",
                file: ca.display().to_string(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| TlsError {
        field: "--tls-cert",
        file: cert.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(ServerSide { config: Arc::new(config), client_auth: o.client_ca.is_some() })
}

/// The upstream side of a route to `mqtts`/`wss` broker at `host` (its host name or address).
pub fn client_side(o: &TlsOptions, host: &str) -> Result<ClientSide, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError { field: "--upstream-ca", file: String::new(), message: e.to_string() })?;
    let builder = if o.upstream_insecure {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
    } else {
        let store = match &o.upstream_ca {
            Some(ca) => roots("--upstream-ca", ca)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError {
                        field: "--upstream-ca",
                        file: String::new(),
                        message: "the platform has no usable root certificates: give the broker's CA with --upstream-ca FILE".into(),
                    });
                }
                store
            }
        };
        builder.with_root_certificates(store)
    };
    let config = match (&o.upstream_cert, &o.upstream_key) {
        (Some(cert), Some(key_file)) => {
            let (chain, key) = certified(("--upstream-cert", "--upstream-key"), cert, key_file, &provider)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| TlsError {
                field: "--upstream-cert",
                file: cert.display().to_string(),
                message: e.to_string(),
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) | (None, Some(_)) => {
            return Err(TlsError {
                field: "--upstream-cert",
                file: String::new(),
                message: "--upstream-cert and --upstream-key go together".into(),
            });
        }
    };
    let name = o.upstream_server_name.as_deref().unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| TlsError {
        field: "--upstream-server-name",
        file: String::new(),
        message: format!("{name:?} is not a valid TLS server name: {e}"),
    })?;
    Ok(ClientSide { config: Arc::new(config), server_name, insecure: o.upstream_insecure })
}

/// `--upstream-insecure`: accepts any certificate, but still checks the handshake signatures
/// (so the session keys are the peer's).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a TLS handshake settled, for the connection record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsInfo {
    /// `TLSv1_3`, `TLSv1_2`.
    pub version: Option<String>,
    pub cipher_suite: Option<String>,
    /// The server name the client asked for (listener side) or the proxy sent (upstream side).
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// Whether the peer presented a certificate (listener side: a client certificate).
    pub peer_certificate: bool,
    /// The subject CN of the peer's certificate (rules match it as `cert_cn`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_cn: Option<String>,
    /// Its subject alternative names (DNS names, IP addresses, e-mail addresses, URIs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_sans: Vec<String>,
}

impl TlsInfo {
    pub fn of(conn: &rustls::CommonState, sni: Option<String>) -> TlsInfo {
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        let (peer_cn, peer_sans) = leaf.map(|c| subject_names(c.as_ref())).unwrap_or_default();
        TlsInfo {
            version: conn.protocol_version().map(|v| format!("{v:?}")),
            cipher_suite: conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())),
            sni,
            alpn: conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
            peer_certificate: leaf.is_some(),
            peer_cn,
            peer_sans,
        }
    }
}

/// One DER element: its tag, its content, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |l, &b| (l << 8) | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The subject CN and the subject alternative names of a DER certificate; what cannot be read
/// is left out (the certificate was verified by rustls; this only names it).
pub fn subject_names(cert: &[u8]) -> (Option<String>, Vec<String>) {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut cn = None;
    let mut sans = Vec::new();
    let Some((_, cert, _)) = der(cert) else { return (cn, sans) };
    let Some((_, tbs, _)) = der(cert) else { return (cn, sans) };
    // version [0] (optional), serial, signature, issuer, validity, subject, key, then [1]–[3].
    let mut fields = Vec::new();
    let mut rest = tbs;
    while let Some((tag, content, next)) = der(rest) {
        fields.push((tag, content));
        rest = next;
    }
    let skip = usize::from(fields.first().is_some_and(|f| f.0 == 0xa0));
    if let Some((0x30, subject)) = fields.get(skip + 4).copied() {
        let mut rdns = subject;
        while let Some((_, set, next)) = der(rdns) {
            if let Some((_, pair, _)) = der(set)
                && let Some((0x06, oid, value)) = der(pair)
                && oid == CN
                && let Some((_, v, _)) = der(value)
            {
                cn = Some(text(v));
            }
            rdns = next;
        }
    }
    if let Some((_, extensions)) = fields.iter().find(|f| f.0 == 0xa3).copied()
        && let Some((_, mut list, _)) = der(extensions)
    {
        while let Some((_, ext, next)) = der(list) {
            if let Some((0x06, oid, after)) = der(ext)
                && oid == SAN
            {
                // Skip the optional `critical` BOOLEAN; then an OCTET STRING holding the names.
                let after = match der(after) {
                    Some((0x01, _, more)) => more,
                    _ => after,
                };
                if let Some((0x04, octets, _)) = der(after)
                    && let Some((_, mut names, _)) = der(octets)
                {
                    while let Some((tag, v, more)) = der(names) {
                        match tag {
                            0x81 | 0x82 | 0x86 => sans.push(text(v)),
                            0x87 if v.len() == 4 => {
                                sans.push(std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]).to_string())
                            }
                            0x87 if v.len() == 16 => {
                                let b: [u8; 16] = v.try_into().expect("checked length");
                                sans.push(std::net::Ipv6Addr::from(b).to_string());
                            }
                            _ => {}
                        }
                        names = more;
                    }
                }
            }
            list = next;
        }
    }
    (cn, sans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_cn_and_alternative_names_are_read_from_a_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![
            "device-7.plant.example".to_string(),
            "10.0.0.7".to_string(),
            "::1".to_string(),
        ])
        .unwrap();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "Plant A");
        params.distinguished_name.push(rcgen::DnType::CommonName, "device-7");
        let cert = params.self_signed(&key).unwrap();
        let (cn, sans) = subject_names(cert.der());
        assert_eq!(cn.as_deref(), Some("device-7"));
        assert_eq!(sans, ["device-7.plant.example", "10.0.0.7", "::1"]);
        // Without a CN or alternative names: nothing, and no panic on any prefix of the bytes.
        let bare = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
        assert_eq!(subject_names(bare.der()).1, Vec::<String>::new());
        for n in 0..cert.der().len() {
            let _ = subject_names(&cert.der()[..n]);
        }
    }
}

/// A short, stable name for why a handshake failed (the metric's `reason` label).
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::ConnectionReset => "reset",
            std::io::ErrorKind::InvalidData => "not_tls",
            _ => "io",
        };
    };
    use rustls::{CertificateError, Error, PeerIncompatible};
    match inner {
        // No TLS version both speak: the proxy speaks 1.2 and 1.3. A TLS 1.0 or 1.1 hello is
        // refused for the signature algorithms extension it cannot carry, before its version.
        Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::SignatureAlgorithmsExtensionRequired,
        ) => "protocol_version",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "wrong_name",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidMessage(_) => "not_tls",
        Error::AlertReceived(_) => "alert",
        Error::PeerIncompatible(_) | Error::PeerMisbehaved(_) => "incompatible",
        _ => "other",
    }
}

/// A route's TLS, loaded at start: the listener's and the upstream's configurations, for the
/// sides whose address is `mqtts://`.
#[derive(Clone, Default)]
pub struct RouteTls {
    pub options: TlsOptions,
    pub listen: Option<Arc<ServerSide>>,
    pub upstream: Option<Arc<ClientSide>>,
}

impl PartialEq for RouteTls {
    fn eq(&self, other: &Self) -> bool {
        self.options == other.options
            && self.listen.is_some() == other.listen.is_some()
            && self.upstream.is_some() == other.upstream.is_some()
    }
}

impl Eq for RouteTls {}

impl std::fmt::Debug for RouteTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTls")
            .field("listen", &self.listen.is_some())
            .field("upstream", &self.upstream.is_some())
            .finish()
    }
}

impl RouteTls {
    /// Loads what the route's transports need from `options`; options for a side that is not
    /// TLS are refused (they would silently do nothing).
    pub fn load(
        options: TlsOptions,
        listen: crate::transport::Transport,
        upstream: crate::transport::Transport,
        upstream_addr: &str,
    ) -> Result<RouteTls, TlsError> {
        let unused = |field: &'static str, side: &str| TlsError {
            field,
            file: String::new(),
            message: format!(
                "only applies to a TLS {side}: write it as mqtts://HOST:PORT or wss://HOST:PORT/PATH"
            ),
        };
        if let Some(field) = options.listener_given().filter(|_| !listen.tls()) {
            return Err(unused(field, "listener (--listen)"));
        }
        if let Some(field) = options.upstream_given().filter(|_| !upstream.tls()) {
            return Err(unused(field, "upstream (--upstream)"));
        }
        let host = upstream_addr.rsplit_once(':').map_or(upstream_addr, |(h, _)| h);
        Ok(RouteTls {
            listen: listen.tls().then(|| server_side(&options)).transpose()?.map(Arc::new),
            upstream: upstream.tls().then(|| client_side(&options, host)).transpose()?.map(Arc::new),
            options,
        })
    }
}
