//! TLS for every service and mutual TLS between the gateway and the roles (docs/security.md),
//! with rustls. Certificates, keys and CAs are PEM files, read again when they change on disk:
//! each new connection uses the files as they are then (connections already up keep theirs), so a
//! rotation — cert-manager renewing a Secret — needs no restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;

use crate::reload::Reloading;

/// Time a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at most; the accept loop waits for one to end past that.
const MAX_HANDSHAKES: usize = 256;

/// rustls on *ring*: classical key exchange (X25519, P-256/384) and no C++ toolchain to build.
/// rustls marks it deprecated for lacking post-quantum key exchange, which its aws-lc-rs provider
/// adds at the cost of building aws-lc.
#[allow(deprecated)]
fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a PEM private key from {}", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .with_context(|| format!("CA certificate in {}", path.display()))?;
    }
    Ok(roots)
}

/// A server's TLS files: its certificate chain and key, and for mutual TLS the CA that signs the
/// clients it accepts.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM CA bundle; set: clients must present a certificate signed by it.
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    fn config(&self) -> Result<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .with_context(|| format!("client CA {}", ca.display()))?,
            ),
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .with_context(|| {
                format!(
                    "certificate {} with key {}",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// A server's TLS configuration, rebuilt when its files change.
#[derive(Debug)]
pub struct ServerTls(Reloading<Arc<ServerConfig>>);

impl ServerTls {
    /// Reads the files now (an error names the file).
    pub fn new(files: ServerFiles) -> Result<Self> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        let f = files.clone();
        Ok(Self(Reloading::new(
            "server TLS files",
            paths,
            Box::new(move |_| f.config().map(Arc::new)),
        )?))
    }

    /// The TLS connections accepted on `listener`: each handshake runs on its own task (a slow or
    /// plaintext client holds no other), failures are logged and dropped. ALPN offers `h2` only.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        self.incoming_alpn(listener, None)
    }

    /// [`Self::incoming`] for HTTP clients: ALPN offers `h2` and `http/1.1` (clients such as
    /// Python's `requests` speak only the latter).
    pub fn incoming_http(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        self.incoming_alpn(listener, Some(vec![b"h2".to_vec(), b"http/1.1".to_vec()]))
    }

    fn incoming_alpn(
        self: Arc<Self>,
        listener: TcpListener,
        alpn: Option<Vec<Vec<u8>>>,
    ) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(%e, "accepting a connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let config = self.0.get().as_ref().clone();
                let acceptor = TlsAcceptor::from(match &alpn {
                    Some(protocols) => {
                        let mut c = config.as_ref().clone();
                        c.alpn_protocols = protocols.clone();
                        Arc::new(c)
                    }
                    None => config,
                });
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send(Ok(s)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A client's TLS files: the CA that signs the servers, and for mutual TLS its own certificate
/// and key.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// PEM CA bundle the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate chain (mutual TLS).
    pub cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    pub key: Option<PathBuf>,
    /// Name the servers' certificates are checked against (default: the host of each address).
    pub server_name: Option<String>,
}

impl ClientFiles {
    fn config(&self) -> Result<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(&self.ca)?);
        let mut cfg = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(c)?, key(k)?)
                .with_context(|| {
                    format!(
                        "client certificate {} with key {}",
                        c.display(),
                        k.display()
                    )
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => bail!("a client certificate needs its key and a key its certificate"),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

/// A client's TLS configuration, rebuilt when its files change; used for every new connection.
#[derive(Debug)]
pub struct ClientTls {
    config: Reloading<Arc<ClientConfig>>,
    server_name: Option<String>,
}

impl ClientTls {
    /// Reads the files now (an error names the file).
    pub fn new(files: ClientFiles) -> Result<Self> {
        let mut paths = vec![files.ca.clone()];
        paths.extend(files.cert.clone());
        paths.extend(files.key.clone());
        let f = files.clone();
        Ok(Self {
            config: Reloading::new(
                "client TLS files",
                paths,
                Box::new(move |_| f.config().map(Arc::new)),
            )?,
            server_name: files.server_name,
        })
    }

    /// A TLS connection to `host:port` (the certificate checked against the configured server
    /// name, else `host`).
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.trim_matches(['[', ']']).to_string())
            .map_err(|e| invalid(format!("server name '{name}': {e}")))?;
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
        tcp.set_nodelay(true)?;
        let connector = TlsConnector::from(self.config.get().as_ref().clone());
        Ok(hyper_util::rt::TokioIo::new(
            connector.connect(name, tcp).await?,
        ))
    }
}
