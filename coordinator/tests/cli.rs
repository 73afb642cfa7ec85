//! The `coordinator` binary's client commands against a served coordinator: invalid specs are
//! reported field by field, unknown jobs and missing binaries are named.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().unwrap()
}

/// `coordinator ARGS` with `vars` set (an empty value set as empty) and `RUST_LOG` unset unless
/// given; its standard error.
fn coordinator_with(args: &[&str], vars: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    command.args(args).env_remove("RUST_LOG").envs(vars.iter().copied());
    String::from_utf8_lossy(&command.output().unwrap().stderr).into_owned()
}

fn serve(store: &std::path::Path) -> (Server, String) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", store.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if coordinator(&["list", "--coordinator", &url]).status.success() {
            return (server, url);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("coordinator did not come up");
}

const BAD_SPEC: &str = r#"
dataset = "data"
classes = "imagenette"
ipc = 0
max_attempts = 0
[sampling]
steps = 20
stop_guidance = 30
[models]
dit = "d.onnx"
vae_encoder = "e.onnx"
vae_decoder = "x.onnx"
"#;

#[test]
fn client_commands_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let spec = dir.path().join("bad.toml");
    std::fs::write(&spec, BAD_SPEC).unwrap();
    let out = coordinator(&["submit", spec.to_str().unwrap(), "--coordinator", &url]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for field in ["`ipc`", "`max_attempts`", "`sampling.stop_guidance`"] {
        assert!(text.contains(field), "{field} not reported in: {text}");
    }
    std::fs::write(&spec, BAD_SPEC.replace("ipc = 0", "ipc = 1\nipcs = 2")).unwrap();
    let text = String::from_utf8_lossy(&coordinator(&["submit", spec.to_str().unwrap(), "--coordinator", &url]).stderr)
        .into_owned();
    assert!(text.contains("ipcs"), "{text}");
    // An explicit job id names exactly one folder under jobs/.
    std::fs::write(&spec, GOOD_SPEC).unwrap();
    for id in ["other-job/dataset/c0", "..", "../escape"] {
        let out = coordinator(&["submit", spec.to_str().unwrap(), "--job-id", id, "--coordinator", &url]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains("`job_id`"), "{id}: {text}");
    }
    let out = coordinator(&["status", "no-such-job", "--coordinator", &url]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown job `no-such-job`"));
    let out = coordinator(&["list", "--json", "--coordinator", &url]);
    assert!(out.status.success());
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
    // No jobs: `status` and `list` say so on standard error (standard output holds jobs only,
    // for scripts); `--json` is `[]`.
    for command in ["status", "list"] {
        let out = coordinator(&[command, "--coordinator", &url]);
        assert!(out.status.success() && out.stdout.is_empty(), "{command}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("no jobs"), "{command}: {out:?}");
    }
    let out = coordinator(&["status", "--json", "--coordinator", &url]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
}

/// Every variable the coordinator reads, set but empty, is as if unset: `submit` reaches the
/// coordinator its flag names instead of refusing `''`.
#[test]
fn empty_variables_count_as_unset() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let spec = dir.path().join("bad.toml");
    std::fs::write(&spec, BAD_SPEC).unwrap();
    let variables = [
        "MGD3_COORDINATOR",
        "MGD3_ACCEPT_DATA_CHANGES",
        "MGD3_RETRY_FAILED",
        "MGD3_PROGRESS_EVERY_S",
        "MGD3_GIVE_UP_WHEN_EXCLUDED_S",
        "MGD3_TOKEN_FILE",
    ];
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli.rs")).unwrap();
    assert_eq!(source.matches("env = \"MGD3_").count(), variables.len(), "list a new variable here");
    let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    command.args(["submit", spec.to_str().unwrap(), "--coordinator", &url]);
    for variable in variables {
        command.env(variable, "");
    }
    let out = command.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("`ipc`") && !text.contains("invalid value"), "{text}");
    // A bad value from a variable is refused naming the variable, not only the flag.
    let out = command.env("MGD3_PROGRESS_EVERY_S", "abc").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--progress-every-s") && text.contains("MGD3_PROGRESS_EVERY_S=abc"), "{text}");
}

/// A log format or filter that does not parse is said once logging runs, not silently
/// ignored; the command goes on in plain text with the default filter.
#[test]
fn a_bad_log_format_or_filter_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.toml");
    std::fs::write(&spec, BAD_SPEC).unwrap();
    let check = ["check", spec.to_str().unwrap()];
    let text = coordinator_with(&check, &[("MGD3_LOG_FORMAT", "xml"), ("RUST_LOG", "info,[[")]);
    assert!(text.contains("MGD3_LOG_FORMAT=\"xml\" is not a log format"), "{text}");
    assert!(text.contains("RUST_LOG=\"info,[[\" cannot be parsed"), "{text}");
    assert!(text.contains("`ipc`"), "the command still ran: {text}");
    for fine in ["json", "text", ""] {
        let text = coordinator_with(&check, &[("MGD3_LOG_FORMAT", fine)]);
        assert!(!text.contains("is not a log format") && !text.contains("cannot be parsed"), "{fine}: {text}");
    }
}

/// A coordinator URL that does not parse and came from `MGD3_COORDINATOR` (a job script's) is
/// traced to the variable; one given with `--coordinator` is not.
#[test]
fn a_bad_coordinator_url_from_the_environment_is_traced_to_it() {
    let text = coordinator_with(&["list"], &[("MGD3_COORDINATOR", "notaurl")]);
    assert!(text.contains("`notaurl` has no scheme"), "{text}");
    assert!(text.contains("note: the URL came from the environment: MGD3_COORDINATOR=notaurl"), "{text}");
    let text = coordinator_with(&["list", "--coordinator", "ftp://x"], &[("MGD3_COORDINATOR", "notaurl")]);
    assert!(text.contains("not ftp://") && !text.contains("came from the environment"), "{text}");
}

