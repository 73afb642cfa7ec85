//! The cluster simulator (`mgd3_tests::sim`, the `simulate` binary) at toy sizes: it drives the
//! real scheduler, job store and commit rules to the job's end through preemption, crashes and
//! a coordinator restart, and the costs it measures behave as the design says.

use mgd3_tests::sim::{Dataset, Preemption, Scenario, fluid_bound_ms, run};

/// Every class is committed exactly once (the simulator fails the run otherwise) whatever
/// happens to the workers and the coordinator.
#[tokio::test]
async fn a_simulated_cluster_commits_every_class_once_through_preemption_crashes_and_a_restart() {
    let mut s = Scenario::new(Dataset::Uniform { classes: 120, images: 300 }, 12);
    s.preemption = Some(Preemption { share: 0.25, every_s: 60.0 });
    s.crash_mtbf_h = 0.05;
    s.coordinator_restarts = 1;
    s.requeue_s = 30.0;
    let o = run(s, "toy").await.unwrap();
    assert!(o.preemptions > 0 && o.crashes > 0 && o.restarts == 1, "{o:?}");
    assert_eq!((o.committed_classes, o.images), (120, 120 * 50));
    assert!(o.ratio() >= 1.0 && o.wasted_gpu_s > 0.0, "{o:?}");
    // Workers away are capacity the scheduler never had: counted apart.
    assert!(o.away_gpu_s > 0.0 && o.ratio_on_present_gpus() < o.ratio(), "{o:?}");
    // No schedule beats the work divided at will over the GPUs there; this one did not either.
    assert!(o.bound_ratio() > 1.0 && o.bound_s <= o.makespan_s, "{o:?}");
}

/// The fluid bound: the first time the GPUs there can have run the work. Two GPUs and 10 s of
/// work: 5 s; one of them away from 1 s to 3 s adds 1 s; away from 1 s for good, the other one
/// runs the 8 s left alone: 9 s.
#[test]
fn the_fluid_bound_is_when_the_gpus_there_can_have_run_the_work() {
    assert_eq!(fluid_bound_ms(2, &[], 10_000), 5_000);
    assert_eq!(fluid_bound_ms(2, &[(1_000, 3_000)], 10_000), 6_000);
    assert_eq!(fluid_bound_ms(2, &[(1_000, u64::MAX)], 10_000), 9_000);
    assert_eq!(fluid_bound_ms(3, &[(0, 500), (0, 500), (0, 500)], 3_000), 1_500);
}

/// What persisting an event costs does not grow with the job (one whole `state.json` per flush
/// did: 55 KB per committed class at ImageNet-21K), and the tail of a job without stragglers
/// stays short: shards taper to one class as the work runs out.
#[tokio::test]
async fn state_bytes_per_class_stay_flat_and_the_tail_short_as_the_job_grows() {
    let mut outcomes = Vec::new();
    for (classes, workers) in [(100, 10), (3000, 300)] {
        let mut s = Scenario::new(Dataset::Uniform { classes, images: 600 }, workers);
        s.straggler_share = 0.0;
        outcomes.push(run(s, format!("{classes} classes")).await.unwrap());
    }
    let (small, big) = (&outcomes[0], &outcomes[1]);
    assert!(
        big.state_bytes_per_class() < 1.5 * small.state_bytes_per_class(),
        "{} bytes per class at 3,000 classes against {} at 100",
        big.state_bytes_per_class(),
        small.state_bytes_per_class()
    );
    assert!(big.state_bytes_per_class() < 1000.0, "{}", big.state_bytes_per_class());
    // The ideal is at full DiT calls: the one-class shards of the last rounds (IPC 50 fills
    // 100 of 256 rows) cost about 2 % of it, the last round's granularity the rest.
    for o in &outcomes {
        assert!(o.ratio() < 1.10, "{}: makespan / ideal {}", o.name, o.ratio());
    }
}

/// A worker has one poll loop: a heartbeat while it holds a lease, at once when a shard ends.
/// The simulator once started another loop at every shard's end, so one worker of 200 shards
/// made about 50 lease operations per virtual second instead of one per heartbeat, and the
/// "lease ops/s" and "CPU per event" columns measured those extra polls.
#[tokio::test]
async fn a_worker_polls_once_a_heartbeat_however_many_shards_it_runs() {
    let mut s = Scenario::new(Dataset::Uniform { classes: 200, images: 100 }, 1);
    s.straggler_share = 0.0;
    s.heartbeat_ms = 2000;
    let o = run(s, "one worker").await.unwrap();
    // Registration, one poll a heartbeat, and per shard its grant poll and its completion.
    let heartbeats = o.makespan_s * 1000.0 / 2000.0;
    let most = 1.0 + heartbeats + 2.0 * o.shards as f64 + 5.0;
    assert!(
        o.lease_ops as f64 <= most,
        "{} lease operations in {} s of {} shards: at most {most}",
        o.lease_ops,
        o.makespan_s,
        o.shards
    );
    assert!(o.lease_ops as f64 >= heartbeats, "{} lease operations in {} s", o.lease_ops, o.makespan_s);
}
