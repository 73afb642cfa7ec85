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
/// code is kept). Its message says what happened ([`CallError::failure`]) and what to do.
#[derive(Clone, Debug, thiserror::Error)]
pub struct CallError {
    /// The coordinator URL the call went to.
    pub url: String,
    /// The RPC, as named in the protocol (`GetJobStatus`, ...).
    pub rpc: &'static str,
    /// What the coordinator (or the transport) answered.
    pub status: Status,
    /// What the address answered a probe with, once [`CallError::probed`] asked.
    pub peer: Option<Peer>,
}

/// What failed a call, as the CLI and the worker tell it: one classification for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The coordinator answered, with an error of its own (the status says which).
    Answered,
    /// No connection could be opened: nothing listens at the address (or the host does not
    /// answer).
    NothingListens,
    /// A connection was opened and then closed or reset before an answer: the coordinator
    /// stopped or restarted mid-call.
    ClosedMidCall,
    /// The URL's scheme is not what the server speaks: `https://` to a plain server, or
    /// `http://` to a server seen to speak TLS.
    SchemeMismatch,
    /// The address answers HTTP/1.1: another service, not an mgd3 coordinator.
    NotACoordinator,
    /// The coordinator took longer than [`CALL_TIMEOUT`] to answer: it runs, but the call waits
    /// on something slow (its store, most often).
    TimedOut,
}

/// How long a client waits for the answer to one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a server answered the start of a TLS handshake with ([`probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A TLS record (a ServerHello or an alert): it speaks TLS.
    Tls,
    /// An HTTP/1.x answer: a web server or proxy, not a gRPC coordinator.
    Http1,
    /// A line of text (an SSH or SMTP banner, a greeting): another service.
    Banner,
    /// It closed the connection (or reset it) without answering.
    Closed,
    /// Something else, or nothing within 2 s: a plain HTTP/2 server waits for its preface.
    Other,
    /// No connection could be opened.
    Unreachable,
}

/// The first bytes of a TLS 1.2 ClientHello offering one cipher suite: a TLS server answers
/// them with a TLS record (its ServerHello or an alert), an HTTP/2 server with an HTTP/2 frame
/// or nothing, an HTTP/1.1 server with `HTTP/1.1 400`.
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

/// The `host:port` of a URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// Sends the start of a TLS handshake to `url`'s address and tells what answered
/// (each step bounded by 2 s).
pub async fn probe(url: &str) -> Peer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = std::time::Duration::from_secs(2);
    let Ok(Ok(mut stream)) = tokio::time::timeout(limit, tokio::net::TcpStream::connect(authority(url))).await else {
        return Peer::Unreachable;
    };
    if stream.write_all(&CLIENT_HELLO).await.is_err() {
        return Peer::Closed;
    }
    let mut first = [0u8; 5];
    match tokio::time::timeout(limit, stream.read(&mut first)).await {
        // Handshake (0x16) or alert (0x15) records, as any TLS server answers a ClientHello.
        Ok(Ok(n)) if n >= 1 && matches!(first[0], 0x15 | 0x16) => Peer::Tls,
        Ok(Ok(n)) if n >= 1 && b"HTTP/".starts_with(&first[..n]) => Peer::Http1,
        // HTTP/2 and TLS answer in binary frames; printable text is some other protocol.
        Ok(Ok(n)) if n >= 3 && first[..n].iter().all(|b| b.is_ascii_graphic() || *b == b' ') => Peer::Banner,
        Ok(Ok(0)) | Ok(Err(_)) => Peer::Closed,
        _ => Peer::Other,
    }
}

/// Whether the server at `url`'s address speaks TLS: `Some(true)` when it answers the start of
/// a TLS handshake with a TLS record, `Some(false)` when it answers otherwise or closes, `None`
/// when it cannot be reached within 2 s (see [`probe`]).
pub async fn speaks_tls(url: &str) -> Option<bool> {
    match probe(url).await {
        Peer::Tls => Some(true),
        Peer::Unreachable | Peer::Other => None,
        Peer::Http1 | Peer::Banner | Peer::Closed => Some(false),
    }
}

impl CallError {
    /// A `map_err` adapter for calls of `rpc` to `url`.
    pub fn of(url: &str, rpc: &'static str) -> impl FnOnce(Status) -> CallError + use<> {
        let url = url.to_owned();
        move |status| CallError { url, rpc, status, peer: None }
    }

    /// The gRPC code of the answer.
    pub fn code(&self) -> tonic::Code {
        self.status.code()
    }

    /// True when the status came from this client's transport (no connection, a connection
    /// closed or reset, a bad frame), not from the coordinator.
    fn transport_failed(&self) -> bool {
        use std::error::Error as _;
        matches!(
            self.status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
        ) && (self.status.source().is_some()
            || ["transport error", "h2 protocol error", "connection", "tcp connect"]
                .iter()
                .any(|m| self.status.message().contains(m)))
    }

