//! The `worker` binary end to end on the tiny fixtures: `sample` reproduces the independent
//! Python fixtures, `distill-class` distils a small ImageFolder deterministically, and bad inputs
//! (missing class, corrupt image, too few images, malformed model) fail naming the item.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use ndarray::Array4;
use ndarray_npy::read_npy;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker")).args(args).args(["--threads", "1"]).output().expect("run worker")
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "worker failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn stderr(out: &Output) -> String {
    assert!(!out.status.success(), "worker should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `worker sample` on the parity case `tstop25_ch3`, writing latents to `out`, plus `extra` flags.
fn sample_case(out: &Path, extra: &[&str]) -> Output {
    let case = fixtures().join("parity/tstop25_ch3");
    let (modes, noise) = (case.join("modes.npy"), case.join("noise.npy"));
    let mut args = vec!["sample", "--dit"];
    let dit = model("tiny_dit.onnx");
    args.extend([dit.as_str(), "--label", "3", "--modes", modes.to_str().unwrap(), "--noise", noise.to_str().unwrap()]);
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    worker(&args)
}

/// `worker sample --sampler ddim --eta 1` reproduces the independent DDIM reference (the paper's
/// Algorithm 1); `--eta` without `--sampler ddim`, or outside 0..=1, is refused naming the flag.
#[test]
fn sample_with_ddim_reproduces_the_python_reference_and_eta_is_checked() {
    let case = fixtures().join("parity_ddim/eta1_tstop25_ch4");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latents.npy");
    let (modes, noise) = (case.join("modes.npy"), case.join("noise.npy"));
    let dit = model("tiny_dit.onnx");
    let mut args = vec!["sample", "--dit", dit.as_str(), "--label", "3"];
    args.extend([
        "--modes",
        modes.to_str().unwrap(),
        "--noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    args.extend(["--stop-guidance", "25", "--cfg-channels", "4", "--sampler", "ddim", "--eta", "1"]);
    assert_ok(&worker(&args));
    let ours: Array4<f32> = read_npy(&out).unwrap();
    let reference: Array4<f32> = read_npy(case.join("latents.npy")).unwrap();
    assert_eq!(ours.shape(), reference.shape());
    for (a, b) in ours.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-4 + 1e-5 * b.abs(), "{a} vs {b}");
    }
    // The DDPM sampler on the same inputs gives other latents.
    let ddpm = dir.path().join("ddpm.npy");
    let mut ddpm_args: Vec<&str> = args[..args.len() - 4].to_vec();
    let position = ddpm_args.iter().position(|a| *a == "--out").unwrap();
    ddpm_args[position + 1] = ddpm.to_str().unwrap();
    assert_ok(&worker(&ddpm_args));
    assert_ne!(read_npy::<_, Array4<f32>>(&ddpm).unwrap(), ours);

    for (sampler, eta) in [("ddpm", "0.5"), ("ddim", "1.5")] {
        let mut bad = args[..args.len() - 4].to_vec();
        bad.extend(["--sampler", sampler, "--eta", eta]);
        let err = stderr(&worker(&bad));
        assert!(err.contains("--eta") && err.contains(eta), "{sampler} {eta}: {err}");
    }
    let err = stderr(&worker(&[&args[..args.len() - 4], &["--sampler", "euler"]].concat()));
    assert!(err.contains("euler"), "{err}");
}

#[test]
fn sample_reproduces_the_python_reference() {
    let case = fixtures().join("parity/tstop25_ch3");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latents.npy");
    let images = dir.path().join("images");
    let decoder = model("tiny_vae_decoder.onnx");
    let result = sample_case(
        &out,
        &[
            "--vae-decoder",
            &decoder,
            "--images-out",
            images.to_str().unwrap(),
            "--stop-guidance",
            "25",
            "--guidance-scale",
            "0.1",
            "--cfg-scale",
            "4",
            "--cfg-channels",
            "3",
            "--steps",
            "50",
            "--max-batch",
            "2",
        ],
    );
    assert_ok(&result);
    let ours: Array4<f32> = read_npy(&out).unwrap();
    let reference: Array4<f32> = read_npy(case.join("latents.npy")).unwrap();
    for (a, b) in ours.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-4 + 1e-5 * b.abs(), "{a} vs {b}");
    }
    let pixels: ndarray::Array4<u8> = read_npy(case.join("images.npy")).unwrap();
    for j in 0..3 {
        let png = image::open(images.join(format!("{j}.png"))).unwrap().to_rgb8();
        for (x, y, p) in png.enumerate_pixels() {
            for c in 0..3 {
                let want = pixels[[j, y as usize, x as usize, c]] as i32;
                assert!((p.0[c] as i32 - want).abs() <= 1);
            }
        }
    }
}

#[test]
fn sample_rejects_noise_of_the_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latents.npy");
    let result = sample_case(&out, &["--steps", "40"]);
    let text = stderr(&result);
    assert!(text.contains("noise.npy") && text.contains("41"), "{text}");
    assert!(!out.exists());
}

