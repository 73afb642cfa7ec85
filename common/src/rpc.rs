//! gRPC plumbing shared by the CLI and the workers: connecting to the coordinator (plain or TLS),
//! and the bearer-token interceptor on both sides. The token is never logged.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::proto::coordinator_client::CoordinatorClient;

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "BearerToken(<redacted>)" } else { "BearerToken(none)" })
    }
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| "the token must be printable ASCII".to_owned())
            })
            .transpose()
            .map(BearerToken)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Server side: rejects requests without the expected token (constant-time comparison).
#[derive(Clone)]
pub struct RequireToken(Option<Vec<u8>>);

impl RequireToken {
    pub fn new(token: Option<&str>) -> Self {
        RequireToken(token.map(|t| format!("Bearer {}", t.trim()).into_bytes()))
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(request);
        };
        let given = request.metadata().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
        let mut diff = (given.len() != expected.len()) as u8;
        for (a, b) in given.iter().zip(expected.iter()) {
            diff |= a ^ b;
        }
        if diff == 0 { Ok(request) } else { Err(Status::unauthenticated("missing or wrong bearer token")) }
    }
}

/// Reads a token file (trimmed); an empty file is an error.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read token file `{}`: {e}", path.display()))?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(format!("token file `{}` is empty", path.display()));
    }
    Ok(token)
}

pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Connects lazily (the first RPC dials), so callers can retry with backoff.
pub fn connect(url: &str, token: Option<&str>, tls_ca: Option<&std::path::Path>) -> Result<Client, String> {
    crate::ensure_crypto_provider();
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("invalid coordinator URL `{url}`: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(20));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = tls_ca {
            let pem = std::fs::read(ca).map_err(|e| format!("cannot read CA file `{}`: {e}", ca.display()))?;
            tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS set-up for `{url}`: {e}"))?;
    }
    let channel = endpoint.connect_lazy();
    let token = BearerToken::new(token)?;
    Ok(CoordinatorClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20))
}
