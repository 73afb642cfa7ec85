//! The fused export (`scripts/export_onnx.py --graph fused` / `fuse`), checked by
//! `scripts/check_fused_export.py`: DiT-XL/2's structure exports with 28 fused attentions, no
//! Softmax and 28 FastGelu (fp32, fp16 and bf16), and the fused tiny, demo and VAE graphs match the
//! plain ones within 1e-4 relative, as does the CUDA VAE graph (`cuda-vae`: fused GroupNorm, NHWC
//! convolutions) with its CUDA-only operators spelt out. It needs PyTorch, ONNX and onnxscript in `.venv-eval`
//! (`scripts/setup_test_servers.sh`); without them the test is skipped with a note, unless
//! `MGD3_REQUIRE_TORCH=1` (CI).

use std::path::PathBuf;
use std::process::Command;

fn python() -> Option<PathBuf> {
    let python = std::env::var_os("MGD3_EVAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-eval/bin/python"));
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import torch, onnx, onnxscript, onnxruntime"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        assert!(
            std::env::var("MGD3_REQUIRE_TORCH").as_deref() != Ok("1"),
            "PyTorch, ONNX or onnxscript is not installed at {}: run scripts/setup_test_servers.sh",
            python.display()
        );
        eprintln!(
            "note: skipping the fused-export test: no PyTorch/ONNX in .venv-eval (scripts/setup_test_servers.sh)"
        );
        return None;
    }
    Some(python)
}

#[test]
fn fused_exports_have_one_attention_node_per_block_and_match_the_plain_graphs() {
    let Some(python) = python() else { return };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_fused_export.py");
    let out = Command::new(python).arg(script).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for precision in ["fp32", "fp16", "bf16"] {
        let line = format!(
            "[census] DiT-XL/2 structure, fused, {precision}: 28 fused attentions, 0 bare Softmax, 28 FastGelu, 57 LayerNormalization"
        );
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
    for model in ["tiny_dit.onnx", "fashion_mnist_dit.onnx", "tiny_vae_decoder.onnx"] {
        assert!(text.contains(&format!("/{model} vs ")), "{model} not compared:\n{text}");
    }
    for model in ["tiny_vae_decoder.onnx", "tiny_vae_encoder.onnx"] {
        let line = format!("[census] {model}, CUDA graph, fp32: 1 fused attention, 0 bare Softmax");
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
        assert!(text.contains(&format!("/{model} vs ")) && text.contains("(CUDA-only operators spelt out)"), "{text}");
    }
    assert!(text.contains("[census] tiny_vae_decoder.onnx, CUDA graph, fp16: 1 fused attention"), "{text}");
    assert!(text.contains("[repeated nodes] exact repeats dropped, a clash refused"), "{text}");
    assert!(text.contains("fused exports: all checks passed"), "{text}");
}