/// `worker sample` on the CPU with the CUDA VAE graph as its decoder says what the file is,
/// before any sampling, as `distill-class` does (not ONNX Runtime's "Could not find an
/// implementation for NhwcConv").
#[test]
fn sample_with_a_cuda_only_decoder_on_the_cpu_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (out, images) = (dir.path().join("latents.npy"), dir.path().join("images"));
    let decoder = model("tiny_vae_decoder_cuda.onnx");
    let result = sample_case(&out, &["--vae-decoder", &decoder, "--images-out", images.to_str().unwrap()]);
    let text = stderr(&result);
    assert!(
        !result.status.success()
            && text.contains("tiny_vae_decoder_cuda.onnx` is the CUDA graph of a VAE")
            && !text.contains("NhwcConv"),
        "{text}"
    );
    assert!(!out.exists(), "nothing sampled");
}

/// The trained demo DiT (models/demo) at a mode-guidance scale where guidance runs away: the run
/// fails naming the sample and the step instead of writing saturated latents; the paper's λ works.
#[test]
fn sample_with_a_runaway_guidance_scale_fails_naming_sample_and_step() {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let dir = tempfile::tempdir().unwrap();
    let (modes, noise) = (dir.path().join("modes.npy"), dir.path().join("noise.npy"));
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(7);
    let mut normal =
        |shape: &[usize]| ndarray::ArrayD::from_shape_simple_fn(shape, || -> f32 { StandardNormal.sample(&mut rng) });
    ndarray_npy::write_npy(&modes, &normal(&[4, 4, 8, 8])).unwrap();
    ndarray_npy::write_npy(&noise, &normal(&[4, 51, 4, 8, 8])).unwrap();
    let dit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo/fashion_mnist_dit.onnx");
    let run = |lambda: &str, out: &Path| {
        let mut args = vec!["sample", "--dit", dit.to_str().unwrap(), "--label", "5"];
        args.extend(["--modes", modes.to_str().unwrap(), "--noise", noise.to_str().unwrap()]);
        args.extend(["--out", out.to_str().unwrap(), "--guidance-scale", lambda, "--stop-guidance", "25"]);
        args.extend(["--cfg-channels", "4", "--cfg-scale", "4", "--steps", "50"]);
        worker(&args)
    };
    let runaway = dir.path().join("runaway.npy");
    let text = stderr(&run("0.4", &runaway));
    // It runs away while guidance is on and the noise is high (i in 40..=49).
    assert!(text.contains("diverged at step i = 4") && text.contains("λ = 0.4"), "{text}");
    assert!(!runaway.exists());
    let fine = dir.path().join("fine.npy");
    assert_ok(&run("0.1", &fine));
    let latents: Array4<f32> = read_npy(&fine).unwrap();
    assert!(latents.iter().all(|v| v.is_finite() && v.abs() < 20.0));
}

/// A small ImageFolder of real-looking images: PNG and JPEG, RGB and grayscale, odd sizes.
fn image_folder(root: &Path, class: &str, count: usize) {
    let dir = root.join(class);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..count {
        let (w, h) = (20 + 7 * (i as u32 % 5), 18 + 5 * (i as u32 % 3));
        let phase = i as f32 * 0.7;
        let rgb = RgbImage::from_fn(w, h, |x, y| {
            let v = |k: f32| (127.0 + 120.0 * ((x as f32 * 0.3 + phase * k).sin() * (y as f32 * 0.2 - k).cos())) as u8;
            image::Rgb([v(1.0), v(2.0), v(3.0)])
        });
        let image = if i % 4 == 3 {
            DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, y| image::Luma([rgb.get_pixel(x, y).0[1]])))
        } else {
            DynamicImage::ImageRgb8(rgb)
        };
        let (name, format) = if i % 2 == 0 {
            (format!("img_{i:03}.png"), ImageFormat::Png)
        } else {
            (format!("img_{i:03}.jpg"), ImageFormat::Jpeg)
        };
        image.save_with_format(dir.join(name), format).unwrap();
    }
}

fn distill_args(data: &Path, class: &str, out: &Path, ipc: &str, dit: &str) -> Vec<String> {
    let mut args: Vec<String> =
        ["distill-class", "--data", data.to_str().unwrap(), "--class", class, "--label", "3", "--ipc", ipc, "--dit"]
            .into_iter()
            .map(String::from)
            .collect();
    args.extend([model(dit), "--vae-encoder".into(), model("tiny_vae_encoder.onnx")]);
    args.extend(["--vae-decoder".into(), model("tiny_vae_decoder.onnx"), "--out".into(), out.display().to_string()]);
    args.extend(["--steps", "20", "--stop-guidance", "10", "--seed", "7"].map(String::from));
    args
}