#[test]
fn run_names_a_missing_worker_binary() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(&spec, BAD_SPEC.replace("ipc = 0", "ipc = 1")).unwrap();
    let out = coordinator(&["run", spec.to_str().unwrap(), "--worker-bin", "/nonexistent/worker"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/worker"));
}

/// `--device cpu` with `--devices` is a contradiction, said as such instead of running on GPUs;
/// `MGD3_ACCEPT_DATA_CHANGES` takes the values a shell user writes (1, true, yes, on; 0, …).
#[test]
fn run_flags_say_what_they_mean() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(&spec, BAD_SPEC.replace("ipc = 0", "ipc = 1")).unwrap();
    let out = coordinator(&["run", spec.to_str().unwrap(), "--device", "cpu", "--devices", "0"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("--device cpu keeps them on the CPU"), "{text}");
    for value in ["1", "true", "yes", "on", "0", "false", "no", "off"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["resume", "j", "--coordinator", "http://127.0.0.1:1"])
            .env("MGD3_ACCEPT_DATA_CHANGES", value)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("nothing listens") && !text.contains("invalid value"), "{value}: {text}");
    }
}

const GOOD_SPEC: &str = r#"
dataset = "data"
classes = ["a", "b"]
labels = "position"
ipc = 2
[sampling]
steps = 50
[models]
dit = "d.onnx"
vae_encoder = "e.onnx"
vae_decoder = "x.onnx"
"#;

/// Scripts ask `coordinator spec` for settings instead of parsing TOML: every way TOML allows to
/// write a value gives the same answer, relative paths resolved against the spec's folder.
#[test]
fn spec_get_reads_settings_as_toml_defines_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    let root = std::path::absolute(dir.path()).unwrap();
    let get = |text: &str, key: &str| {
        std::fs::write(&spec, text).unwrap();
        let out = coordinator(&["spec", spec.to_str().unwrap(), "--get", key]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let expected = format!("{}\n", root.join("out").display());
    for line in [
        r#"output = "out""#,
        "output = 'out'",
        r#"output = "out"   # old"#,
        r#"output = "./x/../out""#,
        "output=\"out\"\r",
        "\"output\" = \"out\"",
    ] {
        let (ok, stdout, stderr) = get(&format!("{line}\n{GOOD_SPEC}"), "output");
        assert!(ok, "{line:?}: {stderr}");
        assert_eq!(stdout, expected, "{line:?}");
    }
    let (ok, stdout, _) = get(&format!("output = \"s3://bucket/my data\"\n{GOOD_SPEC}"), "output");
    assert!(ok);
    assert_eq!(stdout, "s3://bucket/my data\n");
    let (ok, stdout, _) = get(GOOD_SPEC, "sampling.steps");
    assert!(ok);
    assert_eq!(stdout, "50\n");
    // λ as written, not widened to f64 digits (0.10000000149011612).
    let (ok, stdout, _) = get(GOOD_SPEC, "sampling.guidance_scale");
    assert!(ok);
    assert_eq!(stdout, "0.1\n");
    // Not set: a non-zero exit naming the setting, nothing on stdout.
    let (ok, stdout, stderr) = get(GOOD_SPEC, "output");
    assert!(!ok && stdout.is_empty() && stderr.contains("`output` is not set"), "{stderr}");
    // An invalid spec is refused as `submit` would refuse it.
    let (ok, _, stderr) = get(&GOOD_SPEC.replace("ipc = 2", "ipc = 0"), "output");
    assert!(!ok && stderr.contains("`ipc`"), "{stderr}");
}

/// Safe by default: an address other machines can reach needs a token, or an explicit
/// `--insecure-no-auth`.
#[test]
fn serve_refuses_a_reachable_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = coordinator(&["serve", "--listen", "0.0.0.0:0", "--store", store.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--token-file") && text.contains("--insecure-no-auth"), "{text}");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    // A token file others can read is refused with the chmod to run.
    let out = coordinator(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--store",
        store.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("chmod 600") && text.contains("--insecure-token-file"), "{text}");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for extra in [&["--token-file", token.to_str().unwrap()][..], &["--insecure-no-auth"]] {
        let mut server = Server(
            Command::new(env!("CARGO_BIN_EXE_coordinator"))
                .args(["serve", "--listen", "0.0.0.0:0", "--store", store.to_str().unwrap()])
                .args(extra)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(500));
        assert!(server.0.try_wait().unwrap().is_none(), "{extra:?}: serve exited");
    }
}

/// A client command reads the token file from `$MGD3_TOKEN_FILE` as the sbatch scripts set it,
/// as it reads `$MGD3_COORDINATOR`.
#[test]
fn client_commands_take_the_token_file_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = dir.path().join("store");
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", store.to_str().unwrap()])
            .args(["--token-file", token.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let list = |token_file: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        command.args(["list"]).env("MGD3_COORDINATOR", &url).env_remove("MGD3_TOKEN_FILE");
        if let Some(file) = token_file {
            command.env("MGD3_TOKEN_FILE", file);
        }
        command.output().unwrap()
    };
    let mut answered = None;
    for _ in 0..100 {
        let out = list(Some(&token));
        if out.status.success() {
            answered = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = answered.expect("the coordinator answers a client holding the token from the environment");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("no jobs"), "{out:?}");
    let refused = list(None);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("token"), "{refused:?}");
}

/// Output piped into a reader that stops early ends the process quietly, as for any CLI tool.
#[test]
fn a_closed_pipe_ends_the_output_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.toml");
    // A long spec: its JSON form is more than a pipe buffer holds.
    let classes: Vec<String> = (0..20_000).map(|i| format!("\"class{i}\"")).collect();
    std::fs::write(&spec, GOOD_SPEC.replace("[\"a\", \"b\"]", &format!("[{}]", classes.join(", ")))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["spec", spec.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The status a shell shows for `| head`, without the signal itself (see the next test).
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

/// SIGPIPE stays ignored in a serving coordinator: its connections are written with `writev`,
/// and with SIGPIPE's default action a worker or client that vanished while the coordinator
/// wrote to it (a GOAWAY at shutdown, an answer to a killed worker) ended the coordinator with
/// status 141, mid-job, without a word.
#[test]
fn a_serving_coordinator_ignores_sigpipe() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _url) = serve(&dir.path().join("store"));
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.0.id())).unwrap();
    let ignored = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap().trim();
    let mask = u64::from_str_radix(ignored, 16).unwrap();
    assert_ne!(mask & (1 << (libc::SIGPIPE - 1)), 0, "SigIgn {ignored}");
}

