//! AWS credentials, region and endpoint the way the official AWS SDK finds them, for the S3
//! stores object_store builds: environment variables, shared profiles (static keys, SSO,
//! `credential_process`, `role_arn` with `source_profile` or web identity), container and
//! instance metadata — the SDK's default chain (`aws-config`), so a cluster's usual setup works
//! without anything mgd3-specific.
//!
//! object_store asks for a credential before every request; the SDK's providers do not cache
//! (its clients do), so [`SdkCredentials`] keeps the last credential until five minutes before it
//! expires. A chain that finds nothing reports [`CredentialsError::NotFound`], which
//! [`crate::store::StoreProblem`] turns into one sentence saying what to set.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError as SdkCredentialsError;
use object_store::CredentialProvider;
use object_store::aws::AwsCredential;
use thiserror::Error;
use tokio::sync::{Mutex, OnceCell};

/// Why no AWS credential could be had.
#[derive(Debug, Error)]
pub enum CredentialsError {
    /// Every provider of the chain was tried and none had credentials.
    #[error(
        "no AWS credentials found for profile `{profile}` (looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
         the shared config and credentials files, SSO, credential_process, web identity, container and \
         instance metadata): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, pick a configured profile \
         with AWS_PROFILE, or run `aws sso login`"
    )]
    NotFound {
        /// The profile the chain read (`AWS_PROFILE`, or `default`).
        profile: String,
    },
    /// Nothing before instance metadata had credentials, and the instance metadata service (the
    /// chain's last resort) refused or failed: off EC2, IMDS disabled, a hop limit. For a person
    /// this is "none found", with the service's answer kept as the reason.
    #[error(
        "no AWS credentials found for profile `{profile}` (looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
         the shared config and credentials files, SSO, credential_process, web identity and container \
         credentials; instance metadata answered: {metadata}): set AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, pick a configured profile with AWS_PROFILE, or run `aws sso login`"
    )]
    MetadataOnly {
        /// The profile the chain read.
        profile: String,
        /// The instance metadata service's answer, innermost cause first.
        metadata: String,
    },
    /// A provider was configured but failed (a broken profile, a `credential_process` that
    /// exited non-zero, an SSO token that expired, an assume-role call that was refused).
    #[error("the AWS credential chain failed for profile `{profile}`")]
    Provider {
        /// The profile the chain read.
        profile: String,
        /// The SDK's error.
        #[source]
        source: SdkCredentialsError,
    },
}

/// Region and endpoint the SDK's chains resolve (environment, then the profile; the region also
/// from instance metadata). Either may be absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SdkSettings {
    /// `AWS_REGION` / `AWS_DEFAULT_REGION` / the profile's `region`.
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, or the profile's `endpoint_url` (an
    /// S3-compatible server such as MinIO or Ceph).
    pub endpoint_url: Option<String>,
}

/// The profile the SDK reads: `AWS_PROFILE`, else `default`.
pub fn profile_name() -> String {
    std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "default".into())
}

async fn load(region: Option<String>) -> SdkConfig {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    // The SDK's HTTP client on rustls with ring, the crypto provider the rest of the process uses.
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = region {
        loader = loader.region(Region::new(region));
    }
    loader.load().await
}

/// Resolves [`SdkSettings`] synchronously. The SDK's loaders are async; this runs them on a
/// short-lived thread with its own runtime so that store URLs can be opened from sync code and
/// from inside a runtime alike. It reads files and the environment, and asks instance metadata for
/// the region only when neither names one (as every SDK does; `AWS_EC2_METADATA_DISABLED=true`
/// turns that off).
///
/// Resolved once per process (the environment and the files are read at start, as the SDK's own
/// clients do): a region lookup that has to wait for instance metadata is paid once.
pub fn sdk_settings() -> SdkSettings {
    static SETTINGS: std::sync::OnceLock<SdkSettings> = std::sync::OnceLock::new();
    SETTINGS.get_or_init(resolve_settings).clone()
}

fn resolve_settings() -> SdkSettings {
    let resolve = || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        Some(runtime.block_on(async {
            let config = load(None).await;
            let s3_endpoint = std::env::var("AWS_ENDPOINT_URL_S3").ok().filter(|e| !e.is_empty());
            SdkSettings {
                region: config.region().map(|r| r.to_string()),
                endpoint_url: s3_endpoint.or_else(|| config.endpoint_url().map(str::to_owned)),
            }
        }))
    };
    std::thread::scope(|scope| scope.spawn(resolve).join().ok().flatten()).unwrap_or_default()
}

