//! gRPC plumbing shared by the CLI and the workers: connecting to the coordinator (plain or TLS),
//! and the interceptors on both sides: every request carries the protocol version
//! ([`crate::wire::PROTOCOL_HEADER`]) and, when set, a bearer token. The token is never logged.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::PROTOCOL_VERSION;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::wire::PROTOCOL_HEADER;

/// Adds the protocol-version header to every request, and `authorization: Bearer <token>` when a
/// token is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

/// Why a connection to the coordinator could not be set up (nothing was sent yet).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL lacks `http://` or `https://`.
    #[error(
        "coordinator URL `{url}` has no scheme: write `http://{url}` (or `https://{url}` for a coordinator with TLS)"
    )]
    NoScheme {
        /// The URL as given.
        url: String,
    },
    /// The URL names a scheme the coordinator does not speak.
    #[error("coordinator URL `{url}`: the coordinator speaks gRPC over http:// or https://, not {scheme}://")]
    UnsupportedScheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The URL cannot be parsed.
    #[error("invalid coordinator URL `{url}`")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: tonic::transport::Error,
    },
    /// The CA certificate file cannot be read.
    #[error("cannot read CA file `{path}`")]
    CaFile {
        /// The CA file's path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be configured for the URL.
    #[error("TLS set-up for `{url}`")]
    Tls {
        /// The coordinator URL.
        url: String,
        /// The TLS error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The token cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// A bearer token that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token holds characters an HTTP header cannot carry.
    #[error("the token must be printable ASCII")]
    NotAscii,
    /// The token file cannot be read.
    #[error("cannot read token file `{path}`")]
    Unreadable {
        /// The token file's path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds only whitespace.
    #[error("token file `{path}` is empty")]
    Empty {
        /// The token file's path.
        path: std::path::PathBuf,
    },
    /// The token file can be read by its group or by others: anyone on the machine could
    /// drive the coordinator (ssh refuses private keys like that for the same reason).
    #[error(
        "token file `{path}` can be read by other users (mode {mode:03o}): run `chmod 600 {path}`, or pass \
         --insecure-token-file to use it anyway"
    )]
    Exposed {
        /// The token file's path.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl BearerToken {
    /// The client side of `token` (none: only the protocol header is added).
    ///
    /// # Errors
    /// [`TokenError::NotAscii`] when the token cannot be sent in a header.
    pub fn new(token: Option<&str>) -> Result<Self, TokenError> {
        token
            .map(|t| MetadataValue::try_from(format!("Bearer {}", t.trim())).map_err(|_| TokenError::NotAscii))
            .transpose()
            .map(BearerToken)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(PROTOCOL_HEADER, MetadataValue::from(PROTOCOL_VERSION));
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Server side: rejects requests without the expected token (constant-time comparison), then
/// requests of another protocol version, with a message saying which versions meet and what to
/// do. A client older than the header (protocol 1) is refused the same way.
#[derive(Clone)]
pub struct RequireToken(Option<Vec<u8>>);

impl RequireToken {
    /// The server side of `token`: requests must carry `authorization: Bearer <token>` (none: only the
    /// protocol version is checked).
    pub fn new(token: Option<&str>) -> Self {
        RequireToken(token.map(|t| format!("Bearer {}", t.trim()).into_bytes()))
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(expected) = &self.0 {
            let given = request.metadata().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
            let mut diff = (given.len() != expected.len()) as u8;
            for (a, b) in given.iter().zip(expected.iter()) {
                diff |= a ^ b;
            }
            if diff != 0 {
                return Err(Status::unauthenticated("missing or wrong bearer token"));
            }
        }
        check_protocol(&request)?;
        Ok(request)
    }
}

/// `Err(FailedPrecondition)` unless `request` carries this build's [`PROTOCOL_VERSION`].
fn check_protocol<T>(request: &Request<T>) -> Result<(), Status> {
    let given = request.metadata().get(PROTOCOL_HEADER).map(|v| v.to_str().unwrap_or("?").to_owned());
    match given {
        Some(v) if v == PROTOCOL_VERSION.to_string() => Ok(()),
        Some(v) => Err(Status::failed_precondition(format!(
            "this client speaks mgd3 protocol {v}, the coordinator speaks protocol {PROTOCOL_VERSION}; run the same mgd3 version for the coordinator, its workers and the CLI"
        ))),
        None => Err(Status::failed_precondition(format!(
            "this client speaks an older mgd3 protocol (it sends no `{PROTOCOL_HEADER}` header), the coordinator speaks protocol {PROTOCOL_VERSION}; run the same mgd3 version for the coordinator, its workers and the CLI"
        ))),
    }
}

/// Reads a token file (trimmed). A file its group or others may read is refused unless
/// `accept_exposed` (`--insecure-token-file`).
///
/// # Errors
/// [`TokenError::Unreadable`]; [`TokenError::Exposed`] for a file readable by others;
/// [`TokenError::Empty`] for a file of only whitespace.
pub fn read_token_file(path: &std::path::Path, accept_exposed: bool) -> Result<String, TokenError> {
    let unreadable = |source| TokenError::Unreadable { path: path.to_owned(), source };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(unreadable)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !accept_exposed {
            return Err(TokenError::Exposed { path: path.to_owned(), mode });
        }
    }
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(TokenError::Empty { path: path.to_owned() });
    }
    Ok(token)
}

/// A coordinator client that sends the protocol header (and the bearer token) with every request.
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// A call to the coordinator that failed: which call, to which URL, and the gRPC status (whose
/// code is kept). Its message says what to do for the failures a person can fix.
#[derive(Clone, Debug, thiserror::Error)]
pub struct CallError {
    /// The coordinator URL the call went to.
    pub url: String,
    /// The RPC, as named in the protocol (`GetJobStatus`, ...).
    pub rpc: &'static str,
    /// What the coordinator (or the transport) answered.
    pub status: Status,
    /// A TLS server was seen at the `http://` URL's address ([`CallError::probed`]).
    pub tls_seen: bool,
}

/// The first bytes of a TLS 1.2 ClientHello offering one cipher suite: a TLS server answers
/// them with a TLS record (its ServerHello or an alert), an HTTP/2 server with an HTTP/2 frame
/// or nothing.
const CLIENT_HELLO: [u8; 52] = {
    let mut hello = [0u8; 52];
    let head = [0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03];
    let mut i = 0;
    while i < head.len() {
        hello[i] = head[i];
        i += 1;
    }
    // 32 bytes of random (zeros), then: no session id, one cipher suite
    // (TLS_RSA_WITH_AES_128_CBC_SHA), the null compression method, no extensions.
    let tail = [0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x00];
    let mut j = 0;
    while j < tail.len() {
        hello[11 + 32 + j] = tail[j];
        j += 1;
    }
    hello
};

/// Whether the server at `url`'s address speaks TLS: `Some(true)` when it answers the start of
/// a TLS handshake with a TLS record, `Some(false)` when it answers otherwise or closes, `None`
/// when it cannot be reached within 2 s.
pub async fn speaks_tls(url: &str) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let limit = std::time::Duration::from_secs(2);
    let mut stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(authority)).await.ok()?.ok()?;
    stream.write_all(&CLIENT_HELLO).await.ok()?;
    let mut first = [0u8; 1];
    match tokio::time::timeout(limit, stream.read(&mut first)).await {
        // Handshake (0x16) or alert (0x15) records, as any TLS server answers a ClientHello.
        Ok(Ok(1)) => Some(matches!(first[0], 0x15 | 0x16)),
        Ok(_) => Some(false),
        Err(_) => None,
    }
}

