//! A discrete-event simulator of a cluster run, in virtual time: the real lease [`Scheduler`],
//! the real job store ([`ObjectJobStore`]) and the real commit rules (`commit_class`, marker
//! reads, completion checks, the job manifest) over in-memory stores that count every request,
//! driven by simulated workers whose classes take a time drawn from a rate per GPU. Nothing
//! sleeps: an event queue advances the clock, so 1,024 workers × 21,841 classes run in minutes
//! on two cores. What it measures is the coordinator's own cost (CPU per event, state bytes,
//! requests) and how well the lease plan keeps GPUs busy (makespan ÷ ideal), with worker loss,
//! Slurm preemption waves and coordinator restarts.
//!
//! The coordinator's background loop is modelled as it runs in `Coordinator::background`: a tick
//! every heartbeat ÷ 2 (50..1000 ms) that notes departures and expires leases, and a flush of
//! every changed job's state at most every 100 ms.

pub mod counting;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mgd3_common::batch::PlannedRows;
use mgd3_common::commit::{ClassFiles, commit_class, committed_marker, manifest_digest};
use mgd3_common::imagefolder::ListingSummary;
use mgd3_common::job::{ClassRef, JobSpec, ResolvedJob};
use mgd3_common::layout::JobKeys;
use mgd3_common::manifest::{ClassMarker, FileDigest, SCHEMA_VERSION, StageSeconds};
use mgd3_common::status::JobState;
use mgd3_common::store::Location;
use mgd3_coordinator::jobstore::{JobStore, ObjectJobStore};
use mgd3_coordinator::scheduler::{PollDecision, Running, Scheduler, Settled, WorkerProcess};
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use rand_xoshiro::Xoshiro256PlusPlus;

use counting::{CountingStore, Requests};

/// The real images per class of a simulated dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dataset {
    /// ImageNet-1K's train split: 1,000 classes, 1,300 images in most, 732..1,300 in about one
    /// class of ten (1.28 M images).
    ImageNet1k,
    /// ImageNet-21K (fall 2011): 21,841 classes, 14.2 M images, ~650 per class on average with a
    /// long spread (log-normal, σ 0.9, 1..3,000).
    ImageNet21k,
    /// `classes` classes of `images` images each.
    Uniform {
        /// Classes.
        classes: usize,
        /// Real images per class.
        images: u32,
    },
}

impl Dataset {
    /// Real images per class, drawn with `rng`.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<u32> {
        match *self {
            Dataset::ImageNet1k => {
                (0..1000).map(|_| if rng.gen_bool(0.1) { rng.gen_range(732..=1300) } else { 1300 }).collect()
            }
            Dataset::ImageNet21k => {
                // mean = exp(μ + σ²/2) = 650 before clamping.
                let sigma: f64 = 0.9;
                let law = LogNormal::new(650f64.ln() - sigma * sigma / 2.0, sigma).expect("valid law");
                (0..21_841).map(|_| law.sample(rng).round().clamp(1.0, 3000.0) as u32).collect()
            }
            Dataset::Uniform { classes, images } => vec![images; classes],
        }
    }

    /// Its name in tables.
    pub fn name(&self) -> String {
        match self {
            Dataset::ImageNet1k => "ImageNet-1K".into(),
            Dataset::ImageNet21k => "ImageNet-21K".into(),
            Dataset::Uniform { classes, images } => format!("{classes} classes × {images} images"),
        }
    }
}

/// Slurm preemption: every `every_s` seconds, `share` of the live workers get SIGTERM (the
/// first wave halfway through the expected run when that is sooner).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preemption {
    /// Share of the live workers preempted per wave (0..1), each drawn on its own.
    pub share: f64,
    /// Seconds between waves (the first comes after one period).
    pub every_s: f64,
}

/// Everything a simulated run is made of. Rates are per GPU; times in seconds of virtual time.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The data.
    pub dataset: Dataset,
    /// Workers (one per GPU).
    pub workers: usize,
    /// Images per class.
    pub ipc: usize,
    /// DiT rows per call every worker reports (shards are planned for it, as at submit).
    pub dit_rows: usize,
    /// Distilled images per second per GPU with full DiT calls (sampling, 50 steps, CFG pairs,
    /// VAE decode); see `call_overhead_rows`.
    pub sample_rate: f64,
    /// Real images per second per GPU through decode and VAE encode.
    pub encode_rate: f64,
    /// Share of class runs that straggle (a slow node, a slow read)…
    pub straggler_share: f64,
    /// …taking this many times as long.
    pub straggler_factor: f64,
    /// Spread of the GPUs' speed (standard deviation of a factor around 1).
    pub speed_spread: f64,
    /// A DiT call's fixed cost, in rows' worth of compute: a call of r rows costs
    /// `call_overhead_rows + r`, so a shard whose last call is not full samples more slowly
    /// than `sample_rate` (which is for full calls). 11.2 fits the H200 run (7.02 → 7.17
    /// images/s from 256 to 512 rows, README "GPU").
    pub call_overhead_rows: f64,
    /// Preemption waves, if any.
    pub preemption: Option<Preemption>,
    /// Seconds a preempted worker stops after (its current batch; Slurm's grace is longer).
    pub stop_s: f64,
    /// Seconds until a preempted or crashed worker runs again (requeue, start, model load).
    pub requeue_s: f64,
    /// Mean hours between crashes of one worker (silent death: its lease expires); 0 = none.
    pub crash_mtbf_h: f64,
    /// Coordinator restarts (a crash: what was not flushed is lost), evenly spread over the run.
    pub coordinator_restarts: usize,
    /// Seconds the coordinator is away per restart.
    pub restart_s: f64,
    /// Worker heartbeat (ms), as `coordinator serve --heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// The job's `lease_timeout_s`.
    pub lease_timeout_s: u64,
    /// Seconds over which the workers start (uniformly).
    pub start_spread_s: f64,
    /// Seed of every draw.
    pub seed: u64,
}

