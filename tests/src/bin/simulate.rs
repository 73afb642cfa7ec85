//! `simulate`: a cluster run in virtual time (see `mgd3_tests::sim`). One scenario from flags,
//! or `--table` for the README's "Scale" table (ImageNet-1K on 8 and 64 GPUs, ImageNet-21K on
//! 256 and 1,024, each without and with preemption waves). `--toy` shrinks everything for CI.
//!
//! `cargo run --release -p mgd3-tests --bin simulate -- --table`

use anyhow::{Result, bail};
use clap::Parser;
use mgd3_tests::sim::{Dataset, Outcome, Preemption, Scenario, run};

#[derive(Parser, Debug)]
#[command(
    about = "Simulates a distillation job on a cluster in virtual time and prints what the coordinator cost",
    allow_negative_numbers = true
)]
struct Args {
    /// `imagenet-1k`, `imagenet-21k`, or `<classes>x<images>` (e.g. `200x500`).
    #[arg(long, default_value = "imagenet-1k")]
    dataset: String,
    /// Workers (GPUs).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Images per class. The named datasets' classes with fewer real images than IPC are
    /// simulated as they are (`coordinator submit` would refuse them); a `<classes>x<images>`
    /// dataset must have at least IPC.
    #[arg(long, default_value_t = 50)]
    ipc: usize,
    /// DiT rows per call the workers report (shards are planned for it; at least 2, one sample's
    /// conditional and unconditional rows). It does not change --sample-rate: give the rate a
    /// GPU reaches at full calls of this many rows.
    #[arg(long, default_value_t = 256)]
    dit_rows: usize,
    /// Distilled images per second per GPU, with full DiT calls of --dit-rows.
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
    /// those that would come after the job ended, or while the coordinator is still away from
    /// the one before, do not happen: the output counts those that did).
    #[arg(long, default_value_t = 0)]
    coordinator_restarts: usize,
    /// Worker heartbeat, ms.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Seed of every draw.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run the README's table instead of one scenario (its datasets, workers and preemption;
    /// the other flags apply to every row).
    #[arg(long, conflicts_with_all = ["dataset", "workers", "preempt_share"])]
    table: bool,
    /// With --table: toy sizes (CI), so the simulator is run and cannot rot.
    #[arg(long, requires = "table")]
    toy: bool,
}

/// Most classes and real images per class a `<classes>x<images>` dataset may have: beyond
/// ImageNet-21K's 21,841 classes and 3,000 images by far, before anything is allocated.
const MAX_CLASSES: usize = 1_000_000;
const MAX_IMAGES: u32 = 1_000_000;

/// Most distilled images a run may make: the in-memory output store keeps a small stand-in per
/// image and its commit records, about 1 GB per million (ImageNet-21K at IPC 100 is 2.2 M).
const MAX_DISTILLED: f64 = 3e6;

fn dataset(text: &str) -> Result<Dataset> {
    Ok(match text {
        "imagenet-1k" => Dataset::ImageNet1k,
        "imagenet-21k" => Dataset::ImageNet21k,
        other => match other.split_once('x').map(|(c, i)| (c.parse::<u64>(), i.parse::<u64>())) {
            Some((Ok(classes), Ok(images))) => {
                if !(1..=MAX_CLASSES as u64).contains(&classes) {
                    bail!("--dataset {other}: 1..{MAX_CLASSES} classes");
                }
                if !(1..=MAX_IMAGES as u64).contains(&images) {
                    bail!("--dataset {other}: 1..{MAX_IMAGES} real images per class");
                }
                Dataset::Uniform { classes: classes as usize, images: images as u32 }
            }
            _ => bail!("--dataset `{other}`: use imagenet-1k, imagenet-21k or <classes>x<images> (e.g. 200x500)"),
        },
    })
}

/// `flag`'s `value` within `range`, else an error naming both (NaN is never within).
fn within<T: PartialOrd + std::fmt::Debug>(
    flag: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    what: &str,
) -> Result<()> {
    if !range.contains(&value) {
        let (from, to) = (range.start(), range.end());
        match what {
            "" => bail!("{flag} {value:?}: {from:?}..{to:?}"),
            what => bail!("{flag} {value:?}: {what}, {from:?}..{to:?}"),
        }
    }
    Ok(())
}

