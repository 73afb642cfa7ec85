//! Object stores from URLs: `file://` or plain paths, `memory://NAME` (process-wide, for tests),
//! and the cloud schemes object_store was built with. A URL's path becomes the key prefix.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, RetryConfig};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use thiserror::Error;
use url::Url;

/// Errors of opening a store location or fetching a model from one.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The URL does not parse, has an unsupported scheme, or its path is no valid key prefix.
    #[error("invalid store URL `{url}`: {problem}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The store could not be built (configuration, credentials) or a model could not be read
    /// from it.
    #[error("cannot open store `{url}`")]
    Open {
        /// The URL (and key) concerned.
        url: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A local folder (a local store's root, the model cache) or a file in it could not be
    /// created or written.
    #[error("cannot create local folder `{path}`")]
    LocalDir {
        /// The folder.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A model in an object store names external data that cannot be fetched beside it.
    #[error(transparent)]
    ModelFiles(#[from] crate::modelmeta::ModelFilesError),
    /// The object a model's URL names (or one of its files) is not in the store.
    #[error(
        "`{url}` is not in the store (no object at key `{key}`): check the path, whose keys are case-sensitive, and \
         that the model was uploaded there"
    )]
    MissingObject {
        /// The model's URL as the job names it.
        url: String,
        /// The key looked for.
        key: String,
    },
}

/// A store and the key prefix a URL names inside it.
#[derive(Clone, Debug)]
pub struct Location {
    /// The URL or absolute local path the location was opened from.
    pub url: String,
    /// The object store the location lives in (shared with its [`Location::child`] locations).
    pub store: Arc<dyn ObjectStore>,
    /// The key prefix inside `store` that the URL's path names.
    pub prefix: Path,
    /// The folder `prefix` names, for a store on the local file system (whose staging copies,
    /// `<name>#<digits>`, its listings do not show).
    pub local_root: Option<std::path::PathBuf>,
}

impl Location {
    /// `prefix/relative`, each `/`-separated part of `relative` taken as it is: a name read from
    /// a listing or a disk (`café`, `100%.png`, `my data`) reaches the store unchanged and is
    /// encoded exactly once, by the transport. Only a part no store can hold (`.`, `..`, control
    /// characters) is percent-encoded instead; job names and class names never are such parts.
    pub fn key(&self, relative: &str) -> Path {
        let mut key = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            key = match object_store::path::PathPart::parse(part) {
                Ok(parsed) => key.clone().join(parsed),
                Err(_) => key.clone().join(part),
            };
        }
        key
    }

    /// The location of a sub-prefix.
    pub fn child(&self, relative: &str) -> Location {
        Location {
            url: format!("{}/{}", self.url.trim_end_matches('/'), relative),
            store: self.store.clone(),
            prefix: self.key(relative),
            local_root: self.local_path(relative),
        }
    }

    /// The local folder or file of `prefix/relative`, for a store on the local file system.
    pub fn local_path(&self, relative: &str) -> Option<std::path::PathBuf> {
        let mut path = self.local_root.clone()?;
        path.extend(relative.split('/').filter(|p| !p.is_empty()));
        Some(path)
    }
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

/// Whether `text` is a URL with a scheme (as opposed to a local path).
pub fn is_url(text: &str) -> bool {
    text.contains("://")
}

/// The object-store URL schemes a location may use.
const SCHEMES: [&str; 9] = ["s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "file", "memory"];

/// The URL `text` was meant to be when it is one with a slash or its colon missing (`s3:/bucket`,
/// `s3//bucket`), which would otherwise be a local folder named `s3:` or `s3` under the current
/// (or the spec's) folder; `None` for anything else.
pub fn url_typo(text: &str) -> Option<String> {
    if is_url(text) {
        return None;
    }
    SCHEMES.iter().find_map(|scheme| {
        let rest = text.strip_prefix(scheme)?;
        // `s3:/b`, `s3//b`, and `s3:b` (both slashes missing).
        let rest = rest
            .strip_prefix(":/")
            .or_else(|| rest.strip_prefix("//"))
            .or_else(|| rest.strip_prefix(':').filter(|r| !r.is_empty()))?;
        Some(format!("{scheme}://{}", rest.trim_start_matches('/')))
    })
}

/// What is wrong with `text` as a location, seen without opening it: a URL with a slash missing
/// ([`url_typo`]), an unsupported scheme, or an object-store URL that names no bucket. `None`
/// for a local path or a URL that may be opened (whether it exists is for opening to say).
pub fn location_problem(text: &str) -> Option<String> {
    if let Some(meant) = url_typo(text) {
        return Some(format!(
            "`{text}` is a URL with a slash or its colon missing (as written, it would be a local folder named after \
             the scheme): write `{meant}`"
        ));
    }
    let (scheme, rest) = text.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if !SCHEMES.contains(&scheme.as_str()) {
        return Some(format!(
            "`{text}`: unsupported scheme `{scheme}` (use a path, file://, s3://, gs://, az:// or memory://)"
        ));
    }
    if !matches!(scheme.as_str(), "file" | "memory") && rest.split('/').next().is_none_or(str::is_empty) {
        return Some(format!("`{text}` names no bucket or container: write `{scheme}://<bucket>/<prefix>`"));
    }
    None
}

/// Resolves a local path or URL against `base` (a directory) into an absolute, normalised path
/// (`a/../b` → `b`, without touching the file system) or the URL unchanged (also a URL with a
/// slash missing, [`url_typo`], for its check to name as written).
pub fn resolve(text: &str, base: &std::path::Path) -> String {
    use std::path::Component;
    // A file:// URL is a local path, and from here on written as one (every reader of a
    // location takes `file://X` as the path X): `file:///a%20b` and `file://localhost/a` are
    // `/a b` and `/a`; `file://models/x` (a relative path written as a URL) starts at `base`, as
    // a relative path does, not at whatever folder a process runs in.
    if let Some(rest) = text.get(..7).filter(|scheme| scheme.eq_ignore_ascii_case("file://")).map(|_| &text[7..])
        && !rest.trim().is_empty()
    {
        let rest = rest.strip_prefix("localhost/").map_or(rest.to_owned(), |path| format!("/{path}"));
        let Ok(path) = percent_encoding::percent_decode_str(&rest).decode_utf8() else { return text.to_owned() };
        return resolve(&path, base);
    }
    // An empty location stays empty, for its check to say so (as `base` it named the spec's
    // folder, and `dataset = ""` was told that it "resolves to no classes").
    if is_url(text) || url_typo(text).is_some() || text.trim().is_empty() {
        return text.to_owned();
    }
    let mut normal = std::path::PathBuf::new();
    for part in base.join(text).components() {
        match part {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal.display().to_string()
}

/// The key prefix a URL's path names: percent-decoded once (`my%20data` and `my data` are the
/// same folder), then taken as it is.
fn url_prefix(url: &str, parsed: &Url) -> Result<Path, StoreError> {
    Path::from_url_path(parsed.path().trim_start_matches('/'))
        .map_err(|e| StoreError::BadUrl { url: url.to_owned(), problem: e.to_string() })
}

/// Opens the store a URL or local path names. Local folders are created when missing; a
/// relative path is resolved against the current folder, and the returned [`Location::url`] is
/// the absolute path.
///
/// # Errors
/// [`StoreError::BadUrl`] for a URL that does not parse or has an unsupported scheme,
/// [`StoreError::Open`] when the store cannot be built, [`StoreError::LocalDir`] when a local
/// folder cannot be created.
pub fn open(url: &str) -> Result<Location, StoreError> {
    let bad = |problem: &str| StoreError::BadUrl { url: url.to_owned(), problem: problem.to_owned() };
    // `s3:/bucket` (one slash) would otherwise become a local folder named `s3:`.
    if let Some(meant) = url_typo(url) {
        return Err(bad(&format!("a URL needs `://` after the scheme: write `{meant}`")));
    }
    if !is_url(url) {
        // The location's URL is absolute: it is written into job records that other processes,
        // started in other folders, read.
        let cwd = std::env::current_dir().map_err(|e| bad(&e.to_string()))?;
        let absolute = resolve(url, &cwd);
        return open_local(&absolute, std::path::Path::new(&absolute));
    }
    let parsed = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            let path = parsed.to_file_path().map_err(|_| bad("not an absolute file path"))?;
            open_local(url, &path)
        }
        "memory" => {
            let name = parsed.host_str().unwrap_or("default").to_owned();
            let store = memory_stores().lock().expect("memory stores").entry(name).or_default().clone();
            let prefix = url_prefix(url, &parsed)?;
            Ok(Location { url: url.to_owned(), store, prefix, local_root: None })
        }
        scheme @ ("s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure") => {
            let store = open_cloud(scheme, url).map_err(|source| StoreError::Open { url: url.to_owned(), source })?;
            let prefix = url_prefix(url, &parsed)?;
            Ok(Location { url: url.to_owned(), store, prefix, local_root: None })
        }
        other => {
            Err(bad(&format!("unsupported scheme `{other}` (use a path, file://, s3://, gs://, az:// or memory://)")))
        }
    }
}

/// A store failure a person can act on, recognised in an object_store error: what
/// [`crate::error_chain`] prints instead of the client's request dump and the server's XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreProblem {
    /// The bucket (S3, GCS) or container (Azure) does not exist.
    NoSuchBucket {
        /// Its name, when the server said it.
        bucket: Option<String>,
    },
    /// The server refused the credentials in use.
    Denied {
        /// The server's error code (`AccessDenied`, `InvalidAccessKeyId`, `SignatureDoesNotMatch`,
        /// `ExpiredToken`, `AuthorizationFailure`, …).
        code: String,
    },
    /// The store's endpoint did not answer (connection refused, reset or timed out) for as long as
    /// calls are retried.
    Unreachable,
    /// No credentials could be found or made (see [`crate::aws::CredentialsError`]).
    Credentials {
        /// The credential chain's own sentence, with its causes.
        message: String,
    },
}

/// S3/GCS XML and Azure error codes that mean "these credentials may not do this".
const DENIED_CODES: [&str; 8] = [
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationFailure",
    "AuthenticationFailed",
    "AuthorizationPermissionMismatch",
];

impl StoreProblem {
    /// Recognises a problem in `error` and its causes, or `None` for any other failure.
    pub fn of(error: &object_store::Error) -> Option<Self> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cause {
            if let Some(credentials) = e.downcast_ref::<crate::aws::CredentialsError>() {
                return Some(Self::Credentials { message: crate::error_chain(credentials) });
            }
            let unreachable = [
                std::io::ErrorKind::ConnectionRefused,
                std::io::ErrorKind::ConnectionReset,
                std::io::ErrorKind::TimedOut,
                std::io::ErrorKind::HostUnreachable,
                std::io::ErrorKind::NetworkUnreachable,
            ];
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| unreachable.contains(&io.kind())) {
                return Some(Self::Unreachable);
            }
            // The HTTP client's own view: no connection, no answer in time (a server that
            // accepts and never answers), or a request cut off.
            if e.downcast_ref::<object_store::client::HttpError>().is_some_and(|http| {
                use object_store::client::HttpErrorKind::{Connect, Interrupted, Timeout};
                matches!(http.kind(), Connect | Timeout | Interrupted)
            }) {
                return Some(Self::Unreachable);
            }
            cause = e.source();
        }
        // object_store keeps the server's answer only as text; the codes in it are the stores'
        // documented, stable error codes.
        let text = error.to_string();
        let tag = |name: &str| {
            let open = format!("<{name}>");
            let start = text.find(&open)? + open.len();
            Some(text[start..].split('<').next()?.trim().to_owned())
        };
        let code = tag("Code");
        if code.as_deref() == Some("NoSuchBucket")
            || text.contains("ContainerNotFound")
            || text.contains("The specified bucket does not exist")
        {
            return Some(Self::NoSuchBucket { bucket: tag("BucketName") });
        }
        let code = code.or_else(|| DENIED_CODES.iter().find(|c| text.contains(**c)).map(|c| (*c).to_owned()))?;
        DENIED_CODES.contains(&code.as_str()).then_some(Self::Denied { code })
    }
}

