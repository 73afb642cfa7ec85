//! Scale benchmark (`cargo bench -p mgd3-tests --bench scale`): a simulated cluster — the real
//! coordinator and worker loops in one process over loopback gRPC, with the fake engine taking a
//! fixed time per class — distils MGD3_SCALE_CLASSES classes (default 1000) on MGD3_SCALE_WORKERS
//! workers (default 256). Prints makespan ÷ ideal (ceil(classes / workers) × class time) and the
//! PollWork round-trip latency p50/p99 seen by a probe client while the cluster is busy.

use std::time::{Duration, Instant};

use mgd3_common::proto;
use mgd3_common::status::JobState;
use mgd3_coordinator::local::LocalCoordinator;
use mgd3_coordinator::{Coordinator, ServeConfig};
use mgd3_worker::client::{WorkerConfig, run};
use mgd3_worker::shard::FakeEngine;

fn env(key: &str, default: f64) -> f64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let classes = env("MGD3_SCALE_CLASSES", 1000.0) as usize;
    let workers = env("MGD3_SCALE_WORKERS", 256.0) as usize;
    let class_seconds = env("MGD3_SCALE_CLASS_SECONDS", 0.5);
    let ipc = env("MGD3_SCALE_IPC", 10.0) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(workers + 16)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = "memory://scale-bench/state";
        let config = ServeConfig { store_url: store.into(), token: None, tls: None, heartbeat_ms: 1000 };
        let local = LocalCoordinator::start(Coordinator::open(store, 1000).await.unwrap(), config, 0).await.unwrap();
        let (url, coordinator) = (local.url.clone(), local.coordinator.clone());
        let names: Vec<String> = (0..classes).map(|i| format!("\"class{i:04}\"")).collect();
        // The coordinator lists the dataset at submit (the fake engine never reads it).
        let dataset = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("scale-dataset");
        for class in 0..classes {
            let dir = dataset.join(format!("class{class:04}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..ipc {
                std::fs::write(dir.join(format!("{i}.png")), [0u8]).unwrap();
            }
        }
        let fp = format!("sha256:{}", "0".repeat(64));
        let spec = format!(
            "name = \"scale\"\ndataset = \"{}\"\nclasses = [{}]\nlabels = \"position\"\nipc = {ipc}\n\
             lease_timeout_s = 60\n[models]\ndit = \"/m/d\"\nvae_encoder = \"/m/e\"\nvae_decoder = \"/m/x\"\n\
             dit_fingerprint = \"{fp}\"\nvae_encoder_fingerprint = \"{fp}\"\nvae_decoder_fingerprint = \"{fp}\"\n",
            dataset.display(),
            names.join(",")
        );
        let (job, _) = coordinator.submit(&spec, std::path::Path::new("/"), None).await.unwrap();
        let started = Instant::now();
        for i in 0..workers {
            let config = WorkerConfig::new(url.clone(), format!("w{i:03}"));
            let engine = Box::new(FakeEngine::new(Duration::from_secs_f64(class_seconds)));
            tokio::spawn(run(config, engine, std::future::pending()));
        }
        let mut probe = mgd3_common::rpc::connect(&url, None, None).unwrap();
        // The probe is a worker like any other (the coordinator answers only registered ones);
        // it polls as draining, so it is never given a shard.
        let registration = proto::RegisterWorkerRequest {
            worker_id: "probe".into(),
            hostname: "probe".into(),
            protocol_version: mgd3_common::PROTOCOL_VERSION,
            pid: std::process::id(),
            instance: format!("probe-{}", std::process::id()),
            ..Default::default()
        };
        probe.register_worker(registration).await.unwrap();
        let mut latencies = Vec::new();
        loop {
            let sent = Instant::now();
            let request = proto::PollWorkRequest { worker_id: "probe".into(), running: vec![], draining: true, ..Default::default() };
            probe.poll_work(request).await.unwrap();
            latencies.push(sent.elapsed());
            if coordinator.status(&job.job_id).unwrap().state != JobState::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let makespan = started.elapsed().as_secs_f64();
        let status = coordinator.status(&job.job_id).unwrap();
        assert_eq!(status.state, JobState::Succeeded, "{status:?}");
        let ideal = classes.div_ceil(workers) as f64 * class_seconds;
        latencies.sort();
        println!("simulated cluster: {classes} classes × IPC {ipc}, {workers} workers, {class_seconds} s per class (fake engine)");
        println!("  makespan {makespan:.2} s, ideal {ideal:.2} s, makespan / ideal = {:.2}", makespan / ideal);
        println!(
            "  PollWork round trip under load ({} probes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3
        );
        println!("  images committed: {} ({:.0} images/s)", status.images_done, status.images_done as f64 / makespan);
    });
}