fn distill(data: &Path, class: &str, out: &Path, ipc: &str, dit: &str) -> Output {
    let args = distill_args(data, class, out, ipc, dit);
    worker(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn distill_class_writes_ipc_images_and_modes_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n01440764", 12);
    let (first, second) = (dir.path().join("a"), dir.path().join("b"));
    assert_ok(&distill(&data, "n01440764", &first, "4", "tiny_dit.onnx"));
    assert_ok(&distill(&data, "n01440764", &second, "4", "tiny_dit.onnx"));
    let modes: Array4<f32> = read_npy(first.join("n01440764/modes.npy")).unwrap();
    assert_eq!(modes.shape(), [4, 4, 8, 8]);
    for j in 0..4 {
        let name = format!("n01440764/{j}.png");
        let bytes = std::fs::read(first.join(&name)).unwrap();
        assert_eq!(bytes, std::fs::read(second.join(&name)).unwrap(), "{name} differs between runs");
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
    assert!(!first.join("n01440764/4.png").exists());
    // Distinct modes give distinct images.
    assert_ne!(
        std::fs::read(first.join("n01440764/0.png")).unwrap(),
        std::fs::read(first.join("n01440764/1.png")).unwrap()
    );
}

/// Every variable the worker reads, set but empty (`export MGD3_CPU_THREADS=${SLURM_CPUS_PER_TASK:-}`
/// in a job script), is as if unset: the class distils to the same bytes, and joining without
/// a coordinator still asks for `--coordinator`; a variable with a bad value is still refused,
/// naming the variable as well as the flag.
#[test]
fn empty_variables_count_as_unset() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n01440764", 8);
    let (plain, empty) = (dir.path().join("plain"), dir.path().join("empty"));
    assert_ok(&distill(&data, "n01440764", &plain, "2", "tiny_dit.onnx"));
    let variables = [
        "MGD3_COORDINATOR",
        "MGD3_GIVE_UP_AFTER_S",
        "MGD3_MAX_CALL_ELEMENTS",
        "MGD3_FAULT_OOM_ABOVE",
        "MGD3_FREE_MEMORY_BYTES",
        "MGD3_VAE_NHWC",
        "MGD3_IO_BINDING",
        "MGD3_CPU_THREADS",
        "MGD3_TOKEN_FILE",
    ];
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli.rs")).unwrap();
    let declared = source.matches("env = \"MGD3_").count();
    assert_eq!(declared, variables.len(), "a variable was added to the worker's flags: list it here");
    let with_empty = |command: &mut Command| {
        for variable in variables {
            command.env(variable, "");
        }
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command.args(distill_args(&data, "n01440764", &empty, "2", "tiny_dit.onnx"));
    with_empty(&mut command);
    assert_ok(&command.output().unwrap());
    for j in 0..2 {
        let name = format!("n01440764/{j}.png");
        assert_eq!(std::fs::read(plain.join(&name)).unwrap(), std::fs::read(empty.join(&name)).unwrap(), "{name}");
    }
    let mut join = Command::new(env!("CARGO_BIN_EXE_worker"));
    with_empty(&mut join);
    let text = stderr(&join.output().unwrap());
    assert!(text.contains("--coordinator") && !text.contains("invalid value"), "{text}");
    let mut bad = Command::new(env!("CARGO_BIN_EXE_worker"));
    bad.args(distill_args(&data, "n01440764", &dir.path().join("bad"), "2", "tiny_dit.onnx"));
    let text = stderr(&bad.env("MGD3_CPU_THREADS", "x").output().unwrap());
    assert!(text.contains("--cpu-threads") && text.contains("'x'"), "{text}");
    assert!(text.contains("the value came from the environment: MGD3_CPU_THREADS=x"), "{text}");
}

/// A job script exports the cluster mode's variables for every worker command it runs: a bad
/// value in one (`MGD3_GIVE_UP_AFTER_S`, `MGD3_CPU_THREADS` of the cluster mode's runtime) stops
/// only the cluster mode, which reads it, not a subcommand that has no such flag.
#[test]
fn cluster_mode_variables_do_not_stop_subcommands_that_do_not_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [("MGD3_GIVE_UP_AFTER_S", "soon"), ("MGD3_COORDINATOR", "")];
    let missing = dir.path().join("no-such-folder");
    let mut import = Command::new(env!("CARGO_BIN_EXE_worker"));
    import.args(["import-fashion-mnist", "--src"]).arg(&missing).arg("--out").arg(dir.path().join("out"));
    let text = stderr(&import.envs(bad).env("MGD3_VAE_NHWC", "maybe").output().unwrap());
    assert!(text.contains("no-such-folder") && !text.contains("MGD3_") && !text.contains("invalid value"), "{text}");
    let mut join = Command::new(env!("CARGO_BIN_EXE_worker"));
    join.args(["--coordinator", "http://127.0.0.1:9"]);
    let text = stderr(&join.envs(bad).output().unwrap());
    assert!(text.contains("--give-up-after-s") && text.contains("'soon'"), "{text}");
    assert!(text.contains("the value came from the environment: MGD3_GIVE_UP_AFTER_S=soon"), "{text}");
    let mut join = Command::new(env!("CARGO_BIN_EXE_worker"));
    let text = stderr(&join.args(["--engine", "fake"]).env("MGD3_COORDINATOR", "notaurl").output().unwrap());
    assert!(text.contains("note: the URL came from the environment: MGD3_COORDINATOR=notaurl"), "{text}");
}

/// `--dit-rows auto` (the default on CUDA) chooses the rows per DiT call when the models load,
/// from the free memory and the memory a row takes, measured then; the bytes are those of any
/// other rows. The free memory is forced here (`MGD3_FREE_MEMORY_BYTES`) to make the choice
/// known.
#[test]
fn dit_rows_auto_chooses_the_rows_from_the_free_memory_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n01440764", 12);
    let run = |out: &Path, extra: &[&str], free: Option<u64>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
        command.args(distill_args(&data, "n01440764", out, "10", "tiny_dit.onnx")).args(["--threads", "1"]);
        command.args(extra).arg("--timings-json").arg(out.join("timings.json"));
        if let Some(free) = free {
            command.env("MGD3_FREE_MEMORY_BYTES", free.to_string());
        }
        let output = command.output().unwrap();
        assert_ok(&output);
        let timings: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("timings.json")).unwrap()).unwrap();
        (String::from_utf8_lossy(&output.stderr).into_owned(), timings["dit_calls"].as_u64().unwrap())
    };
    let field = |log: &str, name: &str| -> u64 {
        let at = log.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {log}")) + name.len() + 1;
        log[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let usual = dir.path().join("usual");
    let (_, calls) = run(&usual, &[], None);
    assert_eq!(calls, 20, "10 samples in one call of the CPU's 64 rows, 20 steps");

    // Plenty of memory: the most rows (1024), still one call a step.
    let roomy = dir.path().join("roomy");
    let (log, calls) = run(&roomy, &["--dit-rows", "auto"], Some(1 << 40));
    assert!(log.contains("DiT rows per call chosen from the free memory: 1024"), "{log}");
    assert!(!log.contains("DiT rows per call fit"), "no warning with room to spare: {log}");
    assert_eq!(calls, 20);
    let (row, vae) = (field(&log, "dit_row_bytes"), field(&log, "vae_call_bytes"));
    assert!(row > 0 && vae > 0, "{log}");

    // Room for 6.5 rows after the VAE's calls and the 20 % headroom: 6 rows, 3 samples a call,
    // so 10 samples take 4 calls a step.
    let tight = dir.path().join("tight");
    let free = ((vae as f64 + 6.5 * row as f64) / 0.8) as u64;
    let (log, calls) = run(&tight, &["--max-batch", "auto"], Some(free));
    assert!(log.contains("DiT rows per call chosen from the free memory: 6 "), "{log}");
    // So few rows say what took the memory, and what to change.
    assert!(log.contains("only 6 DiT rows per call fit") && log.contains("lower --vae-batch"), "{log}");
    assert_eq!(calls, 80, "{log}");
    for j in 0..10 {
        let name = format!("n01440764/{j}.png");
        let want = std::fs::read(usual.join(&name)).unwrap();
        assert_eq!(std::fs::read(roomy.join(&name)).unwrap(), want, "{name}");
        assert_eq!(std::fs::read(tight.join(&name)).unwrap(), want, "{name}");
    }
}

/// Where the temp folder takes no file (a read-only container), the load-time probe cannot write
/// its profile: the models load unmeasured, with a warning naming TMPDIR, and the bytes are the
/// same.
#[test]
fn an_unwritable_temp_folder_loads_the_models_unmeasured_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n01440764", 8);
    let (usual, unmeasured) = (dir.path().join("a"), dir.path().join("b"));
    assert_ok(&distill(&data, "n01440764", &usual, "3", "tiny_dit.onnx"));
    let args = distill_args(&data, "n01440764", &unmeasured, "3", "tiny_dit.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(&args)
        .args(["--threads", "1"])
        .env("TMPDIR", dir.path().join("no/such/folder"))
        .output()
        .unwrap();
    assert_ok(&out);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("TMPDIR"), "{text}");
    for j in 0..3 {
        let name = format!("n01440764/{j}.png");
        assert_eq!(std::fs::read(usual.join(&name)).unwrap(), std::fs::read(unmeasured.join(&name)).unwrap(), "{name}");
    }
}