impl std::fmt::Display for StoreProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchBucket { bucket: Some(bucket) } => write!(
                f,
                "the bucket `{bucket}` does not exist: create it (e.g. `aws s3 mb s3://{bucket}`) or correct the bucket name in the URL"
            ),
            Self::NoSuchBucket { bucket: None } => {
                write!(f, "the bucket or container does not exist: create it or correct its name in the URL")
            }
            Self::Denied { code } => write!(
                f,
                "the store refused the credentials in use ({code}; AWS profile `{}`): check AWS_PROFILE or the keys, that they have not expired, and the bucket's policy",
                crate::aws::profile_name()
            ),
            Self::Unreachable => {
                // The endpoint in use, where the environment sets it: the value a typo is in.
                let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
                    .iter()
                    .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()).map(|v| (name, v)))
                    .map(|(name, value)| {
                        format!(
                            " ({name} is `{value}`; an https:// endpoint of a plain-http server fails the same way)"
                        )
                    })
                    .unwrap_or_default();
                write!(
                    f,
                    "the store's endpoint did not answer (connection refused, reset or timed out; calls are retried for up to {} s): check the endpoint{endpoint} (AWS_ENDPOINT_URL or the profile's endpoint_url for S3-compatible servers) and the network",
                    retry_timeout().as_secs()
                )
            }
            Self::Credentials { message } => f.write_str(message),
        }
    }
}