impl Scenario {
    /// The defaults: `workers` GPUs on `dataset` at IPC 50, rates of an H200 as measured (7.17
    /// images/s sampling, `README.md` "GPU"; 600 real images/s decode + encode, the data stage's
    /// measured 314 images/s per core on two cores per GPU), 2 % stragglers at 3×, GPUs within 3 %.
    pub fn new(dataset: Dataset, workers: usize) -> Self {
        Scenario {
            dataset,
            workers,
            ipc: 50,
            dit_rows: 256,
            sample_rate: 7.17,
            encode_rate: 600.0,
            straggler_share: 0.02,
            straggler_factor: 3.0,
            speed_spread: 0.03,
            call_overhead_rows: 11.2,
            preemption: None,
            stop_s: 2.0,
            requeue_s: 180.0,
            crash_mtbf_h: 0.0,
            coordinator_restarts: 0,
            restart_s: 20.0,
            heartbeat_ms: 2000,
            lease_timeout_s: 120,
            start_spread_s: 2.0,
            seed: 1,
        }
    }
}

/// What a simulated run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The scenario's name in tables.
    pub name: String,
    /// Workers.
    pub workers: usize,
    /// Classes.
    pub classes: usize,
    /// Shards the job was planned into.
    pub shards: usize,
    /// Virtual seconds from the first worker's start to the job's end.
    pub makespan_s: f64,
    /// GPU-seconds of the class runs that committed, at full DiT calls, ÷ workers.
    pub ideal_s: f64,
    /// Share of GPU time (workers × makespan) not spent running classes.
    pub idle_share: f64,
    /// GPU-seconds spent on class runs whose work was lost (preempted, crashed, duplicated).
    pub wasted_gpu_s: f64,
    /// GPU-seconds committed runs spent beyond full DiT calls (shards too small to fill them).
    pub partial_call_gpu_s: f64,
    /// GPU-seconds of workers away (preempted or crashed, until Slurm ran them again or the
    /// job ended): capacity no scheduler could use.
    pub away_gpu_s: f64,
    /// The makespan no schedule of the same work could beat ([`fluid_bound_ms`]): the committed
    /// runs' GPU time, with what their partial DiT calls cost, divisible at will over the GPUs
    /// while they were there — no duplicates, no waiting, the same preemptions at the same times.
    pub bound_s: f64,
    /// Lease operations the coordinator handled (registrations, polls, completions, failures).
    pub lease_ops: u64,
    /// Events the coordinator handled (lease operations, ticks, flushes, recoveries).
    pub coordinator_events: u64,
    /// Wall-clock seconds the coordinator's code took (this process, one thread).
    pub coordinator_cpu_s: f64,
    /// Bytes of job state written (`state.json` and whatever else the job store writes).
    pub state_bytes: u64,
    /// State writes (PUTs to the job store).
    pub state_writes: u64,
    /// Classes committed.
    pub committed_classes: u64,
    /// Images committed.
    pub images: u64,
    /// Requests to the output store.
    pub output_requests: Requests,
    /// Requests to the job store.
    pub state_requests: Requests,
    /// Preemptions, crashes and coordinator restarts that happened.
    pub preemptions: u64,
    /// See [`Outcome::preemptions`].
    pub crashes: u64,
    /// See [`Outcome::preemptions`].
    pub restarts: u64,
    /// Peak resident memory of this process (the coordinator, the simulated workers and the
    /// in-memory stores together: an upper bound of the coordinator's), bytes.
    pub peak_rss_bytes: u64,
    /// Wall-clock seconds the simulation took.
    pub wall_s: f64,
}

impl Outcome {
    /// Makespan ÷ ideal.
    pub fn ratio(&self) -> f64 {
        self.makespan_s / self.ideal_s
    }

    /// Makespan ÷ the ideal on the GPUs that were there: the committed work spread over the
    /// GPU-seconds of the makespan less those of workers away (preempted, crashed). What the
    /// scheduler lost, apart from what the cluster took.
    pub fn ratio_on_present_gpus(&self) -> f64 {
        let present = self.workers as f64 * self.makespan_s - self.away_gpu_s;
        let ideal = self.ideal_s * self.workers as f64 / (present / self.makespan_s).max(1e-9);
        self.makespan_s / ideal
    }

    /// [`Outcome::bound_s`] ÷ ideal: how close to the ideal any scheduler could have come.
    pub fn bound_ratio(&self) -> f64 {
        self.bound_s / self.ideal_s
    }

    /// Lease operations per second of coordinator CPU.
    pub fn lease_ops_per_s(&self) -> f64 {
        self.lease_ops as f64 / self.coordinator_cpu_s.max(1e-9)
    }

    /// Microseconds of coordinator CPU per event.
    pub fn cpu_us_per_event(&self) -> f64 {
        self.coordinator_cpu_s * 1e6 / self.coordinator_events.max(1) as f64
    }

