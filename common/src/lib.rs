//! Types shared by every mgd3 crate that must not depend on ONNX Runtime or ndarray: the wire
//! protocol, job specs and their fingerprints, the object-store key layout and manifests, store
//! URLs, per-sample seeding, ImageNet class lists and the tracing set-up of both binaries.

pub mod classes;
pub mod commit;
pub mod job;
pub mod layout;
pub mod manifest;
pub mod rpc;
pub mod seed;
pub mod store;
pub mod telemetry;

/// The generated gRPC types and clients/servers of `proto/mgd3.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("mgd3.v1");
}

/// Bumped on any incompatible change of the wire protocol or of the meaning of its fields.
pub const PROTOCOL_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch (the clock leases and state files use).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// sha256 of bytes as `sha256:<hex>`, the form of every fingerprint and image digest.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Fingerprint of a model file: sha256 over the file and its external-data file
/// (`<model>.data`) when present, as `sha256:<hex>`.
pub fn fingerprint_file(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut hasher = sha2::Sha256::new();
    let mut data_path = path.as_os_str().to_owned();
    data_path.push(".data");
    let data_path = std::path::PathBuf::from(data_path);
    let mut files = vec![path.to_owned()];
    if data_path.exists() {
        files.push(data_path);
    }
    let mut buffer = vec![0u8; 1 << 20];
    for file in files {
        let mut reader = std::fs::File::open(&file)?;
        loop {
            let n = reader.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Makes ring the process-wide rustls crypto provider. Both ring (tonic) and aws-lc (the cloud
/// object-store clients) are linked in, and rustls refuses to guess between two; every TLS user in
/// the project calls this first. Idempotent.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