/// Model files given in each other's places are all named in one message, each with what it
/// is, before any model loads — for `distill-class` and for `worker sample`.
#[test]
fn swapped_models_are_all_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 3);
    let mut args = distill_args(&data, "n001", &dir.path().join("out"), "2", "tiny_vae_encoder.onnx");
    let at = |args: &[String], flag: &str| args.iter().position(|a| a == flag).unwrap() + 1;
    let (encoder, decoder) = (at(&args, "--vae-encoder"), at(&args, "--vae-decoder"));
    args[encoder] = model("tiny_vae_decoder.onnx");
    args[decoder] = model("tiny_dit.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for said in [
        "the DiT `",
        "tiny_vae_encoder.onnx` is a VAE encoder",
        "the VAE encoder `",
        "tiny_vae_decoder.onnx` is a VAE decoder",
        "the VAE decoder `",
        "tiny_dit.onnx` is a DiT",
        "are models swapped?",
    ] {
        assert!(text.contains(said), "{said}: {text}");
    }
    // One misplaced file and a missing one: both named, and no talk of swapping.
    let dit = at(&args, "--dit");
    args[dit] = model("tiny_dit.onnx");
    args[decoder] = dir.path().join("no-such-decoder.onnx").display().to_string();
    let text = stderr(&Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap());
    assert!(text.contains("tiny_vae_decoder.onnx` is a VAE decoder"), "{text}");
    assert!(
        text.contains("besides, the VAE decoder `") && text.contains("no-such-decoder.onnx` does not exist"),
        "{text}"
    );
    assert!(!text.contains("swapped") && !text.contains("the DiT `"), "{text}");
    // Files that are there but are no ONNX models (a text file, a folder) are named at once,
    // with the missing one beside them, before ONNX Runtime sees them.
    args[encoder] = model("tiny_vae_encoder.onnx");
    std::fs::write(dir.path().join("dit.pt"), b"not a model\n").unwrap();
    args[dit] = dir.path().join("dit.pt").display().to_string();
    args[encoder] = data.display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for said in [
        "the DiT `",
        "dit.pt` is not an ONNX model",
        "the VAE encoder `",
        "is a folder, not an ONNX model file",
        "no-such-decoder.onnx` does not exist",
        "scripts/export_onnx.py",
    ] {
        assert!(text.contains(said), "{said}: {text}");
    }
    assert!(!text.contains("Protobuf") && !text.contains("profile"), "{text}");
    // A link to nothing names its target.
    std::os::unix::fs::symlink(dir.path().join("moved/dit.onnx"), dir.path().join("dit.onnx")).unwrap();
    args[dit] = dir.path().join("dit.onnx").display().to_string();
    args[encoder] = model("tiny_vae_encoder.onnx");
    args[decoder] = model("tiny_vae_decoder.onnx");
    let text = stderr(&Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap());
    assert!(
        text.contains("dit.onnx` is a link to `") && text.contains("moved/dit.onnx`, which does not exist"),
        "{text}"
    );
    // A model whose external data is not all there is named with the missing file, before ONNX
    // Runtime's own error (which names none).
    let external = dir.path().join("external");
    std::fs::create_dir(&external).unwrap();
    for file in ["tiny_vae_decoder.onnx", "model.onnx_data"] {
        std::fs::copy(fixtures().join("models/external").join(file), external.join(file)).unwrap();
    }
    args[dit] = model("tiny_dit.onnx");
    args[decoder] = external.join("tiny_vae_decoder.onnx").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("keeps weights in `weights/rest.bin`, which is not there"), "{text}");
    let case = fixtures().join("parity/tstop25_ch3");
    let (modes, noise, decoder) = (case.join("modes.npy"), case.join("noise.npy"), model("tiny_vae_decoder.onnx"));
    let mut sample = Command::new(env!("CARGO_BIN_EXE_worker"));
    sample.args(["sample", "--dit", &decoder, "--label", "3", "--modes"]).arg(modes).arg("--noise").arg(noise);
    let text = stderr(&sample.arg("--out").arg(dir.path().join("sample")).output().unwrap());
    assert!(text.contains("the DiT `") && text.contains("tiny_vae_decoder.onnx` is a VAE decoder"), "{text}");
}