    /// Bytes of job state written per committed class.
    pub fn state_bytes_per_class(&self) -> f64 {
        self.state_bytes as f64 / self.committed_classes.max(1) as f64
    }

    /// Object-store requests (output and job store) per committed image.
    pub fn requests_per_image(&self) -> f64 {
        self.output_requests.plus(&self.state_requests).total() as f64 / self.images.max(1) as f64
    }

    /// Requests at S3 list prices (USD).
    pub fn s3_usd(&self) -> f64 {
        self.output_requests.plus(&self.state_requests).s3_usd()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The coordinator's background tick (departures, expiries).
    Tick,
    /// A flush of changed job state.
    Flush,
    /// A worker polls: its life (events of an earlier life of the worker are void) and which of
    /// its polls (only the latest scheduled one runs: the worker has one loop, which polls a
    /// heartbeat after the last poll, or at once when a shard ends).
    Poll(usize, u32, u64),
    /// A worker finished the class it was running.
    ClassDone(usize, u32),
    /// A preemption wave.
    Wave,
    /// A worker dies without a word.
    Crash(usize, u32),
    /// A preempted or crashed worker runs again.
    Rejoin(usize),
    /// The coordinator dies (what it had not flushed is lost)…
    CoordinatorDown,
    /// …and starts again, recovering from the store.
    CoordinatorUp,
}

struct Held {
    lease_id: String,
    attempt_id: String,
    classes: Vec<ClassRef>,
    /// Index into `classes` of the class running now.
    next: usize,
    class_started_ms: u64,
    markers: Vec<ClassMarker>,
    images_done: u32,
    classes_done: u32,
    /// DiT image-steps of the classes this attempt sampled to the end.
    image_steps: u64,
    /// When the running class's sampling starts and ends (after its data stage), ms.
    sampling: (u64, u64),
    /// How much slower than full DiT calls the shard samples ([`Sim::call_penalty`]).
    penalty: f64,
}

impl Held {
    /// The image-steps a worker reports at `now`: its finished classes' and, linearly over
    /// the running class's sampling, that class's (`per_class` image-steps).
    fn image_steps_at(&self, now: u64, per_class: u64) -> u64 {
        let (from, to) = self.sampling;
        let share = if to > from { (now.saturating_sub(from) as f64 / (to - from) as f64).min(1.0) } else { 0.0 };
        self.image_steps + (share * per_class as f64) as u64
    }
}

struct Worker {
    id: String,
    instance: String,
    life: u32,
    /// The token of the worker's one pending poll ([`Event::Poll`]).
    poll_token: u64,
    up: bool,
    /// The coordinator epoch it registered with (it registers again after a restart).
    registered: Option<u32>,
    speed: f64,
    held: Option<Held>,
    /// A completion the coordinator has not accepted yet (it was away).
    completion: Option<(String, String)>,
    drained: bool,
    /// Since when it is away (preempted or crashed), until it runs again.
    down_since: Option<u64>,
}

struct Sim {
    scenario: Scenario,
    job: Arc<ResolvedJob>,
    keys: JobKeys,
    images: Vec<u32>,
    rng: Xoshiro256PlusPlus,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: u64,
    scheduler: Option<Scheduler>,
    epoch: u32,
    jobs: ObjectJobStore,
    state_store: Arc<CountingStore>,
    out: Location,
    out_store: Arc<CountingStore>,
    workers: Vec<Worker>,
    dirty: bool,
    flush_due: bool,
    last_flush: u64,
    finished: Option<(u64, JobState)>,
    // Measurements.
    busy_ms: u64,
    committed_ms: u64,
    /// What committed runs took beyond `committed_ms` (partial DiT calls).
    partial_ms: u64,
    /// GPU-ms of workers away (preempted or crashed) until they ran again.
    down_ms: u64,
    /// When each worker was not there: before its start, and away after a preemption or crash
    /// until it ran again (`u64::MAX` while still away), ms.
    absent: Vec<(u64, u64)>,
    lease_ops: u64,
    events: u64,
    cpu: Duration,
    preemptions: u64,
    crashes: u64,
    restarts: u64,
    committed: HashSet<String>,
}

fn memory_location(name: &str) -> (Location, Arc<CountingStore>) {
    let store = Arc::new(CountingStore::new(Arc::new(InMemory::new())));
    let location = Location {
        url: format!("memory://{name}"),
        store: store.clone() as Arc<dyn ObjectStore>,
        prefix: Path::from(name),
        local_root: None,
    };
    (location, store)
}

/// The job a scenario distils, planned as submit plans it for `workers` workers reporting
/// `dit_rows` rows.
fn job(scenario: &Scenario, images: &[u32]) -> Result<ResolvedJob> {
    let classes = images.len();
    let fp = format!("sha256:{}", "0".repeat(64));
    let names: Vec<String> = (0..classes).map(|i| format!("\"c{i:05}\"")).collect();
    let spec = format!(
        "name = \"simulated\"\ndataset = \"/data/train\"\nclasses = [{}]\nlabels = \"position\"\nipc = {}\n\
         lease_timeout_s = {}\n[models]\ndit = \"/m/d\"\nvae_encoder = \"/m/e\"\nvae_decoder = \"/m/x\"\n\
         dit_fingerprint = \"{fp}\"\nvae_encoder_fingerprint = \"{fp}\"\nvae_decoder_fingerprint = \"{fp}\"\n",
        names.join(","),
        scenario.ipc,
        scenario.lease_timeout_s
    );
    let spec = JobSpec::from_toml(&spec).context("the simulated job's spec")?;
    let classes: Vec<ClassRef> = (0..classes)
        .map(|i| ClassRef {
            wnid: format!("c{i:05}"),
            label: (i % 1000) as i64,
            class_index: i as u64,
            // What submit records of a class's listing: the scheduler orders leases by it.
            listing: Some(ListingSummary {
                digest: String::new(),
                names_digest: String::new(),
                images: images[i] as u64,
                bytes: images[i] as u64 * 110_000,
                content_digest: None,
            }),
        })
        .collect();
    let planned = PlannedRows::Reported { dit_rows: scenario.dit_rows, workers: scenario.workers };
    let shards = spec.plan_shards_for(classes.len(), planned);
    let fingerprint = spec.fingerprint(&classes);
    let job_id = mgd3_common::job::job_id(&spec, &fingerprint);
    Ok(ResolvedJob { job_id, spec, classes, shards, fingerprint, created_unix_ms: 0 })
}

/// Peak resident memory of this process (`VmHWM`), bytes; 0 where /proc has none.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs one scenario to the job's end.
///
/// # Errors
/// When the simulated job does not succeed, a class is committed twice or not at all, or a
/// store call fails.
pub async fn run(scenario: Scenario, name: impl Into<String>) -> Result<Outcome> {
    let wall = Instant::now();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(scenario.seed);
    let images = scenario.dataset.draw(&mut rng);
    let job = Arc::new(job(&scenario, &images)?);
    let (state_location, state_store) = memory_location("sim-state");
    let (out, out_store) = memory_location("sim-out");
    let jobs = ObjectJobStore::new(state_location);
    jobs.create_job(&job).await?;
    let workers = (0..scenario.workers)
        .map(|i| Worker {
            id: format!("w{i:04}"),
            instance: format!("i{i}-0"),
            life: 0,
            poll_token: 0,
            up: true,
            registered: None,
            speed: (1.0 + scenario.speed_spread * normal(&mut rng)).clamp(0.5, 1.5),
            held: None,
            completion: None,
            drained: false,
            down_since: None,
        })
        .collect();
    let mut scheduler = Scheduler::new(scenario.heartbeat_ms, "e0");
    scheduler.add_job(job.clone(), None, &HashSet::new(), 0);
    let mut sim = Sim {
        keys: JobKeys::new(&job.job_id),
        job,
        images,
        rng,
        queue: BinaryHeap::new(),
        seq: 0,
        now: 0,
        scheduler: Some(scheduler),
        epoch: 0,
        jobs,
        state_store,
        out,
        out_store,
        workers,
        dirty: true,
        flush_due: false,
        last_flush: 0,
        finished: None,
        busy_ms: 0,
        committed_ms: 0,
        partial_ms: 0,
        down_ms: 0,
        absent: Vec::new(),
        lease_ops: 0,
        events: 0,
        cpu: Duration::ZERO,
        preemptions: 0,
        crashes: 0,
        restarts: 0,
        committed: HashSet::new(),
        scenario,
    };
    sim.start();
    sim.run().await?;
    sim.outcome(name.into(), wall.elapsed())
}

/// The first time (ms) by which `workers` GPUs, each not there during its `absent` intervals
/// (start, end; ms), can have run `work_ms` GPU-ms: the smallest makespan M with
/// workers × M − (absent GPU-ms before M) ≥ work, found by bisection (the left side grows with
/// M). A lower bound of any schedule of that work on those GPUs.
pub fn fluid_bound_ms(workers: usize, absent: &[(u64, u64)], work_ms: u64) -> u64 {
    let done_by = |m: u64| -> u64 {
        let away: u64 = absent.iter().map(|&(from, to)| to.min(m).saturating_sub(from)).sum();
        (workers as u64 * m).saturating_sub(away)
    };
    let (mut low, mut high) = (0u64, 1u64);
    while done_by(high) < work_ms {
        high *= 2;
    }
    while low < high {
        let mid = low + (high - low) / 2;
        if done_by(mid) >= work_ms { high = mid } else { low = mid + 1 }
    }
    high
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let (u, v): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.r#gen());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

impl Sim {
    fn at(&mut self, when: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((when, self.seq, event)));
    }

    /// Schedules the worker's next poll at `when`, replacing the one pending.
    fn poll_at(&mut self, w: usize, when: u64) {
        let worker = &mut self.workers[w];
        worker.poll_token += 1;
        let (life, token) = (worker.life, worker.poll_token);
        self.at(when, Event::Poll(w, life, token));
    }

    fn start(&mut self) {
        let s = &self.scenario;
        let spread = (s.start_spread_s * 1000.0) as u64;
        for w in 0..self.workers.len() {
            let start = if spread == 0 { 0 } else { self.rng.gen_range(0..=spread) };
            self.absent.push((0, start));
            self.poll_at(w, start);
            if self.scenario.crash_mtbf_h > 0.0 {
                let when = self.crash_delay();
                self.at(start + when, Event::Crash(w, 0));
            }
        }
        let tick = (self.scenario.heartbeat_ms / 2).clamp(50, 1000);
        self.at(tick, Event::Tick);
        if let Some(p) = self.scenario.preemption {
            // The first wave halfway through the expected run when that is sooner than a
            // period: a run shorter than the period still meets one.
            let first = ((p.every_s * 1000.0) as u64).min(self.expected_makespan_ms() / 2);
            self.at(first, Event::Wave);
        }
        if self.scenario.coordinator_restarts > 0 {
            // Spread over the run's expected length.
            let expected = self.expected_makespan_ms();
            for k in 1..=self.scenario.coordinator_restarts {
                let when = expected * k as u64 / (self.scenario.coordinator_restarts as u64 + 1);
                self.at(when, Event::CoordinatorDown);
            }
        }
    }

    fn crash_delay(&mut self) -> u64 {
        let mean_ms = self.scenario.crash_mtbf_h * 3600.0 * 1000.0;
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        (-u.ln() * mean_ms) as u64
    }

    fn class_ms(&self, class_index: usize) -> f64 {
        let s = &self.scenario;
        (self.images[class_index] as f64 / s.encode_rate + s.ipc as f64 / s.sample_rate) * 1000.0
    }

    /// How much slower than full calls a shard of `classes` samples: its n = classes × IPC
    /// images go in ⌈n / m⌉ calls of up to m = rows / 2 images (CFG pairs), each costing
    /// `call_overhead_rows` more than its rows.
    fn call_penalty(&self, classes: usize) -> f64 {
        let s = &self.scenario;
        let per_call = (s.dit_rows / 2).max(1) as f64;
        let n = (classes * s.ipc) as f64;
        let calls = (n / per_call).ceil();
        let shard = (calls * s.call_overhead_rows + 2.0 * n) / n;
        let full = (s.call_overhead_rows + 2.0 * per_call) / per_call;
        shard / full
    }

    fn expected_makespan_ms(&self) -> u64 {
        let total: f64 = (0..self.images.len()).map(|c| self.class_ms(c)).sum();
        (total / self.workers.len() as f64) as u64
    }

    /// Runs coordinator code, timing it as the coordinator's CPU.
    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let started = Instant::now();
        let value = f(self);
        self.cpu += started.elapsed();
        self.events += 1;
        value
    }