impl CallError {
    /// A `map_err` adapter for calls of `rpc` to `url`.
    pub fn of(url: &str, rpc: &'static str) -> impl FnOnce(Status) -> CallError + use<> {
        let url = url.to_owned();
        move |status| CallError { url, rpc, status, tls_seen: false }
    }

    /// The gRPC code of the answer.
    pub fn code(&self) -> tonic::Code {
        self.status.code()
    }
}

impl CallError {
    /// True when the answer shows the URL's scheme is not what the server speaks: `https://` to a
    /// plain server (the TLS client reads HTTP/2 bytes as a bad record type), or `http://` to a
    /// TLS server (the HTTP/2 client reads a TLS alert as a bad frame, or the connection drops at
    /// the first request).
    pub fn scheme_mismatch(&self) -> bool {
        if self.tls_seen {
            return true;
        }
        let message = self.status.message();
        match self.url.split_once("://").map(|(scheme, _)| scheme) {
            Some("https") => message.contains("InvalidContentType") || message.contains("corrupt message"),
            Some("http") => {
                matches!(self.status.code(), tonic::Code::Internal | tonic::Code::Unknown)
                    && (message.starts_with("h2 protocol error") || message == "transport error")
            }
            _ => false,
        }
    }
}

impl CallError {
    /// This error, with the address of an `http://` URL probed for a TLS server when the status
    /// is one a TLS server can cause but does not prove (the connection dropped at the first
    /// request): the advice to use `https://` then rests on what the server was seen to speak.
    pub async fn probed(mut self) -> Self {
        let ambiguous = matches!(
            self.status.code(),
            tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Unavailable
        );
        if self.url.starts_with("http://") && ambiguous && !self.scheme_mismatch() {
            self.tls_seen = speaks_tls(&self.url).await == Some(true);
        }
        self
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (url, message) = (&self.url, self.status.message());
        if self.scheme_mismatch() {
            let (other, why) = match url.strip_prefix("https://") {
                Some(rest) => (format!("http://{rest}"), "does not speak TLS"),
                None => (
                    format!("https://{}", url.trim_start_matches("http://")),
                    "speaks TLS (it was started with --tls-cert)",
                ),
            };
            return write!(f, "the coordinator at {url} {why} ({message}); use {other}");
        }
        match self.status.code() {
            tonic::Code::Unavailable => write!(
                f,
                "cannot reach the coordinator at {url} ({message}); start it (`coordinator serve`), or point --coordinator (or MGD3_COORDINATOR) at the one that runs"
            ),
            tonic::Code::Unauthenticated => write!(
                f,
                "the coordinator at {url} refused this client: {message}; pass the token it was started with (--token-file)"
            ),
            code => write!(f, "{message} (coordinator {url}, {} answered {code:?})", self.rpc),
        }
    }
}