#[test]
fn distill_class_errors_name_the_class_file_or_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 3);
    let out = dir.path().join("out");

    let text = stderr(&distill(&data, "n999", &out, "2", "tiny_dit.onnx"));
    assert!(text.contains("n999") && text.contains("does not exist"), "{text}");

    let text = stderr(&distill(&data, "n001", &out, "5", "tiny_dit.onnx"));
    assert!(text.contains("n001") && text.contains("3 images") && text.contains("IPC = 5"), "{text}");

    std::fs::create_dir_all(data.join("n002")).unwrap();
    std::fs::write(data.join("n002/broken.jpg"), b"\xff\xd8\xff\xe0 definitely not a jpeg").unwrap();
    image_folder(&data, "n002", 2);
    let text = stderr(&distill(&data, "n002", &out, "2", "tiny_dit.onnx"));
    assert!(text.contains("broken.jpg"), "{text}");

    std::fs::create_dir_all(data.join("n003")).unwrap();
    let text = stderr(&distill(&data, "n003", &out, "1", "tiny_dit.onnx"));
    assert!(text.contains("n003") && text.contains("holds no images (.jpg"), "{text}");

    // Thread counts: 0 and absurd values are refused naming the flag and the variable.
    for (flag, value) in [("--cpu-threads", "0"), ("--cpu-threads", "1000000"), ("--threads", "1000000")] {
        let mut args = distill_args(&data, "n001", &out, "2", "tiny_dit.onnx");
        args.extend([flag.to_owned(), value.to_owned()]);
        let text = stderr(&Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap());
        assert!(text.contains(flag) && text.contains(value), "{flag} {value}: {text}");
    }
    let env_zero = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(distill_args(&data, "n001", &out, "2", "tiny_dit.onnx"))
        .env("MGD3_CPU_THREADS", "0")
        .output()
        .unwrap();
    assert!(stderr(&env_zero).contains("MGD3_CPU_THREADS"));

    let text = stderr(&distill(&data, "n001", &out, "2", "bad_dit_rank.onnx"));
    assert!(text.contains("bad_dit_rank.onnx") && text.contains("input `x`"), "{text}");
    assert!(!out.join("n001").exists(), "nothing is written for a failed class");
}

/// `worker distill-class` of class `n001` of `data` at IPC 1 with the DiT fixture `dit` and the
/// tiny VAE into `out`, plus `extra` flags.
fn distill_tiny(data: &Path, out: &Path, dit: &str, extra: &[&str]) -> Output {
    distill_tiny_with(data, out, dit, "tiny_vae_decoder.onnx", extra)
}