    fn mark_dirty(&mut self) {
        self.dirty = true;
        if !self.flush_due {
            self.flush_due = true;
            let when = self.now.max(self.last_flush + 100);
            self.at(when, Event::Flush);
        }
    }

    fn settle(&mut self, settled: Settled) {
        self.mark_dirty();
        if let Settled::Finished(state) = settled
            && self.finished.is_none()
        {
            self.finished = Some((self.now, state));
        }
    }

    async fn run(&mut self) -> Result<()> {
        // A job that cannot end (a scheduling bug) must not spin forever.
        let limit = 100 * self.expected_makespan_ms().max(60_000);
        while let Some(Reverse((when, _, event))) = self.queue.pop() {
            self.now = when;
            if when > limit {
                bail!(
                    "the job had not ended after {} s of virtual time (100 × the expected makespan): \
                     {} crashes and {} preemptions so far; workers that die more often than they \
                     finish a class never finish the job (raise --crash-mtbf-h, lower \
                     --preempt-share, or shorten --requeue-s)",
                    limit / 1000,
                    self.crashes,
                    self.preemptions
                );
            }
            match event {
                Event::Tick => self.tick(),
                Event::Flush => self.flush().await?,
                Event::Poll(w, life, token) if self.alive(w, life) && self.workers[w].poll_token == token => {
                    self.poll(w).await?
                }
                Event::ClassDone(w, life) if self.alive(w, life) => self.class_done(w).await?,
                Event::Wave => self.wave(),
                Event::Crash(w, life) if self.alive(w, life) => self.crash(w),
                Event::Rejoin(w) => self.rejoin(w),
                Event::CoordinatorDown => self.coordinator_down(),
                Event::CoordinatorUp => self.coordinator_up().await?,
                _ => {}
            }
            if let Some((_, state)) = self.finished {
                if state != JobState::Succeeded {
                    let why = self
                        .scheduler
                        .as_ref()
                        .and_then(|s| s.persisted(&self.job.job_id))
                        .and_then(|p| p.shards.iter().find_map(|shard| shard.last_error.clone()))
                        .map_or_else(String::new, |e| format!(": {}", e.error));
                    bail!(
                        "the simulated job ended {state:?}{why} (its shards ran out of attempts: \
                         fewer crashes or preemptions, or a longer --requeue-s, let it finish)"
                    );
                }
                // The manifest, as the coordinator writes it when a job succeeds.
                let (out, job, finished) = (self.out.clone(), self.job.clone(), self.now);
                let started = Instant::now();
                mgd3_coordinator::state::write_manifest(&out, &job, finished).await?;
                self.cpu += started.elapsed();
                self.flush().await?;
                return Ok(());
            }
        }
        bail!("the event queue ran dry before the job ended")
    }