/// `coordinator check` is a dry run of submit: every dataset problem at once, or the plan.
#[test]
fn check_reports_every_dataset_problem_or_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (class, n) in [("a", 3), ("b", 1), (".ipynb_checkpoints", 2)] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..n {
            std::fs::write(data.join(class).join(format!("{i}.png")), [i as u8]).unwrap();
        }
    }
    let fp = format!("sha256:{}", "0".repeat(64));
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"dry\"\ndataset = \"data\"\nclasses = \"all\"\nlabels = \"position\"\nipc = 2\n[models]\n\
             dit = \"d.onnx\"\nvae_encoder = \"e.onnx\"\nvae_decoder = \"x.onnx\"\ndit_fingerprint = \"{fp}\"\n\
             vae_encoder_fingerprint = \"{fp}\"\nvae_decoder_fingerprint = \"{fp}\"\n"
        ),
    )
    .unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("`b`: 1 image(s) but IPC = 2"), "{text}");
    std::fs::write(data.join("b/1.png"), [7u8]).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("job id:  dry-") && text.contains("output:  /srv/state"), "{text}");
    assert!(text.contains("classes: 2 (5 images in all), IPC 2, 1 shard(s) of 2 class(es)"), "{text}");
    assert!(text.contains("label    1       2 images  b"), "{text}");
    assert!(text.contains("note: skipped 1 hidden folder(s)") && text.contains(".ipynb_checkpoints"), "{text}");
    // A subset numbered by position is flagged (a DiT trained on the folder expects folder
    // indices); labels = "folder" keeps them.
    let listed = std::fs::read_to_string(&spec).unwrap().replace("classes = \"all\"", "classes = [\"b\"]");
    std::fs::write(&spec, &listed).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("label    0") && text.contains("labels = \"folder\""), "{text}");
    // ... but not when the positions are the folder indices anyway (`a` is folder 0).
    std::fs::write(&spec, listed.replace("classes = [\"b\"]", "classes = [\"a\"]")).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("label    0") && !text.contains("note: labels"), "{text}");
    std::fs::write(&spec, listed.replace("labels = \"position\"", "labels = \"folder\"")).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("label    1") && !text.contains("note: labels"), "{text}");
    // A model file that cannot be read (and has no fingerprint to go by) is named by its field,
    // with what to do, like any other spec problem.
    let unreadable = listed.replace(&format!("dit_fingerprint = \"{fp}\"\n"), "");
    std::fs::write(&spec, unreadable.replace("dit = \"d.onnx\"", "dit = \"dti.onnx\"")).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("`models.dit`") && text.contains("dti.onnx` cannot be read here"), "{text}");
    assert!(text.contains("models.dit_fingerprint = \"sha256:...\""), "{text}");
    // Files that are here but are no ONNX models (a checkpoint, a folder) are refused, whatever
    // fingerprint the spec gives, each named by its field.
    std::fs::write(dir.path().join("dti.onnx"), b"PK\x03\x04 a zip, as torch.save writes").unwrap();
    std::fs::create_dir(dir.path().join("x.onnx")).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("`models.dit`: `")
            && text.contains("dti.onnx` is not an ONNX model")
            && text.contains("export_onnx.py"),
        "{text}"
    );
    assert!(
        text.contains("`models.vae_decoder`: `") && text.contains("x.onnx` is a folder, not an ONNX model file"),
        "{text}"
    );
    // Every model problem in one go: a file given as another kind, a missing one, a folder.
    let encoder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny_vae_encoder.onnx");
    let mixed = listed
        .lines()
        .filter(|line| !line.contains("_fingerprint"))
        .map(|line| match line.split_once(" = ").map(|(key, _)| key) {
            Some("dit") => format!("dit = \"{}\"", encoder.display()),
            Some("vae_encoder") => "vae_encoder = \"absent.onnx\"".to_owned(),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&spec, &mixed).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for said in [
        "tiny_vae_encoder.onnx` is a vae_encoder model",
        "`models.vae_encoder`: `",
        "absent.onnx` cannot be read here",
        "x.onnx` is a folder",
    ] {
        assert!(text.contains(said), "{said}: {text}");
    }
    assert_eq!(text.matches("x.onnx").count(), 1, "the folder is named once: {text}");
    // A dataset that is not there does not hide what the model files are.
    std::fs::write(&spec, mixed.replace("dataset = \"data\"", "dataset = \"no-such-data\"")).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for said in ["`dataset`", "no-such-data", "tiny_vae_encoder.onnx` is a vae_encoder model", "x.onnx` is a folder"] {
        assert!(text.contains(said), "{said}: {text}");
    }
}

/// A scratch folder with `data/`, two classes `a` and `b` of two one-byte files (`check` lists
/// them without decoding).
fn two_class_data() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for class in ["a", "b"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..2 {
            std::fs::write(data.join(class).join(format!("{i}.png")), [i as u8]).unwrap();
        }
    }
    dir
}