/// Connects lazily (the first RPC dials), so callers can retry with backoff.
///
/// # Errors
/// A [`ConnectError`] for a URL, CA file or token that cannot be used; nothing is dialled yet.
pub fn connect(url: &str, token: Option<&str>, tls_ca: Option<&std::path::Path>) -> Result<Client, ConnectError> {
    let token = BearerToken::new(token)?;
    Ok(CoordinatorClient::with_interceptor(channel(url, tls_ca)?, token).max_decoding_message_size(64 << 20))
}

/// A lazily connecting channel to the coordinator at `url` (plain, or TLS with web PKI roots or
/// `tls_ca`), for any of its services (the coordinator's, the standard health service).
///
/// # Errors
/// A [`ConnectError`] for a URL or CA file that cannot be used; nothing is dialled yet.
pub fn channel(url: &str, tls_ca: Option<&std::path::Path>) -> Result<Channel, ConnectError> {
    crate::ensure_crypto_provider();
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(match url.split_once("://") {
            Some((scheme, _)) => ConnectError::UnsupportedScheme { url: url.to_owned(), scheme: scheme.to_owned() },
            None => ConnectError::NoScheme { url: url.to_owned() },
        });
    }
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|source| ConnectError::BadUrl { url: url.to_owned(), source })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(20));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = tls_ca {
            let pem = std::fs::read(ca).map_err(|source| ConnectError::CaFile { path: ca.to_owned(), source })?;
            tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|source| ConnectError::Tls { url: url.to_owned(), source })?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_scheme_says_what_to_write() {
        let error = connect("127.0.0.1:50051", None, None).unwrap_err();
        assert!(error.to_string().contains("write `http://127.0.0.1:50051`"), "{error}");
        let error = connect("ftp://127.0.0.1:50051", None, None).unwrap_err();
        assert!(error.to_string().contains("over http:// or https://, not ftp://"), "{error}");
    }

    #[test]
    fn failed_calls_name_the_url_and_keep_the_code() {
        let call = |code| CallError::of("http://c:1", "GetJobStatus")(Status::new(code, "boom"));
        let unreachable = call(tonic::Code::Unavailable);
        assert_eq!(unreachable.code(), tonic::Code::Unavailable);
        let text = unreachable.to_string();
        assert!(
            text.contains("cannot reach the coordinator at http://c:1") && text.contains("--coordinator"),
            "{text}"
        );
        assert!(call(tonic::Code::Unauthenticated).to_string().contains("--token-file"));
        let other = call(tonic::Code::NotFound).to_string();
        assert!(other.contains("boom") && other.contains("http://c:1") && other.contains("NotFound"), "{other}");
    }

    #[test]
    fn requests_of_another_protocol_are_refused() {
        let mut server = RequireToken::new(None);
        let sent = BearerToken::new(None).unwrap().call(Request::new(())).unwrap();
        assert!(server.call(sent).is_ok());
        let error = server.call(Request::new(())).unwrap_err();
        assert_eq!(error.code(), tonic::Code::FailedPrecondition);
        let mut older = Request::new(());
        older.metadata_mut().insert(PROTOCOL_HEADER, MetadataValue::from(1u32));
        assert!(server.call(older).unwrap_err().message().contains("speaks mgd3 protocol 1"));
    }

    #[cfg(unix)]
    #[test]
    fn token_files_others_can_read_are_refused_with_the_chmod_to_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = read_token_file(&path, false).unwrap_err();
            assert!(matches!(error, TokenError::Exposed { mode: m, .. } if m == mode), "{error}");
            let message = error.to_string();
            assert!(message.contains(&format!("chmod 600 {}", path.display())), "{message}");
            assert!(message.contains("--insecure-token-file"), "{message}");
            assert_eq!(read_token_file(&path, true).unwrap(), "s3cret", "accepted when asked");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_token_file(&path, false).unwrap(), "s3cret");
        }
    }

    /// The TLS probe tells listeners apart by what they answer, never by a dropped connection:
    /// a TLS alert or handshake record is TLS; an HTTP answer, a close, or silence is not.
    #[tokio::test]
    async fn the_tls_probe_believes_only_a_tls_record() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn listener(answer: &'static [u8]) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buffer = [0u8; 64];
                let _ = socket.read(&mut buffer).await;
                let _ = socket.write_all(answer).await;
            });
            url
        }
        let alert = listener(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).await;
        assert_eq!(speaks_tls(&alert).await, Some(true));
        let http = listener(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        assert_eq!(speaks_tls(&http).await, Some(false));
        let closes = listener(b"").await;
        assert_eq!(speaks_tls(&format!("{closes}/some/path")).await, Some(false));
        let nobody = {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            format!("http://127.0.0.1:{port}")
        };
        assert_eq!(speaks_tls(&nobody).await, None);
        // A dropped connection at an address that speaks TLS becomes the scheme advice; at one
        // that does not, it stays what it was.
        let tls = listener(&[0x16, 0x03, 0x03]).await;
        let dropped = || Status::cancelled("operation was canceled");
        let call = CallError::of(&tls, "ListJobs")(dropped()).probed().await;
        assert!(call.to_string().contains("speaks TLS"), "{call}");
        let plain = listener(b"").await;
        let call = CallError::of(&plain, "ListJobs")(dropped()).probed().await;
        assert!(!call.scheme_mismatch() && !call.to_string().contains("TLS"), "{call}");
    }
}