fn scenario(args: &Args) -> Result<Scenario> {
    let mut s = Scenario::new(dataset(&args.dataset)?, args.workers);
    within("--workers", args.workers, 1..=100_000, "")?;
    within("--ipc", args.ipc, 1..=10_000, "images per class")?;
    within(
        "--dit-rows",
        args.dit_rows,
        2..=1_000_000,
        "rows (each sample takes a conditional and an unconditional one)",
    )?;
    for (flag, rate) in [("--sample-rate", args.sample_rate), ("--encode-rate", args.encode_rate)] {
        within(flag, rate, 1e-3..=1e6, "images per second per GPU")?;
    }
    within("--straggler-share", args.straggler_share, 0.0..=1.0, "a share of the class runs")?;
    within("--straggler-factor", args.straggler_factor, 1.0..=100.0, "times as long")?;
    within("--preempt-share", args.preempt_share, 0.0..=1.0, "a share of the workers")?;
    if let Dataset::Uniform { images, .. } = s.dataset
        && (images as usize) < args.ipc
    {
        bail!("--dataset {}: each class needs at least IPC ({}) real images for its modes", args.dataset, args.ipc);
    }
    if args.preempt_share > 0.0 && !(args.preempt_every_min.is_finite() && args.preempt_every_min >= 1.0) {
        bail!("--preempt-every-min {}: at least 1 minute between waves", args.preempt_every_min);
    }
    if !(args.crash_mtbf_h.is_finite() && args.crash_mtbf_h >= 0.0) {
        bail!("--crash-mtbf-h {}: hours, 0 for no crashes", args.crash_mtbf_h);
    }
    if !(100..=60_000).contains(&args.heartbeat_ms) {
        bail!("--heartbeat-ms {}: 100..60000 (the coordinator's `--heartbeat-ms` range)", args.heartbeat_ms);
    }
    // A worker comes back under its old id: the coordinator takes it back once the old process
    // has been silent for three heartbeats, as it would a Slurm requeue on the same node.
    let least = 3.0 * args.heartbeat_ms as f64 / 1000.0;
    if !(args.requeue_s.is_finite() && args.requeue_s >= least && args.requeue_s <= 86_400.0) {
        bail!(
            "--requeue-s {}: {least}..86400 s; at least 3 heartbeats (at --heartbeat-ms {}), the time the coordinator \
             takes to see the preempted process gone",
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
    Ok(s)
}

/// Refuses a run too large to simulate here: more distilled images than the in-memory store
/// holds ([`MAX_DISTILLED`]), or more than 10 million heartbeats (virtual time ÷ heartbeat ×
/// workers, the run at least as long as its longest class), minutes of simulation at tens of
/// microseconds each.
fn check_size(s: &Scenario) -> Result<()> {
    let drawn = s.dataset.draw(&mut rand::thread_rng());
    let classes = drawn.len() as f64;
    let distilled = classes * s.ipc as f64;
    if distilled > MAX_DISTILLED {
        bail!(
            "{} classes × IPC {} is {distilled:.2e} distilled images: at most {MAX_DISTILLED:.0e} (the simulator's \
             in-memory store needs about 1 GB per million); lower --ipc or the classes of --dataset",
            drawn.len(),
            s.ipc
        );
    }
    let class_s = |n: u32| n as f64 / s.encode_rate + s.ipc as f64 / s.sample_rate;
    let per_gpu_s = drawn.iter().map(|&n| class_s(n)).sum::<f64>() / s.workers as f64;
    let longest_s = drawn.iter().map(|&n| class_s(n)).fold(0.0, f64::max);
    let virtual_s = per_gpu_s.max(longest_s);
    let polls = virtual_s * 1000.0 / s.heartbeat_ms as f64 * s.workers as f64;
    if polls > 1e7 {
        bail!(
            "this run would be about {virtual_s:.0} s of virtual time ({longest_s:.0} s for the longest class), \
             {polls:.1e} heartbeats to simulate: raise --sample-rate/--encode-rate or --heartbeat-ms, or use fewer \
             workers"
        );
    }
    Ok(())
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
        "  no schedule of this work beats makespan / ideal = {:.3} ({:.0} s: the committed runs and their partial DiT \
         calls divided at will over the GPUs while they were there)",
        o.bound_ratio(),
        o.bound_s
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
        "| run | GPUs | shards | makespan / ideal | … on the GPUs there | no schedule beats | GPU idle | lease ops/s (1 core) | CPU per event | state bytes per class | state bytes total | requests per image | S3 requests | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}

fn table_row(o: &Outcome) {
    println!(
        "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1} % | {:.0} | {:.1} µs | {:.0} | {:.1} MB | {:.2} | ${:.2} | {:.0} MiB |",
        o.name,
        o.workers,
        o.shards,
        o.ratio(),
        o.ratio_on_present_gpus(),
        o.bound_ratio(),
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
async fn main() -> std::process::ExitCode {
    // Errors are said with their causes, as the coordinator and worker say theirs (no backtrace
    // under RUST_BACKTRACE: a bad flag is not a crash).
    mgd3_common::exit_status(simulate(Args::parse()).await)
}

async fn simulate(args: Args) -> Result<()> {
    if !args.table {
        let s = scenario(&args)?;
        check_size(&s)?;
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
    // Every row is checked as it will run (its dataset and workers, not the flags' defaults)
    // before the first one starts.
    for &(data, workers) in &runs {
        let mut s = scenario(&args)?;
        (s.dataset, s.workers) = (data, workers);
        check_size(&s)?;
    }
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
