//! Every object key the system writes, in one place (see the README's storage layout):
//!
//! ```text
//! <out>/jobs/<job>/job.json                    resolved spec + fingerprint, written once at submit
//! <out>/jobs/<job>/state.json                  coordinator's durable view of the job (cancelled, paused,
//!                                              exclusions, finish; shard count)
//! <out>/jobs/<job>/state/shards/<i>.json       one shard's attempts, last error and lease (absent: never leased)
//! <out>/jobs/<job>/forgotten.json              `coordinator forget` left the outputs here (no job.json)
//! <out>/jobs/<job>/staging/<attempt>/<wnid>/   one attempt's files before commit
//! <out>/jobs/<job>/shards/<wnid>.json          commit marker (create-only), lists sha256 of each file
//! <out>/jobs/<job>/modes/<wnid>.npy            IPC × C×h×w centroids
//! <out>/jobs/<job>/dataset/<wnid>/<j>.png      the distilled ImageFolder
//! <out>/jobs/<job>/contact_sheets/<wnid>.png   real images, decoded modes, samples (for people)
//! <out>/jobs/<job>/contact_sheets/<wnid>.json  the sheet's record: class, attempt, sha256 (written after it)
//! <out>/jobs/<job>/manifest.json               merged manifest, written when every shard is done
//! ```

/// Keys (relative to a store location) of one job.
#[derive(Clone, Debug)]
pub struct JobKeys {
    root: String,
}

impl JobKeys {
    /// The keys of job `job_id`, under `jobs/<job_id>`.
    pub fn new(job_id: &str) -> Self {
        JobKeys { root: format!("jobs/{job_id}") }
    }

    /// Prefix under which all jobs live.
    pub const JOBS: &'static str = "jobs";

    /// `jobs/<job>`, the prefix of every key of the job.
    pub fn root(&self) -> &str {
        &self.root
    }
    /// `jobs/<job>/job.json`: the resolved spec and fingerprint, written once at submit.
    pub fn job_json(&self) -> String {
        format!("{}/job.json", self.root)
    }
    /// `jobs/<job>/state.json`: the coordinator's durable view of the job.
    pub fn state_json(&self) -> String {
        format!("{}/state.json", self.root)
    }
    /// `jobs/<job>/state/shards`: the prefix of the per-shard state records.
    pub fn shard_records(&self) -> String {
        format!("{}/state/shards", self.root)
    }
    /// `jobs/<job>/state/shards/<index>.json`: shard `index`'s state (attempts, last error,
    /// lease), rewritten when it changes; absent while the shard was never leased.
    pub fn shard_record(&self, index: usize) -> String {
        format!("{}/state/shards/{index}.json", self.root)
    }
    /// `jobs/<job>/coordinator.json` in the job's output: which coordinator runs the job now (a
    /// claim renewed at its lock's heartbeat), so that a coordinator of another store whose job
    /// writes to the same output does not distil it a second time.
    pub fn claim(&self) -> String {
        format!("{}/coordinator.json", self.root)
    }
    /// `jobs/<job>/forgotten.json`: written by `coordinator forget` where the job's outputs stay
    /// in its folder, so that the folder is not taken for a job whose `job.json` was lost.
    pub fn forgotten_json(&self) -> String {
        format!("{}/forgotten.json", self.root)
    }
    /// `jobs/<job>/staging/<attempt>`: the files of one attempt before commit.
    pub fn staging(&self, attempt_id: &str) -> String {
        format!("{}/staging/{attempt_id}", self.root)
    }
    /// `jobs/<job>/staging/<attempt>/<wnid>/<file>`: one staged file of a class.
    pub fn staging_file(&self, attempt_id: &str, wnid: &str, file: &str) -> String {
        format!("{}/staging/{attempt_id}/{wnid}/{file}", self.root)
    }
    /// `jobs/<job>/shards/<wnid>.json`: the class's commit marker (written create-only).
    pub fn marker(&self, wnid: &str) -> String {
        format!("{}/shards/{wnid}.json", self.root)
    }
    /// `jobs/<job>/shards`: the prefix of every commit marker.
    pub fn markers(&self) -> String {
        format!("{}/shards", self.root)
    }
    /// `jobs/<job>/modes/<wnid>.npy`: the class's published k-means modes.
    pub fn modes(&self, wnid: &str) -> String {
        format!("{}/modes/{wnid}.npy", self.root)
    }
    /// `jobs/<job>/dataset/<wnid>/<index>.png`: distilled image `index` of a class.
    pub fn dataset_image(&self, wnid: &str, index: usize) -> String {
        format!("{}/dataset/{wnid}/{index}.png", self.root)
    }
    /// Real images, decoded modes and samples of a class side by side (not part of the dataset).
    pub fn contact_sheet(&self, wnid: &str) -> String {
        format!("{}/{}", self.root, Self::contact_sheet_in_job(wnid))
    }
    /// `contact_sheets/<wnid>.png`: [`JobKeys::contact_sheet`] relative to the job's folder.
    pub fn contact_sheet_in_job(wnid: &str) -> String {
        format!("contact_sheets/{wnid}.png")
    }
    /// `contact_sheets/<wnid>.json`: [`JobKeys::contact_sheet_record`] relative to the job's folder.
    pub fn contact_sheet_record_in_job(wnid: &str) -> String {
        format!("contact_sheets/{wnid}.json")
    }
    /// `jobs/<job>/contact_sheets/<wnid>.json`: the contact sheet's record
    /// ([`crate::manifest::SheetRecord`]), written after the sheet; what `report` and `verify`
    /// check the sheet against.
    pub fn contact_sheet_record(&self, wnid: &str) -> String {
        format!("{}/{}", self.root, Self::contact_sheet_record_in_job(wnid))
    }
    /// `jobs/<job>/manifest.json`: the merged manifest, written when every class is committed.
    pub fn manifest(&self) -> String {
        format!("{}/manifest.json", self.root)
    }
}

/// File name of image j inside a class folder.
pub fn image_name(index: usize) -> String {
    format!("{index}.png")
}

/// File name of the modes inside a staging class folder.
pub const MODES_FILE: &str = "modes.npy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let k = JobKeys::new("nette-0123");
        assert_eq!(k.job_json(), "jobs/nette-0123/job.json");
        assert_eq!(k.marker("n01"), "jobs/nette-0123/shards/n01.json");
        assert_eq!(k.staging_file("a1", "n01", &image_name(3)), "jobs/nette-0123/staging/a1/n01/3.png");
        assert_eq!(k.dataset_image("n01", 9), "jobs/nette-0123/dataset/n01/9.png");
        assert_eq!(k.modes("n01"), "jobs/nette-0123/modes/n01.npy");
        assert_eq!(k.manifest(), "jobs/nette-0123/manifest.json");
    }
}