/// How long one store call keeps retrying transient errors: an outage shorter than this is
/// survived by every call without failing a class (and so without spending an attempt). The
/// default of [`retry_timeout`].
pub const STORE_RETRY_TIMEOUT: Duration = Duration::from_secs(180);

/// This process's [`retry_timeout`], in ms.
static RETRY_TIMEOUT_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(STORE_RETRY_TIMEOUT.as_millis() as u64);

/// How long one store call of this process keeps retrying transient errors:
/// [`STORE_RETRY_TIMEOUT`] unless [`set_retry_timeout`] changed it.
pub fn retry_timeout() -> Duration {
    Duration::from_millis(RETRY_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Sets [`retry_timeout`] for this process: for stores opened from then on and every
/// [`retry_idempotent`] call. For one-shot commands (`coordinator check`) that should say an
/// unreachable store within seconds, where a coordinator or worker rides out an outage.
pub fn set_retry_timeout(timeout: Duration) {
    RETRY_TIMEOUT_MS.store(timeout.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Runs an idempotent store operation, retrying transport failures the client itself does not
/// retry (a PUT or COPY whose connection dropped mid-request: it may have happened, so the client
/// leaves the decision to the caller) with the same backoff, until [`retry_timeout`] has
/// passed. Answers that mean something (not found, already exists, denied) and refusals no retry
/// can fix ([`Refusal`]: a full disk, a read-only file system) are returned at once.
///
/// # Errors
/// The operation's last error: a non-transient one at once, a transient one after
/// [`retry_timeout`].
pub async fn retry_idempotent<T, F, Fut>(mut operation: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        match operation().await {
            Err(error @ object_store::Error::Generic { .. })
                if started.elapsed() < retry_timeout() && transient(&error) =>
            {
                tracing::debug!(error = %error, retry_in_ms = backoff.as_millis() as u64, "store call failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
}

/// Whether waiting may cure a generic store error: not a missing object, a local file-system
/// error that recurs ([`io_permanent`]: a name too long, a folder where a file goes), a refusal
/// (full, read-only, denied), missing or refused credentials, or a missing bucket.
fn transient(error: &object_store::Error) -> bool {
    let object_store::Error::Generic { source, .. } = error else { return false };
    !io_permanent(source.as_ref())
        && Refusal::in_chain(source.as_ref()).is_none()
        && !matches!(
            StoreProblem::of(error),
            Some(StoreProblem::Credentials { .. } | StoreProblem::Denied { .. } | StoreProblem::NoSuchBucket { .. })
        )
}

/// A store refusal that no retry can fix: a person must act before anything more is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No space left, or over quota (ENOSPC, EDQUOT).
    Full,
    /// A read-only file system (EROFS).
    ReadOnly,
    /// No permission (EACCES, EPERM; an object store's 401/403).
    Denied,
}

impl Refusal {
    /// The refusal behind a store error, if it is one.
    pub fn of(error: &object_store::Error) -> Option<Refusal> {
        match error {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                Some(Refusal::Denied)
            }
            object_store::Error::Generic { source, .. } => Refusal::in_chain(source.as_ref()),
            _ => None,
        }
    }

    /// The refusal anywhere in an error's chain: an object-store error that is one, or an I/O
    /// error of the local file system.
    pub fn in_chain(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(store) = e.downcast_ref::<object_store::Error>() {
                return Refusal::of(store);
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return Refusal::of_io(io);
            }
            cause = e.source();
        }
        None
    }

    /// The refusal an I/O error is, if any.
    pub fn of_io(error: &std::io::Error) -> Option<Refusal> {
        use std::io::ErrorKind;
        // Linux errno values: ENOSPC 28, EDQUOT 122, EROFS 30, EPERM 1, EACCES 13.
        match (error.kind(), error.raw_os_error()) {
            (ErrorKind::StorageFull | ErrorKind::QuotaExceeded, _) | (_, Some(28 | 122)) => Some(Refusal::Full),
            (ErrorKind::ReadOnlyFilesystem, _) | (_, Some(30)) => Some(Refusal::ReadOnly),
            (ErrorKind::PermissionDenied, _) | (_, Some(1 | 13)) => Some(Refusal::Denied),
            _ => None,
        }
    }

    /// What a person does about it, in a few words.
    pub fn remedy(self) -> &'static str {
        match self {
            Refusal::Full => "free space or raise the quota",
            Refusal::ReadOnly => "make the output writable (it is on a read-only file system)",
            Refusal::Denied => "give the workers write permission on the output",
        }
    }
}

/// True when an error's cause chain holds a "no such file" I/O error (the local store reports a
/// copy from a missing source as a generic error), or "not a directory": a key below a file
/// (`a/b` where `a` is a file) names no object, as an object store would answer.
fn io_not_found(error: &(dyn std::error::Error + 'static)) -> bool {
    io_in_chain(error, |io| matches!(io.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory))
}

/// A local file-system error that the same call meets every time, whatever the wait: a name the
/// file system cannot hold (ENAMETOOLONG), a folder where a file goes or a file where a folder
/// goes, a link loop. Retrying one stalled `verify`, `report` and `resume` for minutes.
fn io_permanent(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind as Kind;
    // A listing that walks into a link to a folder above it (the walker's own error, no I/O one).
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.to_string().contains("File system loop found") {
            return true;
        }
        cause = e.source();
    }
    /// ELOOP (too many levels of symbolic links), which has no stable `ErrorKind`.
    const ELOOP: i32 = 40;
    io_in_chain(error, |io| {
        matches!(
            io.kind(),
            Kind::NotFound
                | Kind::InvalidFilename
                | Kind::NotADirectory
                | Kind::IsADirectory
                | Kind::DirectoryNotEmpty
                | Kind::InvalidInput
                | Kind::FileTooLarge
                | Kind::TooManyLinks
                | Kind::Unsupported
        ) || io.raw_os_error() == Some(ELOOP)
    })
}

fn io_in_chain(error: &(dyn std::error::Error + 'static), test: impl Fn(&std::io::Error) -> bool) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>().is_some_and(&test) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// True for an error of the local file system that recurs whatever the wait (`io_permanent`:
/// a folder where a file goes, a file where a folder goes, a link loop): damage a person must
/// look at, not an outage.
pub fn is_local_damage(error: &object_store::Error) -> bool {
    matches!(error, object_store::Error::Generic { source, .. } if io_permanent(source.as_ref()) && !io_not_found(source.as_ref()))
}

/// True for "this object does not exist", however the store reports it. A missing bucket or
/// container is not: it is a [`StoreProblem`] that no read may take for an empty store.
pub fn is_not_found(error: &object_store::Error) -> bool {
    match error {
        object_store::Error::NotFound { .. } => {
            !matches!(StoreProblem::of(error), Some(StoreProblem::NoSuchBucket { .. }))
        }
        object_store::Error::Generic { source, .. } => io_not_found(source.as_ref()),
        _ => false,
    }
}

/// Retries for transient errors (5xx, timeouts, refused or dropped connections) with jittered
/// exponential backoff (0.2 s growing to at most 10 s) until [`retry_timeout`] has passed
/// since the call began; the retry count is not what bounds it. 4xx answers such as 403 or a
/// missing bucket are not retried.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        // Far more than fit in the timeout (at least ~18 at the 10 s cap): time is the bound.
        max_retries: 10_000,
        retry_timeout: retry_timeout(),
    }
}

fn open_cloud(scheme: &str, url: &str) -> object_store::Result<Arc<dyn ObjectStore>> {
    crate::ensure_crypto_provider();
    Ok(match scheme {
        "s3" | "s3a" => {
            let mut builder = AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(retry_config())
                .with_http_connector(crate::storewatch::WatchedConnector::new(url));
            // Region, endpoint and credentials as the AWS SDK resolves them (profiles, SSO,
            // credential_process, assume-role, metadata); what the environment sets directly wins.
            let sdk = crate::aws::sdk_settings();
            if builder.get_config_value(&AmazonS3ConfigKey::Region).is_none()
                && let Some(region) = &sdk.region
            {
                builder = builder.with_region(region);
            }
            if builder.get_config_value(&AmazonS3ConfigKey::Endpoint).is_none()
                && let Some(endpoint) = &sdk.endpoint_url
            {
                builder = builder.with_endpoint(endpoint);
            }
            let skip_signature =
                builder.get_config_value(&AmazonS3ConfigKey::SkipSignature).is_some_and(|v| v == "true");
            if !skip_signature {
                builder = builder.with_credentials(Arc::new(crate::aws::SdkCredentials::new(sdk.region)));
            }
            let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint).unwrap_or_default();
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
            Arc::new(builder.build()?)
        }
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .with_retry(retry_config())
                .with_http_connector(crate::storewatch::WatchedConnector::new(url))
                .build()?,
        ),
        _ => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .with_retry(retry_config())
                .with_http_connector(crate::storewatch::WatchedConnector::new(url))
                .build()?,
        ),
    })
}

