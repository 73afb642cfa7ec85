//! `simulate`: a cluster run in virtual time (see `mgd3_tests::sim`). One scenario from flags,
//! or `--table` for the README's "Scale" table (ImageNet-1K on 8 and 64 GPUs, ImageNet-21K on
//! 256 and 1,024, each without and with preemption waves). `--toy` shrinks everything for CI.
//!
//! `cargo run --release -p mgd3-tests --bin simulate -- --table`

use anyhow::{Result, bail};
use clap::Parser;
use mgd3_tests::sim::{Dataset, Outcome, Preemption, Scenario, run};

#[derive(Parser, Debug)]
#[command(about = "Simulates a distillation job on a cluster in virtual time and prints what the coordinator cost")]
struct Args {
    /// `imagenet-1k`, `imagenet-21k`, or `<classes>x<images>` (e.g. `200x500`).
    #[arg(long, default_value = "imagenet-1k")]
    dataset: String,
    /// Workers (GPUs).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Images per class.
    #[arg(long, default_value_t = 50)]
    ipc: usize,
    /// DiT rows per call the workers report (shards are planned for it).
    #[arg(long, default_value_t = 256)]
    dit_rows: usize,
    /// Distilled images per second per GPU, with full DiT calls.
    #[arg(long, default_value_t = 7.17)]
    sample_rate: f64,
    /// Real images per second per GPU through decode and VAE encode.
    #[arg(long, default_value_t = 600.0)]
    encode_rate: f64,
    /// Share of class runs that straggle.
    #[arg(long, default_value_t = 0.02)]
    straggler_share: f64,
    /// How many times as long a straggling class run takes.
    #[arg(long, default_value_t = 3.0)]
    straggler_factor: f64,
    /// Share of live workers preempted per wave (0 = no waves).
    #[arg(long, default_value_t = 0.0)]
    preempt_share: f64,
    /// Minutes between preemption waves.
    #[arg(long, default_value_t = 30.0)]
    preempt_every_min: f64,
    /// Seconds until a preempted or crashed worker runs again.
    #[arg(long, default_value_t = 180.0)]
    requeue_s: f64,
    /// Mean hours between silent crashes of one worker (0 = none).
    #[arg(long, default_value_t = 0.0)]
    crash_mtbf_h: f64,
    /// Coordinator crashes and restarts, spread evenly over the expected run (20 s away each;
    /// those that would come after the job ended do not happen: the output counts those that did).
    #[arg(long, default_value_t = 0)]
    coordinator_restarts: usize,
    /// Worker heartbeat, ms.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Seed of every draw.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the README's table instead of one scenario.
    #[arg(long)]
    table: bool,
    /// With --table: toy sizes (CI), so the simulator is run and cannot rot.
    #[arg(long)]
    toy: bool,
}

fn dataset(text: &str) -> Result<Dataset> {
    Ok(match text {
        "imagenet-1k" => Dataset::ImageNet1k,
        "imagenet-21k" => Dataset::ImageNet21k,
        other => match other.split_once('x').map(|(c, i)| (c.parse(), i.parse())) {
            Some((Ok(classes), Ok(images))) if classes > 0 => Dataset::Uniform { classes, images },
            _ => bail!("--dataset `{other}`: use imagenet-1k, imagenet-21k or <classes>x<images> (e.g. 200x500)"),
        },
    })
}