/// `distill_tiny` with another VAE decoder fixture.
fn distill_tiny_with(data: &Path, out: &Path, dit: &str, decoder: &str, extra: &[&str]) -> Output {
    let (data, out) = (data.display().to_string(), out.display().to_string());
    let (dit, encoder, decoder) = (model(dit), model("tiny_vae_encoder.onnx"), model(decoder));
    let mut args = vec![
        "distill-class",
        "--data",
        &data,
        "--class",
        "n001",
        "--label",
        "1",
        "--ipc",
        "1",
        "--dit",
        &dit,
        "--vae-encoder",
        &encoder,
        "--vae-decoder",
        &decoder,
        "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    worker(&args)
}

/// Two models that each break the contract are both named in one run, each with its item.
#[test]
fn models_that_do_not_fit_the_contract_are_all_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 2);
    let relabel = |fixture: &str, key: &str, value: &str| {
        let path = dir.path().join(format!("bad_{fixture}"));
        let bytes = std::fs::read(model(fixture)).unwrap();
        std::fs::write(&path, mgd3_common::modelmeta::with_metadata(&bytes, key, value).unwrap()).unwrap();
        path.display().to_string()
    };
    let dit = relabel("tiny_dit.onnx", "mgd3.num_classes", "1000");
    let decoder = relabel("tiny_vae_decoder.onnx", "mgd3.scale_factor", "-1");
    let out = distill_tiny_with(&data, &dir.path().join("o"), &dit, &decoder, &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for said in ["bad_tiny_dit.onnx", "`mgd3.num_classes` = 1000", "bad_tiny_vae_decoder.onnx", "mgd3.scale_factor"] {
        assert!(text.contains(said), "{said}: {text}");
    }
    // A custom operator is said in check's words, with a contract problem of another model.
    let mut custom = std::fs::read(model("tiny_vae_decoder.onnx")).unwrap();
    // ModelProto.graph (7) appended: protobuf merges it into the first, adding one node
    // { input "x", output "z", op_type "MyOp", domain "my.custom" }.
    let node: Vec<u8> =
        [&[0x0a, 1][..], b"x", &[0x12, 1], b"z", &[0x22, 4], b"MyOp", &[0x3a, 9], b"my.custom"].concat();
    custom.extend([0x3a, node.len() as u8 + 2, 0x0a, node.len() as u8]);
    custom.extend(node);
    let custom_path = dir.path().join("custom_decoder.onnx");
    std::fs::write(&custom_path, custom).unwrap();
    let out = distill_tiny_with(&data, &dir.path().join("o"), &dit, custom_path.to_str().unwrap(), &[]);
    let text = stderr(&out);
    for said in [
        "`mgd3.num_classes` = 1000",
        "custom_decoder.onnx` does not fit the mgd3 contract: operators of domain `my.custom` (MyOp)",
    ] {
        assert!(text.contains(said), "{said}: {text}");
    }
    // A graph edit gone wrong (an operator ONNX does not have, reading a name nothing defines):
    // refused at load in check's words, before ONNX Runtime says it per worker.
    let mut edited = std::fs::read(model("tiny_vae_decoder.onnx")).unwrap();
    let node: Vec<u8> = [&[0x0a, 7][..], b"nowhere", &[0x12, 1], b"q", &[0x22, 5], b"Gemmm"].concat();
    edited.extend([0x3a, node.len() as u8 + 2, 0x0a, node.len() as u8]);
    edited.extend(node);
    let edited_path = dir.path().join("edited_decoder.onnx");
    std::fs::write(&edited_path, edited).unwrap();
    let out = distill_tiny_with(&data, &dir.path().join("o"), "tiny_dit.onnx", edited_path.to_str().unwrap(), &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for said in [
        "edited_decoder.onnx` does not fit the mgd3 contract: operators of the default ONNX domain",
        "`Gemmm` (no such ONNX operator)",
        "graph wiring",
        "`nowhere` defined nowhere",
    ] {
        assert!(text.contains(said), "{said}: {text}");
    }
    // One alone reads as before.
    let out = distill_tiny_with(&data, &dir.path().join("o"), &dit, "tiny_vae_decoder.onnx", &[]);
    let text = stderr(&out);
    assert!(text.contains("`mgd3.num_classes` = 1000") && !text.contains("scale_factor"), "{text}");
}

#[test]
fn cuda_request_without_cuda_is_an_error_not_a_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 2);
    let result = distill_tiny(&data, &dir.path().join("o"), "tiny_dit.onnx", &["--device", "cuda:0"]);
    let text = stderr(&result);
    assert!(text.contains("cuda:0") && text.contains("CUDA"), "{text}");
}