fn open_local(url: &str, path: &std::path::Path) -> Result<Location, StoreError> {
    std::fs::create_dir_all(path)
        .map_err(|source| StoreError::LocalDir { path: path.display().to_string(), source })?;
    let store = LocalFileSystem::new_with_prefix(path)
        .map_err(|source| StoreError::Open { url: url.to_owned(), source })?
        .with_automatic_cleanup(true);
    Ok(Location {
        url: url.to_owned(),
        store: Arc::new(store),
        prefix: Path::default(),
        local_root: Some(path.to_owned()),
    })
}

/// Writes `bytes` at `key` only if nothing is there yet. Returns false when it already existed.
///
/// # Errors
/// The store's error for any failure other than `AlreadyExists`.
pub async fn put_create(store: &dyn ObjectStore, key: &Path, bytes: Vec<u8>) -> object_store::Result<bool> {
    let options = PutOptions { mode: PutMode::Create, ..Default::default() };
    match store.put_opts(key, PutPayload::from(bytes), options).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Objects above this size are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 8 << 20;

/// Writes `bytes` at `key`, as a multipart upload of 8 MiB parts when larger than
/// [`MULTIPART_THRESHOLD`] (S3 single PUTs are limited and retry whole).
///
/// # Errors
/// The store's error from the PUT or from any part of the multipart upload.
pub async fn put_large(store: &dyn ObjectStore, key: &Path, bytes: Vec<u8>) -> object_store::Result<()> {
    if bytes.len() <= MULTIPART_THRESHOLD {
        store.put(key, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let upload = store.put_multipart(key).await?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, MULTIPART_THRESHOLD);
    writer.write(&bytes);
    writer.finish().await?;
    Ok(())
}

/// Where a model file is read from: a local path as is, or an object-store URL downloaded, with
/// every external-data file it names ([`crate::modelmeta::external_data_locations`], whatever
/// their names and subfolders), into `cache_dir/<hash of URL>/`, keeping the relative paths the
/// model's references expect. Downloads are atomic (temporary file + rename) and reused while the
/// object's size, ETag and modification time are unchanged.
///
/// # Errors
/// Those of [`open`]; [`StoreError::Open`] when the model or one of its external-data files
/// cannot be read; [`StoreError::ModelFiles`] for an external-data location outside the model's
/// folder; [`StoreError::LocalDir`] when the cache folder or file cannot be written.
pub async fn fetch_model(url: &str, cache_dir: &std::path::Path) -> Result<std::path::PathBuf, StoreError> {
    let local = url.strip_prefix("file://").unwrap_or(url);
    if !is_url(local) {
        return Ok(std::path::PathBuf::from(local));
    }
    let location = open(url)?;
    let name = location.prefix.filename().unwrap_or("model.onnx").to_owned();
    let dir = cache_dir.join(&crate::sha256_hex(url.as_bytes())[7..23]);
    let local_err = |source| StoreError::LocalDir { path: dir.display().to_string(), source };
    std::fs::create_dir_all(&dir).map_err(local_err)?;
    // The model first, then every external-data file it names (read from the fetched copy), as
    // one set: a model is never loaded with another model's weights or without its own.
    fetch_object(&location, &location.prefix, &dir, &name, url).await?;
    let model = dir.join(&name);
    let locations = crate::modelmeta::external_data_locations(&model).unwrap_or_default();
    let folder = location.prefix.parts().collect::<Vec<_>>();
    let folder = &folder[..folder.len().saturating_sub(1)];
    for relative in locations {
        if crate::modelmeta::leaves_the_folder(&relative) {
            return Err(StoreError::ModelFiles(crate::modelmeta::ModelFilesError::OutsideFolder {
                model: std::path::PathBuf::from(url),
                location: relative,
            }));
        }
        let key: Path = folder
            .iter()
            .cloned()
            .chain(relative.split('/').filter(|p| !p.is_empty() && *p != ".").map(object_store::path::PathPart::from))
            .collect();
        let target = std::path::Path::new(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(dir.join(parent)).map_err(local_err)?;
        }
        fetch_object(&location, &key, &dir, &relative, url).await?;
    }
    Ok(model)
}

/// Fetches object `key` of the model at `url` into `dir/file`, unless a file of the object's size
/// is already there.
async fn fetch_object(
    location: &Location,
    key: &Path,
    dir: &std::path::Path,
    file: &str,
    url: &str,
) -> Result<(), StoreError> {
    let local_err = |source| StoreError::LocalDir { path: dir.display().to_string(), source };
    let target = dir.join(file);
    let open_err = |source| StoreError::Open { url: format!("{url} ({key})"), source };
    let meta = location.store.head(key).await.map_err(|source| {
        if is_not_found(&source) {
            StoreError::MissingObject { url: url.to_owned(), key: key.to_string() }
        } else {
            open_err(source)
        }
    })?;
    // What the object is now: a file rewritten in place with the same size (new weights of the
    // same shapes) is fetched again.
    let version =
        format!("{}\t{}\t{}", meta.size, meta.e_tag.as_deref().unwrap_or(""), meta.last_modified.timestamp_micros());
    let version_file = dir.join(format!("{file}.version"));
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == meta.size)
        && std::fs::read_to_string(&version_file).is_ok_and(|v| v == version)
    {
        return Ok(());
    }
    // Streamed to disk (a DiT-XL/2 is 2.7 GB; nothing of that size is held in memory), with a
    // progress line every few seconds.
    let mut stream = location.store.get(key).await.map_err(open_err)?.into_stream();
    let partial = dir.join(format!("{file}.partial"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(local_err)?);
    tracing::info!(model = %url, file = %file, mb = meta.size / 1_000_000, cache = %dir.display(), "downloading model");
    let (started, mut reported, mut written) = (std::time::Instant::now(), std::time::Instant::now(), 0u64);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(open_err)?;
        std::io::Write::write_all(&mut out, &chunk).map_err(local_err)?;
        written += chunk.len() as u64;
        if reported.elapsed() >= std::time::Duration::from_secs(5) {
            reported = std::time::Instant::now();
            tracing::info!(
                model = %url,
                file = %file,
                done_mb = written / 1_000_000,
                of_mb = meta.size / 1_000_000,
                mb_per_s = (written as f64 / 1e6 / started.elapsed().as_secs_f64()).round(),
                "downloading model"
            );
        }
    }
    let file_handle = out.into_inner().map_err(|e| local_err(e.into_error()))?;
    file_handle.sync_all().map_err(local_err)?;
    drop(file_handle);
    std::fs::rename(&partial, &target).map_err(local_err)?;
    std::fs::write(&version_file, version).map_err(local_err)?;
    Ok(())
}

/// The default folder for downloaded models: `$MGD3_MODEL_CACHE`, else `mgd3/models` in the
/// platform's cache folder (`$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on
/// macOS), else in the temporary folder.
pub fn model_cache_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("MGD3_MODEL_CACHE") {
        return dir.into();
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("mgd3").join("models")
}

/// Reads an object, `None` when it does not exist. A body cut off after the answer began (which
/// the client does not retry) is read again, as in [`retry_idempotent`].
///
/// # Errors
/// The store's error for anything but `NotFound`.
pub async fn get_optional(store: &dyn ObjectStore, key: &Path) -> object_store::Result<Option<bytes::Bytes>> {
    retry_idempotent(|| async {
        match store.get(key).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Reads an object whole, reading again a body cut off after the answer began.
///
/// # Errors
/// The store's error, `NotFound` included.
pub async fn get_bytes(store: &dyn ObjectStore, key: &Path) -> object_store::Result<bytes::Bytes> {
    retry_idempotent(|| async { store.get(key).await?.bytes().await }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file where a folder goes, or a folder where a file goes, is answered at once: a key
    /// below a file is no object (as an object store says), and a folder cannot be deleted as a
    /// file however long one waits (both were retried as outages, stalling `verify`, `report`
    /// and `resume` for minutes).
    #[tokio::test]
    async fn files_and_folders_in_each_others_place_are_no_outage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("folder/inside")).unwrap();
        let out = open(&dir.path().display().to_string()).unwrap();
        let below_a_file = out.store.get(&out.key("file/below.json")).await.unwrap_err();
        assert!(is_not_found(&below_a_file), "{below_a_file}");
        assert_eq!(get_optional(out.store.as_ref(), &out.key("file/below.json")).await.unwrap(), None);
        let folder = out.store.delete(&out.key("folder")).await.unwrap_err();
        assert!(!transient(&folder) && !is_not_found(&folder), "{folder}");
        let write_below = out.store.put(&out.key("file/new.png"), b"y".to_vec().into()).await.unwrap_err();
        assert!(!transient(&write_below), "{write_below}");
    }

    /// A refusal is found however deep it sits in an error's chain, and other errors are none.
    #[test]
    fn refusals_are_found_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing the manifest")]
        struct Outer(#[source] object_store::Error);
        let full = Outer(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from_raw_os_error(28)),
        });
        assert_eq!(Refusal::in_chain(&full), Some(Refusal::Full));
        let denied = Outer(object_store::Error::PermissionDenied { path: "x".into(), source: "403".into() });
        assert_eq!(Refusal::in_chain(&denied), Some(Refusal::Denied));
        let reset = Outer(object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        });
        assert_eq!(Refusal::in_chain(&reset), None);
    }

    /// A name the file system cannot hold fails at once: the same name fails every time (a
    /// 249-byte class name retried each marker write for three minutes per attempt). A dropped
    /// connection is still retried.
    #[tokio::test]
    async fn a_name_too_long_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().display().to_string()).unwrap();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let key = Path::from(format!("shards/{}.json", "x".repeat(300)));
        let result = retry_idempotent(|| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            store.store.put(&key, PutPayload::from_static(b"{}"))
        })
        .await;
        let error = result.unwrap_err();
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1, "{error}");
        assert!(!transient(&error), "{error:?}");
        let reset = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        };
        assert!(transient(&reset));
    }

    /// A model in an object store comes with every external-data file it names (HF optimum's
    /// `model.onnx_data` and a second file in a subfolder here), and weights rewritten in place
    /// with the same size are fetched again: the worker never loads stale or missing weights.
    #[tokio::test]
    async fn a_model_is_fetched_with_every_external_data_file_it_names() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/external");
        let location = open("memory://fetch-external/models").unwrap();
        for file in ["tiny_vae_decoder.onnx", "model.onnx_data", "weights/rest.bin"] {
            let bytes = std::fs::read(fixtures.join(file)).unwrap();
            location.store.put(&location.key(file), bytes.into()).await.unwrap();
        }
        let cache = tempfile::tempdir().unwrap();
        let url = "memory://fetch-external/models/tiny_vae_decoder.onnx";
        let local = fetch_model(url, cache.path()).await.unwrap();
        let want = crate::fingerprint_file(&fixtures.join("tiny_vae_decoder.onnx")).unwrap();
        assert_eq!(crate::fingerprint_file(&local).unwrap(), want);
        let mut rest = std::fs::read(fixtures.join("weights/rest.bin")).unwrap();
        rest[100] ^= 0xff;
        location.store.put(&location.key("weights/rest.bin"), rest.into()).await.unwrap();
        let again = fetch_model(url, cache.path()).await.unwrap();
        assert_ne!(crate::fingerprint_file(&again).unwrap(), want, "stale weights were reused");
        // A named file missing from the store is an error naming it.
        location.store.delete(&location.key("model.onnx_data")).await.unwrap();
        let error = fetch_model(url, tempfile::tempdir().unwrap().path()).await.unwrap_err();
        assert!(crate::error_chain(&error).contains("model.onnx_data"), "{}", crate::error_chain(&error));
        // A model that is not there at all is said in one sentence, not as the client's request dump.
        let missing = "memory://fetch-external/models/Tiny_vae_decoder.onnx";
        let error = crate::error_chain(&fetch_model(missing, tempfile::tempdir().unwrap().path()).await.unwrap_err());
        assert!(
            error.starts_with(&format!("`{missing}` is not in the store (no object at key"))
                && error.contains("case-sensitive"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn create_only_puts_have_one_winner_on_every_backend() {
        let dir = tempfile::tempdir().unwrap();
        for url in [
            dir.path().display().to_string(),
            format!("file://{}/sub", dir.path().display()),
            "memory://create-test/x".into(),
        ] {
            let location = open(&url).unwrap();
            let key = location.key("jobs/a/marker.json");
            assert!(put_create(location.store.as_ref(), &key, b"first".to_vec()).await.unwrap(), "{url}");
            assert!(!put_create(location.store.as_ref(), &key, b"second".to_vec()).await.unwrap(), "{url}");
            let bytes = get_optional(location.store.as_ref(), &key).await.unwrap().unwrap();
            assert_eq!(&bytes[..], b"first");
            assert!(get_optional(location.store.as_ref(), &location.key("missing")).await.unwrap().is_none());
        }
    }

    #[test]
    fn urls_and_paths_resolve() {
        let base = std::path::Path::new("/base");
        assert_eq!(resolve("s3://b/k", base), "s3://b/k");
        assert_eq!(resolve("rel/dir", base), "/base/rel/dir");
        assert_eq!(resolve("/abs", base), "/abs");
        assert_eq!(resolve("../x/./y", base), "/x/y");
        // file:// URLs are local paths: decoded, `localhost` dropped, relative ones from `base`
        // (`file://models/x` was read from the current folder, another model than the spec's).
        assert_eq!(resolve("file:///abs/sp%20ace/m%C3%B6dels", base), "/abs/sp ace/mödels");
        assert_eq!(resolve("file://localhost/abs/m.onnx", base), "/abs/m.onnx");
        assert_eq!(resolve("FILE:///abs", base), "/abs");
        assert_eq!(resolve("file://models/x.onnx", base), "/base/models/x.onnx");
        assert_eq!(resolve("file://../m/x.onnx", base), "/m/x.onnx");
        assert!(matches!(open("bogus://x/y"), Err(StoreError::BadUrl { .. })));
        // One slash is a typo, not a local folder named `s3:`.
        let typo = open("s3:/bucket/state").unwrap_err().to_string();
        assert!(typo.contains("write `s3://bucket/state`"), "{typo}");
        let s3 = open("s3://bucket/some/prefix").unwrap();
        assert_eq!(s3.key("jobs/a").as_ref(), "some/prefix/jobs/a");
        assert!(open("s3:///no-bucket").is_err());
        let memory = open("memory://m/a/b").unwrap();
        assert_eq!(memory.key("c/d.json").as_ref(), "a/b/c/d.json");
        assert_eq!(memory.child("c").key("x").as_ref(), "a/b/c/x");
    }

    /// What S3, GCS and Azure answer, as object_store reports it: a message quoting the body.
    fn answered(status: &str, body: &str) -> object_store::Error {
        let text =
            format!("Error performing PUT http://h/b/k in 2ms - Server returned non-2xx status code: {status}: {body}");
        object_store::Error::Generic { store: "S3", source: text.into() }
    }

    #[test]
    fn store_problems_are_recognised_and_told_in_one_sentence() {
        let xml = |code: &str, extra: &str| {
            format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message>{extra}</Error>")
        };
        let missing = object_store::Error::NotFound {
            path: "state/x".into(),
            source: answered("404 Not Found", &xml("NoSuchBucket", "<BucketName>runs</BucketName>")).into(),
        };
        assert_eq!(StoreProblem::of(&missing), Some(StoreProblem::NoSuchBucket { bucket: Some("runs".into()) }));
        assert!(!is_not_found(&missing), "a missing bucket is no missing object");
        let no_key = object_store::Error::NotFound {
            path: "state/x".into(),
            source: answered("404 Not Found", &xml("NoSuchKey", "")).into(),
        };
        assert_eq!(StoreProblem::of(&no_key), None);
        assert!(is_not_found(&no_key));
        for code in ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"] {
            let denied = answered("403 Forbidden", &xml(code, ""));
            assert_eq!(StoreProblem::of(&denied), Some(StoreProblem::Denied { code: code.into() }), "{code}");
        }
        let azure = answered("404 The specified container does not exist.", "ContainerNotFound");
        assert_eq!(StoreProblem::of(&azure), Some(StoreProblem::NoSuchBucket { bucket: None }));
        assert_eq!(StoreProblem::of(&answered("503 Slow Down", &xml("SlowDown", ""))), None);
        let credentials = object_store::Error::Generic {
            store: "S3",
            source: Box::new(crate::aws::CredentialsError::NotFound { profile: "lab".into() }),
        };
        let Some(StoreProblem::Credentials { message }) = StoreProblem::of(&credentials) else { panic!() };
        assert!(message.starts_with("no AWS credentials found for profile `lab`"), "{message}");

        // In an error chain the sentence replaces the request dump, and nothing is said twice.
        #[derive(Debug, thiserror::Error)]
        #[error("the coordinator lock `coordinator.lock`")]
        struct Lock(#[source] object_store::Error);
        assert_eq!(
            crate::error_chain(&Lock(missing)),
            "the coordinator lock `coordinator.lock`: the bucket `runs` does not exist: create it \
             (e.g. `aws s3 mb s3://runs`) or correct the bucket name in the URL"
        );
        let refused = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused")),
        };
        assert_eq!(StoreProblem::of(&refused), Some(StoreProblem::Unreachable));
        assert!(StoreProblem::Unreachable.to_string().contains("AWS_ENDPOINT_URL"));
        // A server that accepts and never answers: the HTTP client's timeout, said the same way.
        let hung = object_store::Error::Generic {
            store: "S3",
            source: Box::new(object_store::client::HttpError::new(
                object_store::client::HttpErrorKind::Timeout,
                std::io::Error::other("error sending request"),
            )),
        };
        assert_eq!(StoreProblem::of(&hung), Some(StoreProblem::Unreachable));
        let other = answered("500 Internal Server Error", "boom");
        let expected = format!("the coordinator lock `coordinator.lock`: {other}");
        assert_eq!(crate::error_chain(&Lock(other)), expected);
    }
}