    fn alive(&self, w: usize, life: u32) -> bool {
        let worker = &self.workers[w];
        worker.up && worker.life == life && !worker.drained
    }

    fn tick(&mut self) {
        if self.scheduler.is_some() {
            let now = self.now;
            let settled = self.timed(|sim| {
                let scheduler = sim.scheduler.as_mut().expect("up");
                scheduler.note_departures(now);
                let settled = scheduler.expire(now);
                scheduler.take_worker_events();
                settled
            });
            for (_, s) in settled {
                self.settle(s);
            }
        }
        let tick = (self.scenario.heartbeat_ms / 2).clamp(50, 1000);
        self.at(self.now + tick, Event::Tick);
    }

    async fn flush(&mut self) -> Result<()> {
        self.flush_due = false;
        let Some(scheduler) = &self.scheduler else { return Ok(()) };
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        let persisted = scheduler.persisted(&self.job.job_id).cloned().context("the job's state")?;
        self.jobs.write_state(&self.job.job_id, &persisted).await?;
        self.cpu += started.elapsed();
        self.events += 1;
        self.dirty = false;
        self.last_flush = self.now;
        Ok(())
    }

    async fn poll(&mut self, w: usize) -> Result<()> {
        let heartbeat = self.scenario.heartbeat_ms;
        if self.scheduler.is_none() {
            // The coordinator is away: the worker retries (its classes run on meanwhile).
            self.poll_at(w, self.now + heartbeat);
            return Ok(());
        }
        let now = self.now;
        if self.workers[w].registered != Some(self.epoch) {
            let (id, process) = self.process(w);
            self.timed(|sim| {
                let scheduler = sim.scheduler.as_mut().expect("up");
                scheduler.claim(&id, process, now)?;
                scheduler.register(&id, now);
                scheduler.report_dit_rows(&id, sim.scenario.dit_rows);
                anyhow::Ok(())
            })?;
            self.lease_ops += 1;
            self.workers[w].registered = Some(self.epoch);
        }
        if let Some((lease_id, digest)) = self.workers[w].completion.clone() {
            self.complete(w, &lease_id, &digest).await?;
        }
        let per_class = (self.scenario.ipc * self.job.spec.sampling.steps) as u64;
        let worker = &self.workers[w];
        let running: Vec<Running> = worker
            .held
            .iter()
            .map(|h| Running {
                lease_id: h.lease_id.clone(),
                images_done: h.images_done,
                classes_done: h.classes_done,
                image_steps_done: h.image_steps_at(now, per_class),
            })
            .collect();
        let id = worker.id.clone();
        let (decision, revoked, settled) = self.timed(|sim| {
            let scheduler = sim.scheduler.as_mut().expect("up");
            let (decision, revoked) = scheduler.poll(&id, &running, false, now)?;
            anyhow::Ok((decision, revoked, scheduler.take_settled()))
        })?;
        self.lease_ops += 1;
        for (_, s) in settled {
            self.settle(s);
        }
        if !revoked.is_empty() && self.workers[w].held.as_ref().is_some_and(|h| revoked.contains(&h.lease_id)) {
            // The coordinator took the lease away: the class in progress is wasted.
            let worker = &mut self.workers[w];
            let held = worker.held.take().expect("held");
            worker.life += 1;
            self.busy_ms += now - held.class_started_ms;
        }
        match decision {
            PollDecision::Lease(grant) => {
                self.mark_dirty();
                let held = Held {
                    lease_id: grant.lease_id,
                    attempt_id: grant.attempt_id,

                    classes: grant.classes,
                    next: 0,
                    class_started_ms: now,
                    markers: Vec::new(),
                    images_done: 0,
                    classes_done: 0,
                    image_steps: 0,
                    sampling: (now, now),
                    penalty: 1.0,
                };
                self.workers[w].held = Some(held);
                // The next heartbeat first: a shard that ends at once (every class committed
                // already) replaces it with a poll at once.
                self.poll_at(w, now + heartbeat);
                self.start_shard(w).await?;
            }
            PollDecision::Wait(ms) => self.poll_at(w, now + ms),
            PollDecision::Drain => self.workers[w].drained = true,
        }
        Ok(())
    }