/// `--provider tensorrt` is opt-in and never a silent fallback either: with a CPU-only ONNX
/// Runtime it fails in one sentence naming TensorRT and the fix, before any model runs; on the
/// CPU device it is refused naming `--device`.
#[test]
fn tensorrt_request_without_tensorrt_is_one_sentence_and_needs_a_cuda_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 2);
    let out = dir.path().join("o");
    let on_cuda = distill_tiny(&data, &out, "tiny_dit.onnx", &["--provider", "tensorrt", "--device", "cuda:0"]);
    let text = stderr(&on_cuda);
    assert!(
        text.contains("cannot use TensorRT on cuda:0")
            && text.contains("setup_ort.sh gpu")
            && text.contains("a CPU build, with neither TensorRT nor CUDA")
            && !text.contains("run without --provider tensorrt"),
        "{text}"
    );
    assert!(!out.join("n001").exists(), "nothing is written");

    // Either GPU provider named for a CPU worker is refused, never silently ignored.
    for provider in ["tensorrt", "cuda"] {
        let on_cpu = distill_tiny(&data, &out, "tiny_dit.onnx", &["--provider", provider, "--device", "cpu"]);
        let text = stderr(&on_cpu);
        assert!(
            !on_cpu.status.success()
                && text.contains(&format!("--provider {provider} runs models on a CUDA device"))
                && text.contains("--device cuda"),
            "{text}"
        );
    }

    // A bf16 export (which ONNX Runtime runs on CUDA only) on the CPU: one sentence, not ONNX
    // Runtime's "Could not find an implementation for Add(14)".
    let bf16 = distill_tiny(&data, &out, "bf16_dit.onnx", &[]);
    let text = stderr(&bf16);
    assert!(
        text.contains("bf16_dit.onnx` is a bf16 export, which ONNX Runtime runs on CUDA only")
            && text.contains("--device cuda"),
        "{text}"
    );

    // The CUDA VAE graph (fused GroupNorm, NHWC convolutions) on the CPU: the same, before any
    // session is built.
    let cuda_vae = distill_tiny_with(&data, &out, "tiny_dit.onnx", "tiny_vae_decoder_cuda.onnx", &[]);
    let text = stderr(&cuda_vae);
    assert!(
        !cuda_vae.status.success()
            && text.contains("tiny_vae_decoder_cuda.onnx` is the CUDA graph of a VAE (13 fused GroupNorms")
            && text.contains("--device cuda"),
        "{text}"
    );
    // A CUDA decoder graph given as the encoder too: that it is a decoder comes first (both
    // halves as `cuda-vae` writes them, one message naming both files, is unit-tested in
    // `models.rs`, where a decoder may stand in for the encoder half).
    let (encoder, decoder) = (out.join("enc_cuda.onnx"), out.join("dec_cuda.onnx"));
    std::fs::create_dir_all(&out).unwrap();
    for copy in [&encoder, &decoder] {
        std::fs::copy(model("tiny_vae_decoder_cuda.onnx"), copy).unwrap();
    }
    let mut args = distill_args(&data, "n001", &out.join("both"), "1", "tiny_dit.onnx");
    let at = |flag: &str| args.iter().position(|a| a == flag).unwrap() + 1;
    let (e, d) = (at("--vae-encoder"), at("--vae-decoder"));
    (args[e], args[d]) = (encoder.display().to_string(), decoder.display().to_string());
    let text = stderr(&Command::new(env!("CARGO_BIN_EXE_worker")).args(&args).output().unwrap());
    assert!(text.contains("the VAE encoder `") && text.contains("enc_cuda.onnx` is a VAE decoder"), "{text}");
    assert!(!text.contains("are models swapped?") && !text.contains("--device cuda"), "{text}");

    let typo = worker(&["distill-class", "--provider", "tensorrtt"]);
    assert!(stderr(&typo).contains("use cuda or tensorrt"), "{}", stderr(&typo));
}

/// A worker pointed at a coordinator that never answers gives up after `--give-up-after-s`,
/// exiting 1 and naming the URL and the flag; Ctrl-C while it waits exits 130.
#[test]
fn an_unreachable_coordinator_is_given_up_on_and_ctrl_c_exits_130() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--coordinator", &url, "--engine", "fake", "--give-up-after-s", "2"])
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
    for part in [url.as_str(), "giving up", "--give-up-after-s", "--coordinator"] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
    let mut waiting = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--coordinator", &url, "--engine", "fake"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SIGPIPE stays ignored: a coordinator that vanishes while the worker writes to it is an
    // error the worker retries, not a signal that ends it (SIGPIPE is 13: bit 12 of SigIgn).
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", waiting.id())).unwrap();
    let ignored = proc_status.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap().trim();
    assert_ne!(u64::from_str_radix(ignored, 16).unwrap() & (1 << 12), 0, "SigIgn {ignored}");
    assert!(Command::new("kill").args(["-INT", &waiting.id().to_string()]).status().unwrap().success());
    let status = waiting.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
}

/// `--class` names one folder of `--data` and of `--out`, never a path: `..`, `/` and absolute
/// paths are refused before anything is read or written; flags get the job spec's checks.
#[test]
fn distill_class_refuses_paths_as_class_names_and_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for class in ["../escape", "/tmp/elsewhere", "..", "a/b"] {
        let args = distill_args(dir.path(), class, &out, "2", "tiny_dit.onnx");
        let result = worker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let text = stderr(&result);
        assert!(!result.status.success(), "{class}: {text}");
        assert!(text.contains("--class") && text.contains("is not a class folder name"), "{class}: {text}");
    }
    assert!(!out.exists() && !dir.path().join("escape").exists(), "nothing was written");
    for (flag, value, expected) in [
        ("--cfg-channels", "0", "--cfg-channels: 0 is not a channel count"),
        ("--guidance-scale", "-1", "--guidance-scale: -1 must be a finite number ≥ 0"),
        ("--eta", "0.5", "--eta: 0.5 applies only to the DDIM sampler"),
    ] {
        let mut args = distill_args(dir.path(), "c", &out, "2", "tiny_dit.onnx");
        args.push(format!("{flag}={value}"));
        let result = worker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let text = stderr(&result);
        assert!(!result.status.success() && text.contains(expected), "{flag}: {text}");
    }
}