fn scenario(args: &Args) -> Result<Scenario> {
    let mut s = Scenario::new(dataset(&args.dataset)?, args.workers);
    if args.workers == 0 || args.ipc == 0 || args.dit_rows == 0 {
        bail!("--workers, --ipc and --dit-rows must be at least 1");
    }
    if !(args.sample_rate > 0.0 && args.encode_rate > 0.0) {
        bail!("--sample-rate and --encode-rate must be positive");
    }
    if !(0.0..=1.0).contains(&args.straggler_share) || args.straggler_factor < 1.0 {
        bail!("--straggler-share is a share (0..1) and --straggler-factor at least 1");
    }
    if !(0.0..=1.0).contains(&args.preempt_share) {
        bail!("--preempt-share {}: a share of the workers, 0..1", args.preempt_share);
    }
    if args.workers > 100_000 || args.ipc > 10_000 {
        bail!("--workers is at most 100,000 and --ipc at most 10,000 (the sizes this tool is for)");
    }
    if let Dataset::Uniform { images, .. } = s.dataset
        && (images as usize) < args.ipc
    {
        bail!("--dataset {}: each class needs at least IPC ({}) real images for its modes", args.dataset, args.ipc);
    }
    if !(args.sample_rate.is_finite() && args.encode_rate.is_finite()) {
        bail!("--sample-rate and --encode-rate must be finite");
    }
    if !(1.0..=100.0).contains(&args.straggler_factor) {
        bail!("--straggler-factor {:?}: 1..100 times as long", args.straggler_factor);
    }
    if args.preempt_share > 0.0 && !(args.preempt_every_min.is_finite() && args.preempt_every_min >= 1.0) {
        bail!("--preempt-every-min {:?}: at least 1 minute between waves", args.preempt_every_min);
    }
    if !(args.crash_mtbf_h.is_finite() && args.crash_mtbf_h >= 0.0) {
        bail!("--crash-mtbf-h {:?}: hours, 0 for no crashes", args.crash_mtbf_h);
    }
    if !(100..=60_000).contains(&args.heartbeat_ms) {
        bail!("--heartbeat-ms {}: 100..60000 (the coordinator's `--heartbeat-ms` range)", args.heartbeat_ms);
    }
    // A worker comes back under its old id: the coordinator takes it back once the old process
    // has been silent for three heartbeats, as it would a Slurm requeue on the same node.
    let least = 3.0 * args.heartbeat_ms as f64 / 1000.0;
    if !(args.requeue_s.is_finite() && args.requeue_s >= least) {
        bail!(
            "--requeue-s {}: at least 3 heartbeats ({least} s at --heartbeat-ms {}), the time the coordinator takes to \
             see the preempted process gone",
            args.requeue_s,
            args.heartbeat_ms
        );
    }
    if args.coordinator_restarts > 100 {
        bail!("--coordinator-restarts {}: at most 100", args.coordinator_restarts);
    }
    s.ipc = args.ipc;
    s.dit_rows = args.dit_rows;
    s.sample_rate = args.sample_rate;
    s.encode_rate = args.encode_rate;
    s.requeue_s = args.requeue_s;
    s.straggler_share = args.straggler_share;
    s.straggler_factor = args.straggler_factor;
    s.crash_mtbf_h = args.crash_mtbf_h;
    s.coordinator_restarts = args.coordinator_restarts;
    s.heartbeat_ms = args.heartbeat_ms;
    s.seed = args.seed;
    if args.preempt_share > 0.0 {
        s.preemption = Some(Preemption { share: args.preempt_share, every_s: args.preempt_every_min * 60.0 });
    }
    // Events grow with virtual time ÷ heartbeat: refuse a run that would take hours to simulate.
    let drawn = s.dataset.draw(&mut rand::thread_rng());
    let (classes, images) = (drawn.len() as f64, drawn.iter().map(|&n| n as f64).sum::<f64>());
    let per_gpu_s = (images / s.encode_rate + classes * s.ipc as f64 / s.sample_rate) / s.workers as f64;
    let polls = per_gpu_s * 1000.0 / s.heartbeat_ms as f64 * s.workers as f64;
    if polls > 2e8 {
        bail!(
            "this run would be about {per_gpu_s:.0} s of virtual time per GPU, {polls:.1e} heartbeats to simulate: \
             raise --sample-rate/--encode-rate or --heartbeat-ms, or use fewer workers"
        );
    }
    Ok(s)
}