/// An output inside the dataset is refused at `check` and `run` (before anything is written):
/// a job there writes `jobs/` beside the class folders, which the next job over `classes =
/// "all"` took for a class (a label outside the DiT's, or a class distilled from the outputs).
#[test]
fn an_output_inside_the_dataset_is_refused_before_anything_is_written() {
    let dir = two_class_data();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let spec = dir.path().join("job.toml");
    let write = |output: &str| {
        std::fs::write(
            &spec,
            format!(
                "name = \"nested\"\ndataset = \"data\"\nclasses = \"all\"\nlabels = \"folder\"\nipc = 1\noutput = \"{output}\"\n\
                 [models]\ndit = \"{}\"\nvae_encoder = \"{}\"\nvae_decoder = \"{}\"\n",
                models.join("tiny_dit.onnx").display(),
                models.join("tiny_vae_encoder.onnx").display(),
                models.join("tiny_vae_decoder.onnx").display()
            ),
        )
        .unwrap()
    };
    for output in ["data", "./data/", "data/a/distilled"] {
        write(output);
        for command in
            [&["check", spec.to_str().unwrap(), "--store", "/srv/state"][..], &["run", spec.to_str().unwrap()]]
        {
            let out = coordinator(command);
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{output} {command:?}: {text}");
            assert!(text.contains("`output`") && text.contains("is inside the dataset"), "{output}: {text}");
        }
        let written: Vec<_> = walk(&dir.path().join("data"));
        assert_eq!(written.len(), 4, "{output}: {written:?}");
    }
    write("out");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("inside the dataset"));
    // Inside another job's folder (its published dataset, say): that job's repairs would
    // remove this one's output, so it is refused too.
    let other = dir.path().join("done/jobs/other-0123456789ab");
    std::fs::create_dir_all(other.join("shards")).unwrap();
    std::fs::write(other.join("job.json"), b"{}").unwrap();
    for output in ["done/jobs/other-0123456789ab/dataset", "done/jobs/other-0123456789ab"] {
        write(output);
        let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{output}: {text}");
        assert!(text.contains("the folder of mgd3 job `other-0123456789ab`"), "{output}: {text}");
    }
    // Through a link into it, too.
    std::fs::create_dir_all(other.join("dataset/a")).unwrap();
    std::os::unix::fs::symlink(other.join("dataset"), dir.path().join("link")).unwrap();
    write("link/sub");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("the folder of mgd3 job `other-0123456789ab`"), "{text}");
    write("done/else");
    assert!(coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]).status.success());
    // The state store apart from the output, inside the dataset: its lock and jobs/ would sit
    // beside the class folders too.
    let store = dir.path().join("data/state");
    for command in [&["check", spec.to_str().unwrap(), "--store"][..], &["run", spec.to_str().unwrap(), "--store"]] {
        let out = coordinator(&[command, &[store.to_str().unwrap()]].concat());
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {text}");
        assert!(text.contains("`--store`") && text.contains("is inside the dataset"), "{command:?}: {text}");
    }
    // A relative --store is where run would put it, for check too.
    for command in ["check", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args([command, spec.to_str().unwrap(), "--store", "data/state"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {text}");
        assert!(text.contains("`--store`") && text.contains("is inside the dataset"), "{command}: {text}");
    }
    assert_eq!(walk(&dir.path().join("data")).len(), 4, "nothing written in the dataset");
    // An output (or a state store) that is a file, or under one, is refused at check as at run
    // (check passed it, and run failed with "cannot create local folder").
    std::fs::write(dir.path().join("afile"), b"x").unwrap();
    for output in ["afile", "afile/sub"] {
        write(output);
        for command in [&["check", spec.to_str().unwrap()][..], &["run", spec.to_str().unwrap()]] {
            let out = coordinator(command);
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{output} {command:?}: {text}");
            assert!(text.contains("`output`") && text.contains("not a folder"), "{output}: {text}");
        }
    }
    write("out");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", dir.path().join("afile").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && text.contains("`--store`") && text.contains("is a file"), "{text}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}

/// `check` says what each model is and where it can run: its declarations, its ONNX IR version
/// and operator sets, and "CUDA only" for a bf16 export; an IR version newer than the oldest
/// ONNX Runtime the workers accept is noted (workers on it refuse the model at load).
#[test]
fn check_describes_each_model_and_where_it_runs() {
    let dir = two_class_data();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    // The tiny DiT with ir_version 99 appended: a later scalar field wins, as in any protobuf
    // reader (ONNX Runtime's included).
    let mut newer = std::fs::read(models.join("tiny_dit.onnx")).unwrap();
    newer.extend([0x08, 99]);
    let newer_path = dir.path().join("newer_dit.onnx");
    std::fs::write(&newer_path, newer).unwrap();
    let spec = dir.path().join("job.toml");
    let check = |dit: &Path| {
        std::fs::write(
            &spec,
            format!(
                "name = \"described\"\ndataset = \"data\"\nclasses = \"all\"\nlabels = \"folder\"\nipc = 2\n[models]\ndit = \"{}\"\n\
                 vae_encoder = \"{}\"\nvae_decoder = \"{}\"\n",
                dit.display(),
                models.join("tiny_vae_encoder.onnx").display(),
                models.join("tiny_vae_decoder.onnx").display()
            ),
        )
        .unwrap();
        let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = check(&models.join("tiny_dit.onnx"));
    let line = |kind: &str| text.lines().find(|l| l.trim_start().starts_with(kind)).unwrap_or_default().to_owned();
    assert!(text.contains("\nmodels:\n"), "{text}");
    assert!(
        line("dit ").contains(
            "DiT, 10 classes (its class embedding agrees), 1000 training timesteps, latents 4×8×8, fp32, plain graph; ONNX IR 10, opset 18; \
             runs on the CPU or CUDA"
        ),
        "{text}"
    );
    assert!(line("vae_encoder").contains("images 3×16×16 → latents 4×8×8, scale factor 0.18215"), "{text}");
    assert!(line("vae_decoder").contains("latents 4×8×8 → images 3×16×16"), "{text}");
    let text = check(&models.join("bf16_dit.onnx"));
    let dit = text.lines().find(|l| l.trim_start().starts_with("dit ")).unwrap();
    assert!(
        dit.contains("bf16") && dit.contains("runs on CUDA only (bf16): its workers need `--device cuda`"),
        "{dit}"
    );
    // The bf16 stand-in has no embedding table: said, not refused.
    assert!(
        dit.contains("no class embedding found behind input `y`: labels are checked against the metadata only"),
        "{dit}"
    );
    let text = check(&newer_path);
    let dit = text.lines().find(|l| l.trim_start().starts_with("dit ")).unwrap();
    assert!(
        dit.contains("ONNX IR 99 (newer than ONNX Runtime 1.26 reads, IR 13: workers on it refuse the model)"),
        "{dit}"
    );
    // An operator set newer than that runtime loads (it refuses ai.onnx 27 and later), likewise.
    let mut newer = std::fs::read(models.join("tiny_dit.onnx")).unwrap();
    // ModelProto.opset_import (8): OperatorSetIdProto { domain "" , version 27 }; repeated, so
    // appended it imports ai.onnx twice, and readers keep the last.
    newer.extend([0x42, 0x04, 0x0a, 0x00, 0x10, 27]);
    std::fs::write(&newer_path, newer).unwrap();
    let text = check(&newer_path);
    let dit = text.lines().find(|l| l.trim_start().starts_with("dit ")).unwrap();
    assert!(
        dit.contains("opset 27 (newer than ONNX Runtime 1.26 loads, opset 26: workers on it refuse the model)"),
        "{dit}"
    );
}

/// Models that are ONNX files but do not fit the contract the workers check at load (no `mgd3.*`
/// metadata, an input of the wrong rank, a missing input) are refused by `check`, by their
/// setting and in the workers' words, instead of failing every shard's first attempt.
#[test]
fn check_refuses_models_that_do_not_fit_the_contract() {
    let dir = two_class_data();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let spec = dir.path().join("job.toml");
    let write = |dit: &str, decoder: &str| {
        std::fs::write(
            &spec,
            format!(
                "name = \"contract\"\ndataset = \"data\"\nclasses = \"all\"\nlabels = \"folder\"\nipc = 2\n[models]\ndit = \"{}\"\nvae_encoder = \"{}\"\n\
                 vae_decoder = \"{}\"\n",
                models.join(dit).display(),
                models.join("tiny_vae_encoder.onnx").display(),
                models.join(decoder).display()
            ),
        )
        .unwrap()
    };
    write("tiny_dit.onnx", "tiny_vae_decoder.onnx");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (dit, said) in [
        (
            "bad_dit_no_metadata.onnx",
            "metadata `mgd3.num_classes`: expected a positive integer, found nothing (export with scripts/export_onnx.py)",
        ),
        ("bad_dit_rank.onnx", "input `x`: expected rank 4 latent [B,C,h,w]"),
        ("bad_dit_missing_t.onnx", "input `t`: expected to exist"),
    ] {
        write(dit, "tiny_vae_decoder.onnx");
        let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dit}: {text}");
        assert!(text.contains("`models.dit`: model `") && text.contains(dit), "{dit}: {text}");
        assert!(text.contains("does not fit the mgd3 contract") && text.contains(said), "{dit}: {text}");
    }
    // Metadata that declares more classes than the weights hold (ONNX Runtime's CUDA Gather
    // would read past the table with no error), or fewer (the null label would be a real class).
    let bytes = std::fs::read(models.join("tiny_dit.onnx")).unwrap();
    for classes in ["1000", "9"] {
        let relabelled = dir.path().join(format!("relabelled_{classes}_dit.onnx"));
        std::fs::write(
            &relabelled,
            mgd3_common::modelmeta::with_metadata(&bytes, "mgd3.num_classes", classes).unwrap(),
        )
        .unwrap();
        write(relabelled.to_str().unwrap(), "tiny_vae_decoder.onnx");
        let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{classes}: {text}");
        let said = format!(
            "metadata `mgd3.num_classes` = {classes}: expected the class embedding `y_embedder.embedding_table.weight` to hold"
        );
        assert!(text.contains("`models.dit`") && text.contains(&said), "{classes}: {text}");
        assert!(text.contains("found 11 rows: 10 classes and the null class; export it again"), "{classes}: {text}");
    }
    // A node of a domain ONNX Runtime does not have (a custom operator): ModelProto.graph
    // appended once more, protobuf merges it into the first, with one node of domain
    // `my.custom`.
    let ld = |field: u8, body: &[u8]| [vec![field << 3 | 2, body.len() as u8], body.to_vec()].concat();
    let custom_node = ld(1, &[ld(1, b"x"), ld(2, b"z"), ld(4, b"MyOp"), ld(7, b"my.custom")].concat());
    let custom = dir.path().join("custom_dit.onnx");
    std::fs::write(&custom, [bytes.clone(), ld(7, &custom_node)].concat()).unwrap();
    write(custom.to_str().unwrap(), "tiny_vae_decoder.onnx");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("`models.dit`")
            && text.contains("custom_dit.onnx` does not fit the mgd3 contract: operators of domain `my.custom` (MyOp): expected operators ONNX Runtime has")
            && text.contains("found a domain ONNX Runtime does not have and the model defines no function in: no worker can load it"),
        "{text}"
    );
    // A graph edit gone wrong: an operator ONNX does not have (a typo) in the default domain,
    // reading a name nothing defines. ONNX Runtime refuses both on every worker; check names
    // both, with the opset the file imports.
    let typo_node = ld(1, &[ld(1, b"x"), ld(1, b"cut_off"), ld(2, b"z"), ld(4, b"Gemmm")].concat());
    let typo = dir.path().join("edited_dit.onnx");
    std::fs::write(&typo, [bytes.clone(), ld(7, &typo_node)].concat()).unwrap();
    write(typo.to_str().unwrap(), "tiny_vae_decoder.onnx");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    let opset = mgd3_common::modelmeta::read_model_meta(&models.join("tiny_dit.onnx")).unwrap().opsets[""];
    assert!(
        text.contains(&format!(
            "edited_dit.onnx` does not fit the mgd3 contract: operators of the default ONNX domain (the model imports \
             opset {opset}): expected operators ONNX defines at that opset, found `Gemmm` (no such ONNX operator)"
        )) && text.contains("graph wiring: expected every name a node reads")
            && text.contains("found `cut_off` defined nowhere"),
        "{text}"
    );
    // A DiT trained with fewer timesteps than the spec's sampling steps, beside a setting that
    // is wrong: both in one go, each by its setting.
    let few = dir.path().join("few_steps_dit.onnx");
    let bytes = std::fs::read(models.join("tiny_dit.onnx")).unwrap();
    std::fs::write(&few, mgd3_common::modelmeta::with_metadata(&bytes, "mgd3.train_timesteps", "5").unwrap()).unwrap();
    write(few.to_str().unwrap(), "tiny_vae_decoder.onnx");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("`sampling.steps`: 50 steps are more than the 5 training timesteps"), "{text}");
    let wrong = std::fs::read_to_string(&spec).unwrap().replace("ipc = 2", "ipc = 0");
    std::fs::write(&spec, wrong).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("`ipc`") && text.contains("5 training timesteps"), "{text}");
    // A link to nothing names its target.
    let link = dir.path().join("linked_dit.onnx");
    std::os::unix::fs::symlink(dir.path().join("moved/dit.onnx"), &link).unwrap();
    write(link.to_str().unwrap(), "tiny_vae_decoder.onnx");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("it is a link to `") && text.contains("moved/dit.onnx`, which does not exist"), "{text}");
    // Two VAE halves that each fit but not each other (another VAE's scale factor): named with
    // both files.
    let decoder = dir.path().join("other_decoder.onnx");
    let bytes = std::fs::read(models.join("tiny_vae_decoder.onnx")).unwrap();
    std::fs::write(&decoder, mgd3_common::modelmeta::with_metadata(&bytes, "mgd3.scale_factor", "0.13025").unwrap())
        .unwrap();
    write("tiny_dit.onnx", decoder.to_str().unwrap());
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("`models.vae_decoder`: the VAE encoder `")
            && text.contains("other_decoder.onnx` 0.13025")
            && text.contains("give the two halves of one VAE"),
        "{text}"
    );
}