    fn process(&self, w: usize) -> (String, WorkerProcess) {
        let worker = &self.workers[w];
        let process =
            WorkerProcess { instance: worker.instance.clone(), host: format!("node{}", w / 8), pid: w as u32 };
        (worker.id.clone(), process)
    }

    /// The worker's first step on a lease: classes an earlier attempt committed are only
    /// re-published; the first class to distil starts.
    async fn start_shard(&mut self, w: usize) -> Result<()> {
        let (out, keys, fingerprint) = (self.out.clone(), self.keys.clone(), self.job.fingerprint.clone());
        let held = self.workers[w].held.as_mut().expect("held");
        let mut index = 0;
        while index < held.classes.len() {
            let class = &held.classes[index];
            match committed_marker(&out, &keys, &class.wnid, &fingerprint).await? {
                Some(marker) => {
                    mgd3_common::commit::publish(&out, &keys, &marker, mgd3_common::commit::Check::Size).await?;
                    held.markers.push(marker);
                    held.classes_done += 1;
                    index += 1;
                }
                None => break,
            }
        }
        held.next = index;
        self.next_class(w).await
    }

    /// Starts the worker's next class, or reports the shard complete when none is left.
    async fn next_class(&mut self, w: usize) -> Result<()> {
        let held = self.workers[w].held.as_ref().expect("held");
        if held.next >= held.classes.len() {
            let digest = manifest_digest(&held.markers);
            let lease_id = held.lease_id.clone();
            self.workers[w].held = None;
            self.workers[w].completion = Some((lease_id.clone(), digest.clone()));
            if self.scheduler.is_some() {
                self.complete(w, &lease_id, &digest).await?;
            }
            // The worker polls again at once for its next shard.
            self.poll_at(w, self.now + 1);
            return Ok(());
        }
        let class_index = held.classes[held.next].class_index as usize;
        let s = &self.scenario;
        let mut slow = 1.0 / self.workers[w].speed;
        if self.rng.gen_bool(s.straggler_share) {
            slow *= s.straggler_factor;
        }
        // The data stage first, then the DiT steps (what the worker's heartbeats count).
        let data_ms = self.images[class_index] as f64 / s.encode_rate * 1000.0 * slow;
        let penalty = self.call_penalty(held.classes.len());
        let ms = data_ms + (self.class_ms(class_index) * slow - data_ms) * penalty;
        let data_ms = data_ms as u64;
        let life = self.workers[w].life;
        let now = self.now;
        let held = self.workers[w].held.as_mut().expect("held");
        held.class_started_ms = now;
        held.sampling = (now + data_ms, now + ms.max(1.0) as u64);
        held.penalty = penalty;
        self.at(self.now + ms.max(1.0) as u64, Event::ClassDone(w, life));
        Ok(())
    }

