//! Certificates signed by a private root, and the fake OpenAI upstream served
//! over TLS with one of them, for the tests of what quotawatch trusts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A private root, and the certificate chain and key of a server named
/// `localhost` that it signed, all as PEM.
pub fn private_root_and_server_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut root_params = CertificateParams::new(Vec::new()).expect("params");
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = CertifiedIssuer::self_signed(root_params, KeyPair::generate().expect("key"))
        .expect("a root");
    let server_key = KeyPair::generate().expect("key");
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &root)
        .expect("a server certificate");
    (root.pem(), server.pem(), server_key.serialize_pem())
}

/// A TLS server's settings with a certificate for `localhost` of a new
/// private root, offering `alpn` (such as `h2` and `http/1.1`, in the
/// server's order of preference); and that root as PEM, which a client must
/// trust to reach the server.
pub fn server_config(alpn: &[&[u8]]) -> (rustls::ServerConfig, String) {
    let (root_pem, chain, key) = private_root_and_server_certificate();
    let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the server's chain");
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("the server's key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a certificate and its key");
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    (config, root_pem)
}

/// The application protocol (ALPN) each handshake settled on, in order;
/// `None` where the client offered none the server speaks.
pub type Protocols = Arc<Mutex<Vec<Option<Vec<u8>>>>>;

/// The fake OpenAI upstream at `https://localhost:PORT`, with a certificate
/// of its own private root.
pub struct TlsUpstream {
    /// Base URL including `/v1`, as `QUOTAWATCH_UPSTREAM_URL` takes it.
    pub url: String,
    /// The root that signed the upstream's certificate, as PEM: what a
    /// client must trust to reach it.
    pub root_pem: String,
    /// The protocols of the handshakes that succeeded: a client that
    /// refuses the certificate adds none.
    pub protocols: Protocols,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TlsUpstream {
    /// Serves the mock with `options`, offering `alpn` (see [`server_config`]).
    pub async fn start(options: quotawatch::mock::MockOptions, alpn: &[&[u8]]) -> Self {
        let (config, root_pem) = server_config(alpn);
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = tcp.local_addr().expect("address").port();
        let protocols = Protocols::default();
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            protocols: Arc::clone(&protocols),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            axum::serve(listener, quotawatch::mock::router(options))
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        Self {
            url: format!("https://localhost:{port}/v1"),
            root_pem,
            protocols,
            stop: Some(stop),
        }
    }

    /// The protocols of the handshakes that succeeded so far.
    pub fn protocols(&self) -> Vec<Option<Vec<u8>>> {
        self.protocols.lock().expect("not poisoned").clone()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Accepts TCP connections and hands on those whose TLS handshake succeeds.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    protocols: Protocols,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // A failed accept or handshake (a client that does not trust the
            // certificate ends it) concerns that connection only: the next
            // one is waited for.
            let Ok((tcp, address)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                self.protocols.lock().expect("not poisoned").push(protocol);
                return (tls, address);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