    /// True when no connection could be opened (refused, unreachable host, connect timeout).
    fn not_connected(&self) -> bool {
        use std::error::Error as _;
        let mut source = self.status.source();
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                        | std::io::ErrorKind::AddrNotAvailable
                )
            {
                return true;
            }
            source = error.source();
        }
        let message = self.status.message().to_ascii_lowercase();
        message.contains("tcp connect error") || message.contains("connection refused")
    }

    /// What failed the call: the one classification the CLI and the worker share. TLS is
    /// blamed on an `http://` URL only once a probe saw the address speak it.
    pub fn failure(&self) -> Failure {
        if matches!(self.peer, Some(Peer::Http1 | Peer::Banner)) {
            return Failure::NotACoordinator;
        }
        if self.peer == Some(Peer::Tls) && self.url.starts_with("http://") {
            return Failure::SchemeMismatch;
        }
        let message = self.status.message();
        if self.url.starts_with("https://")
            && (message.contains("InvalidContentType") || message.contains("corrupt message"))
        {
            return Failure::SchemeMismatch;
        }
        // The client's own limit (tower's timeout, which tonic reports as "Timeout expired").
        if message.contains("Timeout expired") {
            return Failure::TimedOut;
        }
        if !self.transport_failed() {
            return Failure::Answered;
        }
        // Only a connection that could not be opened is "nothing listens": one cut mid-call by a
        // coordinator that died is a cut, even if nothing listens by the time of the probe.
        if self.not_connected() {
            return Failure::NothingListens;
        }
        Failure::ClosedMidCall
    }

    /// True when the answer shows the URL's scheme is not what the server speaks
    /// ([`Failure::SchemeMismatch`]).
    pub fn scheme_mismatch(&self) -> bool {
        self.failure() == Failure::SchemeMismatch
    }

    /// This error, with the address probed ([`probe`]) when the transport failed after a
    /// connection was opened: a dropped connection alone does not say whether a TLS server, a
    /// web server or a restarting coordinator is there; what the address answers does.
    pub async fn probed(mut self) -> Self {
        if self.peer.is_none() && matches!(self.failure(), Failure::ClosedMidCall | Failure::SchemeMismatch) {
            self.peer = Some(probe(&self.url).await);
        }
        self
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (url, message) = (&self.url, self.status.message());
        match self.failure() {
            Failure::SchemeMismatch => {
                let (other, why) = match url.strip_prefix("https://") {
                    Some(rest) => (format!("http://{rest}"), "does not speak TLS"),
                    None => (
                        format!("https://{}", url.trim_start_matches("http://")),
                        "speaks TLS (it was started with --tls-cert)",
                    ),
                };
                write!(f, "the coordinator at {url} {why} ({message}); use {other}")
            }
            Failure::NotACoordinator => write!(
                f,
                "something at {} answers {}: it is not an mgd3 coordinator (gRPC); check the address in --coordinator (or MGD3_COORDINATOR)",
                authority(url),
                if self.peer == Some(Peer::Banner) { "with a text banner (another service)" } else { "HTTP/1.1" }
            ),
            Failure::NothingListens => write!(
                f,
                "nothing listens at {} ({message}); start the coordinator (`coordinator serve --store <output>`), or point --coordinator (or MGD3_COORDINATOR) at the one that runs",
                authority(url)
            ),
            Failure::ClosedMidCall => write!(
                f,
                "the coordinator at {url} closed the connection mid-call ({message}): it may have stopped or restarted; try again (if it keeps happening, check that --coordinator names an mgd3 coordinator)"
            ),
            Failure::TimedOut => write!(
                f,
                "the coordinator at {url} did not answer within {} s: it runs, but this call waits on something slow, \
                 most often its object store (its log says when the store does not answer); try again later",
                CALL_TIMEOUT.as_secs()
            ),
            Failure::Answered => match self.status.code() {
                tonic::Code::Unauthenticated => write!(
                    f,
                    "the coordinator at {url} refused this client: {message}; pass the token it was started with (--token-file, or MGD3_TOKEN_FILE)"
                ),
                code => write!(f, "{message} (coordinator {url}, {} answered {code:?})", self.rpc),
            },
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
        .timeout(CALL_TIMEOUT)
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
        // The coordinator's own answers, whatever their code, are its answers.
        let answered = call(tonic::Code::Unavailable);
        assert_eq!((answered.code(), answered.failure()), (tonic::Code::Unavailable, Failure::Answered));
        assert!(call(tonic::Code::Unauthenticated).to_string().contains("--token-file"));
        let other = call(tonic::Code::NotFound).to_string();
        assert!(other.contains("boom") && other.contains("http://c:1") && other.contains("NotFound"), "{other}");
        // The transport's, by what it says happened.
        let refused = call_failing(tonic::Code::Unavailable, "tcp connect error");
        assert_eq!(refused.failure(), Failure::NothingListens);
        let text = refused.to_string();
        assert!(text.contains("nothing listens at c:1") && text.contains("--coordinator"), "{text}");
        let slow = call_failing(tonic::Code::Cancelled, "Timeout expired");
        assert_eq!(slow.failure(), Failure::TimedOut);
        let text = slow.to_string();
        assert!(text.contains("did not answer within 60 s") && text.contains("object store"), "{text}");
        assert!(!text.contains("stopped or restarted"), "{text}");
        let cut = call_failing(tonic::Code::Unknown, "h2 protocol error: connection reset");
        assert_eq!(cut.failure(), Failure::ClosedMidCall);
        assert!(cut.to_string().contains("closed the connection mid-call"), "{cut}");
        assert!(!cut.to_string().contains("TLS"), "no TLS advice without a TLS server seen: {cut}");
        // A coordinator killed mid-call: nothing listens by the time of the probe, but the call
        // was cut, and that is what is said.
        let died =
            CallError { peer: Some(Peer::Unreachable), ..call_failing(tonic::Code::Unavailable, "transport error") };
        assert_eq!(died.failure(), Failure::ClosedMidCall, "{died}");
    }

    fn call_failing(code: tonic::Code, message: &str) -> CallError {
        CallError::of("http://c:1", "ListJobs")(Status::new(code, message))
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

    /// The probe tells listeners apart by what they answer, never by a dropped connection: a TLS
    /// alert or handshake record is TLS, `HTTP/1.1 …` is another service, a close is a close.
    #[tokio::test]
    async fn the_probe_believes_only_what_the_listener_answers() {
        let alert = listener(Listener::Answers(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])).await;
        assert_eq!((probe(&alert).await, speaks_tls(&alert).await), (Peer::Tls, Some(true)));
        let http = listener(Listener::Answers(b"HTTP/1.1 400 Bad Request\r\n\r\n")).await;
        assert_eq!((probe(&http).await, speaks_tls(&http).await), (Peer::Http1, Some(false)));
        let closes = listener(Listener::ClosesAtOnce).await;
        assert_eq!(probe(&format!("{closes}/some/path")).await, Peer::Closed);
        assert_eq!(probe(&nobody()).await, Peer::Unreachable);
    }

    /// What a test listener does with each connection.
    #[derive(Clone, Copy)]
    enum Listener {
        /// Accepts and closes at once.
        ClosesAtOnce,
        /// Reads what the client sends, then closes.
        ReadsThenCloses,
        /// Reads, answers these bytes, closes.
        Answers(&'static [u8]),
        /// Says these bytes first (a banner), then reads and closes.
        Greets(&'static [u8]),
    }

    /// An `http://` URL of a loopback listener behaving as `how` for every connection.
    async fn listener(how: Listener) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    match how {
                        Listener::ClosesAtOnce => {}
                        Listener::ReadsThenCloses => {
                            let _ = socket.read(&mut buffer).await;
                        }
                        Listener::Answers(answer) => {
                            let _ = socket.read(&mut buffer).await;
                            let _ = socket.write_all(answer).await;
                        }
                        Listener::Greets(banner) => {
                            let _ = socket.write_all(banner).await;
                            let _ = socket.read(&mut buffer).await;
                        }
                    }
                });
            }
        });
        url
    }

    /// A URL at which nothing listens.
    fn nobody() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        format!("http://127.0.0.1:{port}")
    }

    /// Real calls through tonic to each kind of listener, classified as the CLI and the worker
    /// classify them (probed as both do): nothing listening, a listener that closes at once or
    /// after reading, one that answers HTTP/1.1, and a TLS server at an `http://` URL. Only the
    /// last gets TLS advice.
    #[tokio::test]
    async fn each_listener_behaviour_gets_its_own_true_message() {
        async fn call(url: &str) -> CallError {
            let mut client = connect(url, None, None).unwrap();
            let status = client.list_jobs(crate::proto::ListJobsRequest {}).await.unwrap_err();
            CallError::of(url, "ListJobs")(status).probed().await
        }
        let tls = listener(Listener::Answers(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])).await;
        let cases = [
            (nobody(), Failure::NothingListens, "nothing listens at"),
            (listener(Listener::ClosesAtOnce).await, Failure::ClosedMidCall, "closed the connection mid-call"),
            (listener(Listener::ReadsThenCloses).await, Failure::ClosedMidCall, "closed the connection mid-call"),
            (
                listener(Listener::Answers(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")).await,
                Failure::NotACoordinator,
                "answers HTTP/1.1",
            ),
            (tls.clone(), Failure::SchemeMismatch, "speaks TLS"),
            (
                listener(Listener::Greets(b"SSH-2.0-OpenSSH_9.6\r\n")).await,
                Failure::NotACoordinator,
                "with a text banner",
            ),
        ];
        for (url, failure, words) in cases {
            let error = call(&url).await;
            let text = error.to_string();
            assert_eq!(error.failure(), failure, "{url}: {text}");
            assert!(text.contains(words), "{url}: {text}");
            assert_eq!(text.contains("TLS"), failure == Failure::SchemeMismatch, "{url}: {text}");
        }
        assert!(call(&tls).await.to_string().contains(&format!("use https://{}", authority(&tls))));
    }
}