/// `coordinator run` whose local workers run on the CPU refuses models that run on CUDA only at
/// once, naming each, instead of starting workers that would each refuse them and waiting for
/// one that never comes.
#[test]
fn run_on_the_cpu_refuses_cuda_only_models_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bf16\"\ndataset = \"data\"\nclasses = \"all\"\nlabels = \"folder\"\nipc = 2\n[models]\n\
             dit = \"{}\"\nvae_encoder = \"{}\"\nvae_decoder = \"{}\"\n",
            models.join("bf16_dit.onnx").display(),
            models.join("tiny_vae_encoder.onnx").display(),
            models.join("tiny_vae_decoder_cuda.onnx").display()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = coordinator(&["run", spec.to_str().unwrap(), "--store", dir.path().join("out").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    for said in [
        "job spec `",
        "`models.dit`: `",
        "bf16_dit.onnx` is a bf16 export",
        "`models.vae_decoder`: `",
        "tiny_vae_decoder_cuda.onnx` is the CUDA graph of a VAE",
        "run with --device cuda",
    ] {
        assert!(text.contains(said), "{said}: {text}");
    }
    assert!(started.elapsed() < Duration::from_secs(20), "refused at once, not after the excluded wait: {text}");
    assert!(!dir.path().join("out").exists(), "nothing is written: {text}");
    // Any spec that cannot run is refused the same way, before the store is opened and workers
    // start: here a setting and a model file that does not fit the contract.
    let text = std::fs::read_to_string(&spec).unwrap().replace("ipc = 2", "ipc = 0");
    let bad_dit = models.join("bad_dit_rank.onnx").display().to_string();
    std::fs::write(&spec, text.replace(&models.join("bf16_dit.onnx").display().to_string(), &bad_dit)).unwrap();
    let out = coordinator(&["run", spec.to_str().unwrap(), "--store", dir.path().join("out").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("`ipc`") && text.contains("bad_dit_rank.onnx") && text.contains("input `x`"), "{text}");
    assert!(!dir.path().join("out").exists(), "nothing is written: {text}");
}

/// `coordinator serve` on a free loopback port with `store`, `--allow-path allowed`, started in
/// `cwd`, once it answers; the server and its URL.
fn serve_allowing(store: &Path, allowed: &Path, cwd: &Path) -> (Server, String) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .current_dir(cwd)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", store.to_str().unwrap()])
            .args(["--allow-path", allowed.to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if coordinator(&["list", "--coordinator", &url]).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, url)
}

/// A submitted spec may only name local paths inside the coordinator's allowed folders: no
/// reading a class list elsewhere, no listing a dataset through a symbolic link that leads out,
/// no creating an output folder elsewhere. Every violation is named, nothing is created.
#[test]
fn submitted_specs_are_confined_to_the_allowed_folders() {
    let dir = tempfile::tempdir().unwrap();
    let (allowed, outside) = (dir.path().join("allowed"), dir.path().join("outside"));
    std::fs::create_dir_all(outside.join("data/c0")).unwrap();
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::write(outside.join("secret.txt"), "c0\n").unwrap();
    std::os::unix::fs::symlink(outside.join("data"), allowed.join("data")).unwrap();
    let (_server, url) = serve_allowing(&allowed.join("store"), &allowed, Path::new("."));
    let spec = allowed.join("job.toml");
    let text = GOOD_SPEC
        .replace(
            "classes = [\"a\", \"b\"]",
            &format!("classes = {{ file = \"{}\" }}", outside.join("secret.txt").display()),
        )
        .replace("ipc = 2", "ipc = 2\noutput = \"../outside/out\"");
    std::fs::write(&spec, text).unwrap();
    let out = coordinator(&["submit", spec.to_str().unwrap(), "--coordinator", &url]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for field in ["`dataset`", "`classes.file`", "`output`"] {
        assert!(text.contains(field), "{field} not named: {text}");
    }
    assert!(text.contains("--allow-path"), "{text}");
    assert!(!text.contains("`models.dit`"), "models inside the allowed folder pass: {text}");
    assert!(!outside.join("out").exists(), "nothing is created outside");
}

/// `--allow-path` adds to the default folders (where the coordinator was started, and a local
/// store): a job whose output defaults to the store is not refused because another folder was
/// allowed.
#[test]
fn allow_path_adds_to_the_default_folders() {
    let dir = tempfile::tempdir().unwrap();
    let (allowed, store, cwd) = (dir.path().join("allowed"), dir.path().join("store"), dir.path().join("cwd"));
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&cwd).unwrap();
    let (_server, url) = serve_allowing(&store, &allowed, &cwd);
    let spec = allowed.join("job.toml");
    std::fs::write(&spec, GOOD_SPEC).unwrap();
    let out = coordinator(&["submit", spec.to_str().unwrap(), "--coordinator", &url]);
    let text = String::from_utf8_lossy(&out.stderr);
    // The dataset does not exist (that is the one problem); nothing is outside the allowed folders.
    assert!(!out.status.success() && text.contains("`dataset`"), "{text}");
    assert!(!text.contains("`output`") && !text.contains("--allow-path"), "the store's output was refused: {text}");
}

/// Ctrl-C stops `serve` cleanly (its store lock is released: a second coordinator starts at once)
/// and exits 130, as shells expect of an interrupted command.
#[test]
fn ctrl_c_stops_serve_cleanly_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let (mut server, _url) = serve(&store);
    let interrupt = Command::new("kill").args(["-INT", &server.0.id().to_string()]).status().unwrap();
    assert!(interrupt.success());
    let status = server.0.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let started = std::time::Instant::now();
    let (_again, _) = serve(&store);
    assert!(started.elapsed() < Duration::from_secs(10), "the lock was released on the way out");
}

/// `dir/job.toml`: a job over `dir/data` with one (unreadable) image per class of `classes` and the
/// tiny models, for `coordinator run` with a stand-in worker.
fn tiny_run_spec(dir: &Path, classes: &[&str]) -> std::path::PathBuf {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    for class in classes {
        std::fs::create_dir_all(dir.join("data").join(class)).unwrap();
        std::fs::write(dir.join("data").join(class).join("0.png"), b"png").unwrap();
    }
    let spec = dir.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "dataset = \"data\"\nclasses = \"all\"\nlabels = \"position\"\nipc = 1\n[models]\ndit = \"{0}/tiny_dit.onnx\"\nvae_encoder = \"{0}/tiny_vae_encoder.onnx\"\nvae_decoder = \"{0}/tiny_vae_decoder.onnx\"\n",
            models.display()
        ),
    )
    .unwrap();
    spec
}

