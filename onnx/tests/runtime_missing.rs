//! A missing ONNX Runtime library gives one error that says how to install it. (Own test binary:
//! the runtime is process-global.)

use mgd3_onnx::{Error, init_runtime};

#[test]
fn missing_library_says_how_to_install_it() {
    let err = init_runtime(Some(std::path::Path::new("/nonexistent/libonnxruntime.so"))).err().unwrap();
    assert!(matches!(err, Error::RuntimeUnavailable { .. }));
    let text = err.to_string();
    assert!(text.contains("/nonexistent/libonnxruntime.so") && text.contains("scripts/setup_ort.sh"), "{text}");
    // A file that is not a shared library at all.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a library").unwrap();
    let text = init_runtime(Some(&fake)).err().unwrap().to_string();
    assert!(text.contains("cannot load ONNX Runtime"), "{text}");
}