fn print_one(o: &Outcome) {
    println!("{}: {} classes in {} shards on {} workers", o.name, o.classes, o.shards, o.workers);
    println!(
        "  makespan {:.0} s, ideal {:.0} s (committed GPU time at full DiT calls ÷ workers): makespan / ideal = {:.3}",
        o.makespan_s,
        o.ideal_s,
        o.ratio()
    );
    println!(
        "  GPUs away (preempted, crashed) {:.0} GPU-s: on the GPUs that were there, makespan / ideal = {:.3}",
        o.away_gpu_s,
        o.ratio_on_present_gpus()
    );
    println!(
        "  GPU idle share {:.1} %, GPU time on runs that did not commit {:.0} s, on partial DiT calls {:.0} s",
        o.idle_share * 100.0,
        o.wasted_gpu_s,
        o.partial_call_gpu_s
    );
    println!(
        "  coordinator: {} lease operations, {:.0} per second of its CPU; {:.1} µs CPU per event ({} events)",
        o.lease_ops,
        o.lease_ops_per_s(),
        o.cpu_us_per_event(),
        o.coordinator_events
    );
    println!(
        "  state written: {} bytes in {} writes, {:.0} bytes per committed class",
        o.state_bytes,
        o.state_writes,
        o.state_bytes_per_class()
    );
    let all = o.output_requests.plus(&o.state_requests);
    println!(
        "  object-store requests: {} ({:.2} per image: {} PUT, {} COPY, {} LIST, {} GET, {} HEAD, {} DELETE), \
         ${:.2} at S3 Standard list prices",
        all.total(),
        o.requests_per_image(),
        all.put,
        all.copy,
        all.list,
        all.get,
        all.head,
        all.delete,
        o.s3_usd()
    );
    println!(
        "  preemptions {}, crashes {}, coordinator restarts {}; peak RSS {:.0} MiB (this process); {:.1} s wall",
        o.preemptions,
        o.crashes,
        o.restarts,
        o.peak_rss_bytes as f64 / (1 << 20) as f64,
        o.wall_s
    );
}

fn table_header() {
    println!(
        "| run | GPUs | shards | makespan / ideal | … on the GPUs there | GPU idle | lease ops/s (1 core) | CPU per event | state bytes per class | state bytes total | requests per image | S3 requests | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}

fn table_row(o: &Outcome) {
    println!(
        "| {} | {} | {} | {:.3} | {:.3} | {:.1} % | {:.0} | {:.1} µs | {:.0} | {:.1} MB | {:.2} | ${:.2} | {:.0} MiB |",
        o.name,
        o.workers,
        o.shards,
        o.ratio(),
        o.ratio_on_present_gpus(),
        o.idle_share * 100.0,
        o.lease_ops_per_s(),
        o.cpu_us_per_event(),
        o.state_bytes_per_class(),
        o.state_bytes as f64 / 1e6,
        o.requests_per_image(),
        o.s3_usd(),
        o.peak_rss_bytes as f64 / (1 << 20) as f64
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.table {
        let s = scenario(&args)?;
        let name = format!("{} IPC {}", s.dataset.name(), s.ipc);
        print_one(&run(s, name).await?);
        return Ok(());
    }
    let runs: Vec<(Dataset, usize)> = if args.toy {
        vec![(Dataset::Uniform { classes: 60, images: 300 }, 8), (Dataset::Uniform { classes: 300, images: 300 }, 32)]
    } else {
        vec![
            (Dataset::ImageNet1k, 8),
            (Dataset::ImageNet1k, 64),
            (Dataset::ImageNet21k, 256),
            (Dataset::ImageNet21k, 1024),
        ]
    };
    let mut outcomes = Vec::new();
    for (data, workers) in runs {
        for preempted in [false, true] {
            let mut s = scenario(&args)?;
            (s.dataset, s.workers) = (data, workers);
            if preempted {
                // At toy sizes 5 % of 4 workers is mostly nobody: half, so the row preempts.
                let share = if args.toy { 0.5 } else { 0.05 };
                s.preemption = Some(Preemption { share, every_s: args.preempt_every_min * 60.0 });
            }
            let name = format!(
                "{} IPC {}{}",
                data.name(),
                s.ipc,
                match s.preemption {
                    Some(p) => format!(", {:.0} % preempted every {} min", p.share * 100.0, args.preempt_every_min),
                    None => String::new(),
                }
            );
            let outcome = run(s, name).await?;
            print_one(&outcome);
            outcomes.push(outcome);
        }
    }
    println!();
    table_header();
    for o in &outcomes {
        table_row(o);
    }
    Ok(())
}