/// Ctrl-C while `coordinator run` is still setting up (here: waiting for workers that never
/// register) stops it cleanly too: at once, exit 130, nothing submitted, and the store's lock
/// released (it was left behind, the process killed by the signal half way through its set-up).
#[test]
fn ctrl_c_while_run_sets_up_stops_cleanly_before_submitting() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny_run_spec(dir.path(), &["a"]);
    // A worker that never registers: `run` waits for it (up to ten minutes).
    let fake = dir.path().join("worker");
    std::fs::write(&fake, "#!/bin/sh\nexec sleep 120\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["run", spec.to_str().unwrap(), "--local-workers", "1", "--worker-bin", fake.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock = dir.path().join("out").join("coordinator.lock");
    let started = std::time::Instant::now();
    while !lock.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "`run` never took the store");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past the lock: the worker is started and waited for.
    std::thread::sleep(Duration::from_millis(300));
    let interrupt = Command::new("kill").args(["-INT", &run.id().to_string()]).status().unwrap();
    assert!(interrupt.success());
    let stopping = std::time::Instant::now();
    let out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(stopping.elapsed() < Duration::from_secs(20), "it waited on: {text}");
    assert!(text.contains("stopping:") && text.contains("nothing was submitted"), "{text}");
    assert!(!lock.exists(), "the store's lock was left behind");
    assert!(!dir.path().join("out").join("jobs").exists(), "a job was submitted");
}