    async fn class_done(&mut self, w: usize) -> Result<()> {
        let now = self.now;
        let (class, attempt_id) = {
            let held = self.workers[w].held.as_ref().expect("a class runs only under a lease");
            (held.classes[held.next].clone(), held.attempt_id.clone())
        };
        let started = self.workers[w].held.as_ref().expect("held").class_started_ms;
        self.busy_ms += now - started;
        let ipc = self.scenario.ipc;
        let marker = ClassMarker {
            schema_version: SCHEMA_VERSION,
            job_id: self.job.job_id.clone(),
            fingerprint: self.job.fingerprint.clone(),
            attempt_id,
            worker_id: self.workers[w].id.clone(),
            wnid: class.wnid.clone(),
            label: class.label,
            class_index: class.class_index,
            images: Vec::new(),
            modes: FileDigest { name: String::new(), sha256: String::new(), bytes: 0 },
            real_images: self.images[class.class_index as usize] as u64,
            timings: StageSeconds::default(),
            committed_unix_ms: now,
            latent_cache_hit: false,
            modes_cache_hit: false,
            skipped: Default::default(),
            quality: None,
            embedding: None,
            versions_changed: false,
            data: None,
            sheet_record: false,
        };
        // Small stand-ins for the PNGs: the requests are what is counted, not the bytes.
        let files = ClassFiles {
            images: (0..ipc).map(|j| format!("{}-{j}", class.wnid).into_bytes()).collect(),
            modes_npy: b"modes".to_vec(),
        };
        let (out, keys) = (self.out.clone(), self.keys.clone());
        let outcome = commit_class(&out, &keys, marker, files).await?;
        let sheet = out.key(&keys.contact_sheet(&class.wnid));
        object_store::ObjectStoreExt::put(out.store.as_ref(), &sheet, b"sheet".to_vec().into()).await?;
        let marker = committed_marker(&out, &keys, &class.wnid, &self.job.fingerprint)
            .await?
            .context("a marker vanished after its commit")?;
        if outcome == mgd3_common::commit::CommitOutcome::Won {
            if !self.committed.insert(class.wnid.clone()) {
                bail!("class `{}` was committed twice", class.wnid);
            }
            // The ideal counts the class's time as full DiT calls would have taken it: what
            // partial calls cost is the plan's, like idle time.
            let held = self.workers[w].held.as_ref().expect("held");
            let data = held.sampling.0.saturating_sub(started);
            let full = data + ((now - started - data) as f64 / held.penalty) as u64;
            self.committed_ms += full;
            self.partial_ms += now - started - full;
        }
        let held = self.workers[w].held.as_mut().expect("held");
        held.markers.push(marker);
        held.next += 1;
        held.classes_done += 1;
        held.images_done += ipc as u32;
        held.image_steps += (ipc * self.job.spec.sampling.steps) as u64;
        self.next_class(w).await
    }

    /// The coordinator's side of `CompleteShard` (`Coordinator::complete`): every class's marker
    /// must be there and the digest of the markers must match; then the shard is done.
    async fn complete(&mut self, w: usize, lease_id: &str, digest: &str) -> Result<()> {
        let started = Instant::now();
        let worker_id = self.workers[w].id.clone();
        let now = self.now;
        let scheduler = self.scheduler.as_mut().expect("up");
        let result = match scheduler.lease(&worker_id, lease_id) {
            Ok((job, shard)) => {
                let mut markers = Vec::new();
                for class in job.shard_classes(shard) {
                    markers.push(
                        committed_marker(&self.out, &self.keys, &class.wnid, &job.fingerprint)
                            .await?
                            .with_context(|| format!("class `{}` has no marker at completion", class.wnid))?,
                    );
                }
                if manifest_digest(&markers) != digest {
                    bail!("the digest of shard {shard} does not match its markers");
                }
                let scheduler = self.scheduler.as_mut().expect("up");
                Some(scheduler.complete(&worker_id, lease_id, now)?.1)
            }
            // The lease is gone (expired while the coordinator was away): nothing to complete.
            Err(_) => None,
        };
        self.cpu += started.elapsed();
        self.events += 1;
        self.lease_ops += 1;
        self.workers[w].completion = None;
        if let Some(settled) = result {
            self.settle(settled);
        }
        Ok(())
    }

    fn wave(&mut self) {
        let Some(p) = self.scenario.preemption else { return };
        // Each live worker is preempted with probability `share`: 5 % of 8 workers is a
        // preemption in about every third wave, not none.
        let live: Vec<usize> =
            (0..self.workers.len()).filter(|&w| self.workers[w].up && !self.workers[w].drained).collect();
        for w in live {
            if self.rng.gen_bool(p.share) {
                self.preempt(w);
            }
        }
        self.at(self.now + (p.every_s * 1000.0) as u64, Event::Wave);
    }

