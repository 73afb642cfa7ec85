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

/// `export_onnx.py` never leaves a wrong model under the right name: a failed check leaves `--out`
/// as it was (it replaced a good model before failing), `--out` naming the source is refused (a
/// checkpoint was overwritten), a diffusers folder of another kind of model is refused (its
/// missing weights were filled at random and the export said `done`), a checkpoint holding more
/// than weights needs `--trust-pickle` (it was unpickled silently), and a scale factor that is no
/// positive number is refused. A good export leaves no staging folder behind.
#[test]
fn failed_or_wrong_exports_leave_nothing_under_the_models_name() {
    let Some(python) = python() else { return };
    let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let dir = tempfile::tempdir().unwrap();
    let make = format!(
        "import sys, argparse; sys.path.insert(0, {scripts:?}); import torch, export_onnx\n\
         sd = export_onnx.DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10).state_dict()\n\
         torch.save(sd, 'd.pt'); torch.save({{'model': sd, 'args': argparse.Namespace(a=1)}}, 'train.pt')\n\
         from diffusers import AutoencoderKL\n\
         AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2, \
         up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=4, in_channels=1, \
         out_channels=1, sample_size=32).save_pretrained('vae_dir')\n",
        scripts = scripts.display().to_string()
    );
    let made = Command::new(&python).args(["-c", &make]).current_dir(dir.path()).output().unwrap();
    if !made.status.success() && String::from_utf8_lossy(&made.stderr).contains("No module named 'diffusers'") {
        assert!(std::env::var("MGD3_REQUIRE_TORCH").as_deref() != Ok("1"), "diffusers is not installed");
        eprintln!("note: skipping the export-refusal test: no diffusers in .venv-eval");
        return;
    }
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let good = dir.path().join("good.onnx");
    std::fs::copy(scripts.join("../models/demo/fashion_mnist_dit.onnx"), &good).unwrap();
    let export = |args: &[&str]| {
        let out = Command::new(&python)
            .arg(scripts.join("export_onnx.py"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let before = (std::fs::read(&good).unwrap(), std::fs::read(dir.path().join("d.pt")).unwrap());
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "dit",
                "--checkpoint",
                "d.pt",
                "--out",
                "good.onnx",
                "--num-heads",
                "2",
                "--graph",
                "plain",
                "--tol",
                "0",
            ],
            "good.onnx: output out differs",
        ),
        (&["dit", "--checkpoint", "d.pt", "--out", "d.pt", "--num-heads", "2"], "is the model being exported"),
        (&["dit", "--checkpoint", "train.pt", "--out", "t.onnx", "--num-heads", "2"], "--trust-pickle"),
        (&["dit", "--diffusers", "vae_dir", "--out", "v.onnx"], "weights of a DiTTransformer2DModel are not in it"),
        (&["vae", "--diffusers", "vae_dir", "--out-dir", "vout", "--scale-factor", "nan"], "is a positive number"),
    ];
    for (args, said) in cases {
        let (ok, text) = export(args);
        assert!(!ok && text.contains(said), "{args:?}: {text}");
    }
    assert!(
        before == (std::fs::read(&good).unwrap(), std::fs::read(dir.path().join("d.pt")).unwrap()),
        "a file was replaced"
    );
    for gone in ["t.onnx", "v.onnx", "vout"] {
        assert!(!dir.path().join(gone).exists(), "{gone} was written");
    }
    let (ok, text) =
        export(&["dit", "--checkpoint", "train.pt", "--trust-pickle", "--out", "ok.onnx", "--num-heads", "2"]);
    assert!(ok && dir.path().join("ok.onnx").is_file(), "{text}");
    let staging: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(staging.is_empty(), "left behind: {staging:?}");
}