/// `coordinator run --device cuda --devices 0,2` gives each local worker its own GPU in turn, and
/// passes `--worker-arg=` values and everything after `--` to every worker. (The stand-in worker
/// records its arguments and exits, so the run itself fails: every worker exited.)
#[test]
fn run_gives_each_local_worker_its_own_gpu_and_passes_worker_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny_run_spec(dir.path(), &["a", "b"]);
    let record = dir.path().join("args.txt");
    let fake = dir.path().join("worker");
    std::fs::write(&fake, format!("#!/bin/sh\necho \"$@\" >> {}\n", record.display())).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = coordinator(&[
        "run",
        spec.to_str().unwrap(),
        "--local-workers",
        "3",
        "--device",
        "cuda",
        "--devices",
        "0,2",
        "--worker-bin",
        fake.to_str().unwrap(),
        "--worker-arg=--max-batch=8",
        "--",
        "--threads",
        "1",
    ]);
    assert!(!out.status.success());
    let mut lines: Vec<String> = std::fs::read_to_string(&record).unwrap().lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, (worker, gpu)) in lines.iter().zip([(0, 0), (1, 2), (2, 0)]) {
        assert!(line.contains(&format!("--worker-id local-{worker} --device cuda:{gpu} ")), "{line}");
        assert!(line.ends_with("--max-batch=8 --threads 1"), "{line}");
    }
}