/// `.npy` inputs that are not float32 arrays of the right rank are named with what is wrong in
/// NumPy's terms (dtype, dimensions) and how to write them, not with the reader's internals.
#[test]
fn npy_inputs_of_the_wrong_kind_say_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let modes: Array4<f32> = read_npy(fixtures().join("parity/tstop25_ch3/modes.npy")).unwrap();
    let float64 = dir.path().join("float64.npy");
    ndarray_npy::write_npy(&float64, &modes.mapv(f64::from)).unwrap();
    let rank3 = dir.path().join("rank3.npy");
    ndarray_npy::write_npy(&rank3, &modes.index_axis(ndarray::Axis(0), 0).to_owned()).unwrap();
    let good = std::fs::read(fixtures().join("parity/tstop25_ch3/modes.npy")).unwrap();
    let truncated = dir.path().join("truncated.npy");
    std::fs::write(&truncated, &good[..good.len() - 8]).unwrap();
    let text = dir.path().join("text.npy");
    std::fs::write(&text, "not numpy").unwrap();
    let nan = dir.path().join("nan.npy");
    ndarray_npy::write_npy(&nan, &modes.mapv(|_| f32::NAN)).unwrap();
    let out = dir.path().join("latents.npy");
    let expect = |path: &Path, wanted: &[&str]| {
        let case = fixtures().join("parity/tstop25_ch3");
        let noise = case.join("noise.npy");
        let dit = model("tiny_dit.onnx");
        let err = stderr(&worker(&[
            "sample",
            "--dit",
            &dit,
            "--label",
            "3",
            "--modes",
            path.to_str().unwrap(),
            "--noise",
            noise.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for w in wanted {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
        assert!(!err.contains("NDIM") && !err.contains("Dimension type"), "{err}");
    };
    expect(&float64, &["--modes `", "holds dtype '<f8', not float32", "astype(np.float32)"]);
    expect(&rank3, &["has 3 dimension(s); --modes must have 4: [N,C,h,w]"]);
    expect(&truncated, &["is truncated", "np.save"]);
    expect(&text, &["is not a .npy file NumPy wrote", "[N,C,h,w]"]);
    // NaN modes are the file's fault, not the DiT's.
    expect(&nan, &["--modes `", "holds NaN or infinite values"]);
    assert!(!out.exists());
}

/// The ONNX Runtime of CUDA 12 clusters loads: the binding is built at API level 26, and 1.26.0
/// is the newest onnxruntime(-gpu) built for CUDA 12. Its CPU library (installed by
/// `scripts/setup_test_servers.sh` into `.ort/cpu-1.26.0`) distils a class as 1.31 does; an
/// older library than the binding accepts is refused naming the version.
#[test]
fn the_onnx_runtime_of_cuda_12_clusters_loads() {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ort/cpu-1.26.0/libonnxruntime.so");
    if !lib.exists() {
        assert!(
            std::env::var("MGD3_REQUIRE_ORT_1_26").as_deref() != Ok("1"),
            "no {}: run scripts/setup_test_servers.sh (it installs ONNX Runtime 1.26.0's CPU library)",
            lib.display()
        );
        eprintln!(
            "note: skipping: no ONNX Runtime 1.26.0 in .ort/cpu-1.26.0 (scripts/setup_test_servers.sh installs it)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 2);
    let lib = lib.display().to_string();
    let out = dir.path().join("o");
    let result = distill_tiny(&data, &out, "tiny_dit_fused.onnx", &["--ort-lib", &lib]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(out.join("n001").join("0.png").is_file(), "{}", stderr(&result));
}

/// `--ort-lib` naming the folder the library is in says so and names the file in it (the loader
/// said only "dlopen failed").
#[test]
fn an_ort_lib_folder_names_the_library_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("ort");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("libonnxruntime.so"), b"").unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 2);
    let out = dir.path().join("o");
    let result = distill_tiny(&data, &out, "tiny_dit.onnx", &["--ort-lib", folder.to_str().unwrap()]);
    let text = stderr(&result);
    assert!(text.contains("is a folder: give the library in it") && text.contains("ort/libonnxruntime.so"), "{text}");
}

/// A model with external data given as a link from another folder (a big DiT linked into a
/// project) loads where it lies: its data files are beside the file, not the link (it was
/// refused as "keeps weights in model.onnx_data, which is not there").
#[test]
fn a_linked_model_with_external_data_loads_where_it_lies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, "n001", 2);
    let linked = dir.path().join("linked.onnx");
    std::os::unix::fs::symlink(model("external/tiny_vae_decoder.onnx"), &linked).unwrap();
    let out = distill_tiny_with(&data, &dir.path().join("o"), &model("tiny_dit.onnx"), linked.to_str().unwrap(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