/// How long before its expiry a cached credential is refreshed.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

/// object_store's credential provider backed by the AWS SDK's default chain, loaded on first use
/// inside the caller's runtime (so its connections belong to that runtime) and cached until
/// five minutes before the credential's expiry.
#[derive(Debug)]
pub struct SdkCredentials {
    region: Option<String>,
    config: OnceCell<SdkConfig>,
    cached: Mutex<Option<(Arc<AwsCredential>, Option<SystemTime>)>>,
}

impl SdkCredentials {
    /// A provider for `region` (the chain's own region lookup is skipped when it is given).
    pub fn new(region: Option<String>) -> Self {
        Self { region, config: OnceCell::new(), cached: Mutex::new(None) }
    }

    /// A fresh credential from the chain.
    ///
    /// # Errors
    /// [`CredentialsError::NotFound`] when no provider has credentials,
    /// [`CredentialsError::Provider`] when one fails.
    pub async fn fetch(&self) -> Result<(Arc<AwsCredential>, Option<SystemTime>), CredentialsError> {
        let config = self.config.get_or_init(|| load(self.region.clone())).await;
        let profile = profile_name();
        let Some(provider) = config.credentials_provider() else {
            return Err(CredentialsError::NotFound { profile });
        };
        let credentials = provider.provide_credentials().await.map_err(|source| classify(profile.clone(), source))?;
        let credential = AwsCredential {
            key_id: credentials.access_key_id().to_owned(),
            secret_key: credentials.secret_access_key().to_owned(),
            token: credentials.session_token().map(str::to_owned),
        };
        Ok((Arc::new(credential), credentials.expiry()))
    }
}

/// What a failed chain means to a person: nothing found, nothing found but instance metadata
/// failing (the SDK reports the last provider's error, so a machine without IMDS fails that way),
/// or a configured provider that failed.
fn classify(profile: String, source: SdkCredentialsError) -> CredentialsError {
    if let SdkCredentialsError::CredentialsNotLoaded(_) = source {
        return CredentialsError::NotFound { profile };
    }
    // The SDK's errors carry no provider name; its IMDS provider names itself in every message.
    let mut causes = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(error) = cause {
        causes.push(error.to_string());
        cause = error.source();
    }
    if causes.iter().any(|c| c.contains("IMDS")) {
        let metadata = causes.last().cloned().unwrap_or_default();
        return CredentialsError::MetadataOnly { profile, metadata };
    }
    CredentialsError::Provider { profile, source }
}

#[async_trait::async_trait]
impl CredentialProvider for SdkCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cached = self.cached.lock().await;
        if let Some((credential, expiry)) = cached.as_ref() {
            let fresh = expiry.is_none_or(|at| SystemTime::now() + REFRESH_BEFORE_EXPIRY < at);
            if fresh {
                return Ok(credential.clone());
            }
        }
        let (credential, expiry) =
            self.fetch().await.map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?;
        *cached = Some((credential.clone(), expiry));
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Error)]
    #[error("{0}")]
    struct Cause(&'static str);

    #[derive(Debug, Error)]
    #[error("{message}")]
    struct Wrapped {
        message: &'static str,
        #[source]
        source: Cause,
    }

    #[test]
    fn a_failing_chain_reads_as_what_it_means() {
        let none = classify("lab".into(), SdkCredentialsError::not_loaded(Cause("no providers in chain")));
        assert!(matches!(none, CredentialsError::NotFound { .. }), "{none:?}");
        // Off EC2 (or IMDS disabled), the chain ends in the metadata provider's error.
        let imds = SdkCredentialsError::provider_error(Wrapped {
            message: "failed to load IMDS session token",
            source: Cause("request forbidden: IMDS is disabled or the caller has insufficient permissions."),
        });
        let text = classify("default".into(), imds).to_string();
        assert!(text.starts_with("no AWS credentials found for profile `default`"), "{text}");
        assert!(text.contains("instance metadata answered: request forbidden: IMDS is disabled"), "{text}");
        assert!(text.contains("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{text}");
        // A configured provider that fails keeps its own error.
        let process = SdkCredentialsError::provider_error(Cause("credential_process exited with status 1"));
        assert!(matches!(classify("lab".into(), process), CredentialsError::Provider { .. }));
    }
}