/// `coordinator ready` answers from the standard gRPC health service: at once for a serving
/// coordinator (no token needed), and with an error naming the URL after its timeout otherwise.
#[test]
fn ready_reports_a_serving_coordinator_and_times_out_on_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = serve(&dir.path().join("store"));
    let out = coordinator(&["ready", "--coordinator", &url, "--timeout-s", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let missing = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let out = coordinator(&["ready", "--coordinator", &missing, "--timeout-s", "1"]);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(15));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("the coordinator at {missing} is not serving after 1 s")), "{text}");
}

/// `coordinator check --decode` reads and decodes every real image as the workers will and lists
/// every unreadable one at once — a truncated JPEG, a file that is no image, a zero-byte PNG, in
/// two classes — exiting 1; once they are removed it says every image is readable.
#[test]
fn check_decode_lists_every_unreadable_image_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let encode = |format: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(12, 9, image::Rgb([30, 90, 200])).write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let (jpeg, png) = (encode(image::ImageFormat::Jpeg), encode(image::ImageFormat::Png));
    for class in ["a", "b"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..4 {
            std::fs::write(data.join(class).join(format!("{i}.jpg")), &jpeg).unwrap();
            std::fs::write(data.join(class).join(format!("{i}.png")), &png).unwrap();
        }
    }
    std::fs::write(data.join("a/cut.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(data.join("b/notes.png"), b"not an image at all").unwrap();
    std::fs::write(data.join("b/empty.png"), b"").unwrap();
    let fp = format!("sha256:{}", "0".repeat(64));
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "dataset = \"data\"\nclasses = \"all\"\nlabels = \"folder\"\nipc = 2\n[models]\ndit = \"d.onnx\"\n\
             vae_encoder = \"e.onnx\"\n\
             vae_decoder = \"x.onnx\"\ndit_fingerprint = \"{fp}\"\nvae_encoder_fingerprint = \"{fp}\"\n\
             vae_decoder_fingerprint = \"{fp}\"\n"
        ),
    )
    .unwrap();
    let state = dir.path().join("no-such-state");
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", state.to_str().unwrap(), "--decode"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!state.exists(), "check made the store's folder");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("3 of 19 images cannot be used"), "{stdout}");
    assert!(stdout.contains("cut.jpg: truncated: the JPEG data ends before the image does"), "{stdout}");
    assert!(stdout.contains("notes.png: not an image of a format mgd3 reads"), "{stdout}");
    assert!(stdout.contains("empty.png: empty file (0 bytes)"), "{stdout}");
    assert!(stdout.contains("class b would keep 8 images"), "{stdout}");
    assert!(stderr.contains("3 unreadable image(s)") && stderr.contains("replace or remove them"), "{stderr}");
    // The same problems are what a worker would hit: the plain check (listing only) passes.
    assert!(coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state"]).status.success());
    // A spec refused for another problem (a class of fewer images than IPC) still has the
    // images of the classes that list decoded: one check names both.
    std::fs::create_dir_all(data.join("c")).unwrap();
    std::fs::write(data.join("c/0.png"), &png).unwrap();
    // A file larger than any image a worker reads (sparse: no disk used): refused by the plain
    // check, and listed by the decode without being read.
    let huge = std::fs::File::create(data.join("a/huge.bmp")).unwrap();
    huge.set_len(mgd3_common::imagecheck::MAX_IMAGE_BYTES + 1).unwrap();
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state", "--decode"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("`c`: 1 image(s) but IPC = 2"), "{stderr}");
    assert!(stderr.contains("class `a`: 1 file(s) larger than the 268435456 bytes mgd3 reads"), "{stderr}");
    assert!(stdout.contains("the images of the 3 class(es) that list were decoded anyway"), "{stdout}");
    assert!(stdout.contains("4 of 21 images cannot be used") && stdout.contains("cut.jpg: truncated"), "{stdout}");
    assert!(stdout.contains("huge.bmp: 268435457 bytes, more than the 268435456 bytes mgd3 reads"), "{stdout}");
    std::fs::remove_dir_all(data.join("c")).unwrap();
    std::fs::remove_file(data.join("a/huge.bmp")).unwrap();

    for bad in ["a/cut.jpg", "b/notes.png", "b/empty.png"] {
        std::fs::remove_file(data.join(bad)).unwrap();
    }
    let out = coordinator(&["check", spec.to_str().unwrap(), "--store", "/srv/state", "--decode"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("decoded all 16 images") && stdout.contains("every one is readable"), "{stdout}");
}

/// `check` against an S3 endpoint that does not answer says so in about half a minute, naming
/// the endpoint in use, where a coordinator rides out such an outage for three minutes.
#[test]
fn check_says_an_unreachable_store_within_its_own_patience() {
    let dir = tempfile::tempdir().unwrap();
    let fp = format!("sha256:{}", "0".repeat(64));
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"dry\"\ndataset = \"s3://bucket/data\"\nclasses = \"all\"\nlabels = \"position\"\nipc = 2\n\
             [models]\ndit = \"d.onnx\"\nvae_encoder = \"e.onnx\"\nvae_decoder = \"x.onnx\"\n\
             dit_fingerprint = \"{fp}\"\nvae_encoder_fingerprint = \"{fp}\"\nvae_decoder_fingerprint = \"{fp}\"\n"
        ),
    )
    .unwrap();
    // Port 9 on loopback: nothing listens, every connection is refused at once.
    let vars = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ];
    let started = std::time::Instant::now();
    let said = coordinator_with(&["check", spec.to_str().unwrap(), "--store", "/srv/state"], &vars);
    let took = started.elapsed();
    assert!(
        said.contains("did not answer")
            && said.contains("retried for up to 30 s")
            && said.contains("http://127.0.0.1:9"),
        "{said}"
    );
    assert!(took < std::time::Duration::from_secs(120), "check took {took:?}: {said}");
}