    /// SIGTERM: the worker stops after its current batch, releases its lease (no attempt spent;
    /// committed classes stay) and exits; Slurm runs it again after the requeue delay.
    fn preempt(&mut self, w: usize) {
        self.preemptions += 1;
        let stop_ms = (self.scenario.stop_s * 1000.0) as u64;
        let now = self.now;
        let worker = &mut self.workers[w];
        worker.life += 1;
        worker.up = false;
        if let Some(held) = worker.held.take() {
            self.busy_ms += now + stop_ms - held.class_started_ms;
            if self.scheduler.is_some() && worker.registered == Some(self.epoch) {
                let id = worker.id.clone();
                let committed = held.classes_done;
                let settled = self.timed(|sim| {
                    let scheduler = sim.scheduler.as_mut().expect("up");
                    scheduler.note_committed(&id, &held.lease_id, committed);
                    scheduler.fail(&id, &held.lease_id, None, "preempted".into(), true, true, now)
                });
                self.lease_ops += 1;
                if let Ok((_, s)) = settled {
                    self.settle(s);
                }
            }
        }
        self.workers[w].down_since = Some(now + stop_ms);
        let back = now + stop_ms + (self.scenario.requeue_s * 1000.0) as u64;
        self.at(back, Event::Rejoin(w));
    }

    fn crash(&mut self, w: usize) {
        self.crashes += 1;
        let now = self.now;
        let worker = &mut self.workers[w];
        worker.life += 1;
        worker.up = false;
        worker.down_since = Some(now);
        if let Some(held) = worker.held.take() {
            self.busy_ms += now - held.class_started_ms;
        }
        self.at(now + (self.scenario.requeue_s * 1000.0) as u64, Event::Rejoin(w));
    }

    fn rejoin(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        if let Some(since) = worker.down_since.take() {
            self.down_ms += self.now - since;
            self.absent.push((since, self.now));
        }
        worker.up = true;
        worker.instance = format!("i{w}-{}", worker.life);
        worker.registered = None;
        worker.completion = None;
        let life = worker.life;
        self.poll_at(w, self.now);
        if self.scenario.crash_mtbf_h > 0.0 {
            let when = self.crash_delay();
            self.at(self.now + when, Event::Crash(w, life));
        }
    }

    fn coordinator_down(&mut self) {
        if self.scheduler.take().is_some() {
            self.restarts += 1;
            self.at(self.now + (self.scenario.restart_s * 1000.0) as u64, Event::CoordinatorUp);
        }
    }

    /// A new coordinator process: the job's records and its markers, as `Coordinator::open`
    /// recovers them.
    async fn coordinator_up(&mut self) -> Result<()> {
        let started = Instant::now();
        self.epoch += 1;
        let (job, persisted) = self.jobs.load_job(&self.job.job_id).await?;
        let committed = mgd3_coordinator::state::committed_shards(&self.out, &job).await?;
        let mut scheduler = Scheduler::new(self.scenario.heartbeat_ms, format!("e{}", self.epoch));
        scheduler.add_job(Arc::new(job), persisted, &committed, self.now);
        self.scheduler = Some(scheduler);
        self.cpu += started.elapsed();
        self.events += 1;
        self.mark_dirty();
        Ok(())
    }

    fn outcome(&self, name: String, wall: Duration) -> Result<Outcome> {
        let (end, _) = self.finished.context("the job did not end")?;
        let classes = self.job.classes.len();
        if self.committed.len() != classes {
            bail!("{} of {classes} classes committed", self.committed.len());
        }
        let workers = self.workers.len();
        let makespan_ms = end as f64;
        let still_down: u64 =
            self.workers.iter().filter_map(|w| w.down_since).map(|since| end.saturating_sub(since)).sum();
        let state = self.state_store.requests();
        let absent: Vec<(u64, u64)> = self
            .absent
            .iter()
            .copied()
            .chain(self.workers.iter().filter_map(|w| w.down_since).map(|since| (since, u64::MAX)))
            .collect();
        let bound_ms = fluid_bound_ms(workers, &absent, self.committed_ms + self.partial_ms);
        Ok(Outcome {
            name,
            workers,
            classes,
            shards: self.job.shards.len(),
            makespan_s: makespan_ms / 1000.0,
            ideal_s: self.committed_ms as f64 / workers as f64 / 1000.0,
            idle_share: 1.0 - self.busy_ms as f64 / (workers as f64 * makespan_ms),
            wasted_gpu_s: (self.busy_ms - self.committed_ms - self.partial_ms) as f64 / 1000.0,
            partial_call_gpu_s: self.partial_ms as f64 / 1000.0,
            away_gpu_s: (self.down_ms + still_down) as f64 / 1000.0,
            bound_s: bound_ms as f64 / 1000.0,
            lease_ops: self.lease_ops,
            coordinator_events: self.events,
            coordinator_cpu_s: self.cpu.as_secs_f64(),
            state_bytes: state.put_bytes,
            state_writes: state.put,
            committed_classes: self.committed.len() as u64,
            images: (self.committed.len() * self.scenario.ipc) as u64,
            output_requests: self.out_store.requests(),
            state_requests: state,
            preemptions: self.preemptions,
            crashes: self.crashes,
            restarts: self.restarts,
            peak_rss_bytes: peak_rss_bytes(),
            wall_s: wall.as_secs_f64(),
        })
    }
}
