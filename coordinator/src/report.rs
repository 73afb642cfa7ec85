//! `coordinator report`: a static HTML report of a job that a person opens in a browser — from a
//! local folder or straight from object storage, with no server and no network fetch — plus
//! `overview.png`, one sample per class.
//!
//! Everything comes from the job's output folder (`<out>/jobs/<job>`): the commit markers (per
//! class: worker, attempt, timings, cache hit, quality numbers, the 2-D embedding), the manifest
//! (spec, model fingerprints, totals) and, when the output is also the coordinator's store,
//! `state.json` (attempts and errors per shard). Pages: `index.html` (the job, the stage times,
//! workers, failures, a table of every class with lazily loaded thumbnails) and
//! `classes/<n>.html` per class (its numbers, the contact sheet cut into labelled tiles and
//! wrapped ten columns to a row — real image, decoded mode and sample j under one another — and an
//! SVG plot of real latents, modes and samples). Thousands of classes stay light: the index holds
//! numbers and lazy thumbnails only, each class has its own page.
//!
//! Numbers appear as text rounded for reading and, in `data-value`, exactly as the manifest and
//! markers hold them (the browser test compares the two).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use futures::{StreamExt, TryStreamExt};
use mgd3_common::commit::{self, CommitError, SheetCheck};
use mgd3_common::manifest::{ClassMarker, JobManifest, QualityConcern, StageSeconds, band};
use mgd3_common::sheet::SheetLayout;
use mgd3_common::store::{Location, get_optional, is_not_found};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use thiserror::Error;

use crate::scheduler::{PersistedJob, ShardState};

/// Why a report could not be made.
#[derive(Debug, Error)]
pub enum ReportError {
    /// A store call failed.
    #[error("`{url}`: cannot {action} `{key}`")]
    Store {
        /// The location's URL.
        url: String,
        /// What was being done.
        action: &'static str,
        /// The key.
        key: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A record of the job does not parse.
    #[error("`{url}`: `{key}` is not a valid {what}")]
    Parse {
        /// The location's URL.
        url: String,
        /// The key.
        key: String,
        /// What it should be.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The folder holds commit markers of another job only.
    #[error(
        "`{url}` is the output folder of job `{found}`, not of `{job}`: give that job id, or the folder `<output>/jobs/{job}`"
    )]
    OtherJob {
        /// The job folder.
        url: String,
        /// The job id asked for.
        job: String,
        /// The job whose markers it holds.
        found: String,
    },
    /// The local folder does not exist.
    #[error(
        "`{url}` does not exist: give the job's output folder `<output>/jobs/<job>` (`coordinator status JOB` prints it)"
    )]
    NoFolder {
        /// The folder.
        url: String,
    },
    /// The folder holds no committed class of the job.
    #[error(
        "`{url}` holds no commit marker of job `{job}` (no `shards/*.json`): is this the job's output folder `<output>/jobs/<job>`, and has a class been committed yet?"
    )]
    NothingCommitted {
        /// The job folder.
        url: String,
        /// The job id.
        job: String,
    },
    /// A committed image the report shows is missing, or is not the bytes its commit marker
    /// records: the report would show something the job did not make.
    #[error(
        "class `{wnid}`: `{key}` {}: `coordinator verify` names every such file and `coordinator resume` puts the \
         job's own bytes back",
        if *missing { "is missing" } else { "is not the image its commit marker records (changed since its commit)" }
    )]
    NotCommitted {
        /// The class.
        wnid: String,
        /// The image's key in the job folder.
        key: String,
        /// Missing (rather than changed).
        missing: bool,
    },
    /// A sweep's record gives one of its jobs other settings than the job's own record (the
    /// record edited, or another sweep's): its numbers would be shown under the wrong settings.
    #[error(
        "sweep `{sweep}`: its record does not match job `{job}`'s own ({}); the record was edited or belongs \
         elsewhere: submitting the sweep's spec again writes it anew",
        differing.join("; ")
    )]
    SweepRecordMismatch {
        /// The sweep.
        sweep: String,
        /// The job whose record differs.
        job: String,
        /// What differs, as a person reads it.
        differing: Vec<String>,
    },
    /// What went wrong with one variant of a sweep (its report, its samples in the grid).
    #[error("sweep `{sweep}`, variant {number} ({label}, job `{job}`)")]
    InVariant {
        /// The sweep.
        sweep: String,
        /// The variant's number on the comparison page (from 1).
        number: usize,
        /// Its settings, as the comparison page labels it.
        label: String,
        /// Its job.
        job: String,
        /// What went wrong.
        #[source]
        source: Box<ReportError>,
    },
    /// A class's files could not be checked against its records.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A sample image could not be read for the overview.
    #[error("class `{wnid}`: `{key}` is not a readable image")]
    Image {
        /// The class.
        wnid: String,
        /// The image's key.
        key: String,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
}

/// What a report was made of.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportSummary {
    /// Classes with a page.
    pub classes: usize,
    /// Where `index.html` is.
    pub index: String,
    /// The classes outside the quality band (`manifest::band`), in class order, with why: what
    /// the report's Warnings list, for the console too.
    pub warnings: Vec<(String, Vec<QualityConcern>)>,
    /// Contact sheets not shown because they are not what the class's committing attempt
    /// recorded (another class's, changed, without their record): class and why, in class order.
    pub sheets_left_out: Vec<(String, commit::FileProblem)>,
}

/// A class's contact sheet as the report shows it.
#[derive(Clone, Debug)]
enum Sheet {
    /// Shown: its size in pixels; `checked` when its record vouches for it (an earlier
    /// version's sheet has none).
    Shown {
        /// Width and height in pixels.
        size: (u32, u32),
        /// Checked against its record.
        checked: bool,
    },
    /// Left out: the file (relative to the job folder) and why.
    LeftOut(String, String),
}

impl ReportSummary {
    /// One line per flagged class (at most `shown`, then a count), for a console or a log.
    pub fn warning_lines(&self, shown: usize) -> Vec<String> {
        let mut lines: Vec<String> = self
            .warnings
            .iter()
            .take(shown)
            .map(|(wnid, concerns)| {
                format!("class `{wnid}`: {}", concerns.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; "))
            })
            .collect();
        if self.warnings.len() > shown {
            lines.push(format!("and {} more classes (the report lists them)", self.warnings.len() - shown));
        }
        lines
    }
}

/// The classes of `records` whose quality falls outside the band: (position, marker, concerns).
fn flagged(records: &JobRecords) -> Vec<(usize, &ClassMarker, Vec<QualityConcern>)> {
    let ipc = records.job.as_ref().map(|j| j.spec.ipc);
    records
        .markers
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let concerns = m.quality.as_ref()?.concerns(ipc.unwrap_or(m.images.len()));
            (!concerns.is_empty()).then_some((i, m, concerns))
        })
        .collect()
}

/// A job's records as its output folder holds them.
#[derive(Debug)]
pub struct JobRecords {
    /// The job id.
    pub job_id: String,
    /// The output folder `<out>/jobs/<job>`.
    pub url: String,
    /// `manifest.json`, once the job succeeded.
    pub manifest: Option<JobManifest>,
    /// Every committed class's marker, in the job's class order (by class index).
    pub markers: Vec<ClassMarker>,
    /// `state.json`, when the output is also the coordinator's store.
    pub state: Option<PersistedJob>,
    /// `job.json` (every class and shard of the job), when the output is also the store.
    pub job: Option<mgd3_common::job::ResolvedJob>,
}

pub(crate) fn store_error(
    dir: &Location,
    action: &'static str,
    key: &str,
) -> impl FnOnce(object_store::Error) -> ReportError {
    let (url, key) = (dir.url.clone(), key.to_owned());
    move |source| ReportError::Store { url, action, key, source }
}

/// Reads the job's manifest, markers and (when there) state from its output folder `dir`.
///
/// # Errors
/// [`ReportError::Store`] / [`ReportError::Parse`] for a record that cannot be read;
/// [`ReportError::NothingCommitted`] when there is no marker at all.
pub async fn read_records(dir: &Location, job_id: &str) -> Result<JobRecords, ReportError> {
    if dir.local_root.as_ref().is_some_and(|root| !root.exists()) {
        return Err(ReportError::NoFolder { url: dir.url.clone() });
    }
    let parse = |key: &str, what: &'static str| {
        let (url, key) = (dir.url.clone(), key.to_owned());
        move |source| ReportError::Parse { url, key, what, source }
    };
    let manifest = match get_optional(dir.store.as_ref(), &dir.key("manifest.json")).await {
        Ok(Some(bytes)) => Some(serde_json::from_slice(&bytes).map_err(parse("manifest.json", "job manifest"))?),
        Ok(None) => None,
        Err(e) => return Err(store_error(dir, "read", "manifest.json")(e)),
    };
    // `state.json` with the shard records beside it; a newer or unreadable one is left out.
    let state = match crate::jobstore::read_state_in(dir, "state.json", "state/shards").await {
        Ok(found) => found.map(|(state, _)| state),
        Err(crate::Error::ObjectStore { source, .. }) => return Err(store_error(dir, "read", "state.json")(source)),
        Err(_) => None,
    };
    let job = match get_optional(dir.store.as_ref(), &dir.key("job.json")).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
        Ok(None) => None,
        Err(e) => return Err(store_error(dir, "read", "job.json")(e)),
    };
    let prefix = dir.key("shards");
    let listed: Vec<_> = match dir.store.list(Some(&prefix)).try_collect().await {
        Ok(listed) => listed,
        Err(e) if is_not_found(&e) => Vec::new(),
        Err(e) => return Err(store_error(dir, "list", "shards/")(e)),
    };
    let mut markers = Vec::new();
    let mut other_job = None;
    for meta in listed {
        let Some(name) = meta.location.filename() else { continue };
        if !name.ends_with(".json") {
            continue;
        }
        let key = format!("shards/{name}");
        let bytes = mgd3_common::store::get_bytes(dir.store.as_ref(), &meta.location)
            .await
            .map_err(store_error(dir, "read", &key))?;
        let marker: ClassMarker = serde_json::from_slice(&bytes).map_err(parse(&key, "commit marker"))?;
        // A marker of another job (an earlier run's leftovers) is no commit of this one.
        let current = manifest.as_ref().is_none_or(|m: &JobManifest| m.fingerprint == marker.fingerprint);
        if marker.job_id == job_id && current {
            markers.push(marker);
        } else if marker.job_id != job_id {
            other_job = Some(marker.job_id);
        }
    }
    // A job that failed before committing a class still has its failures to show: where the
    // report would be looked at first to see why. Anything else without a commit is refused.
    let failed =
        state.as_ref().is_some_and(|s: &PersistedJob| s.shards.iter().any(|sh| sh.state == ShardState::Failed));
    let own_records = job.as_ref().is_some_and(|j: &mgd3_common::job::ResolvedJob| j.job_id == job_id);
    if markers.is_empty() && !(failed && own_records && other_job.is_none()) {
        return Err(match other_job {
            Some(found) => ReportError::OtherJob { url: dir.url.clone(), job: job_id.to_owned(), found },
            None => ReportError::NothingCommitted { url: dir.url.clone(), job: job_id.to_owned() },
        });
    }
    markers.sort_by_key(|m| m.class_index);
    let job = job.filter(|j: &mgd3_common::job::ResolvedJob| j.job_id == job_id);
    Ok(JobRecords { job_id: job_id.to_owned(), url: dir.url.clone(), manifest, markers, state, job })
}

/// Writes the report of the job in `dir` to `target` (`index.html`, `classes/*.html`,
/// `overview.png`). When `copy_sheets` is set the contact sheets are copied to
/// `target/contact_sheets/` (a report outside the job folder); otherwise pages refer to the job
/// folder's own (`target` is `dir/report`).
///
/// # Errors
/// See [`read_records`]; [`ReportError::Store`] for a file that cannot be read or written,
/// [`ReportError::Image`] for a sample that does not decode.
pub async fn write_report(
    dir: &Location,
    job_id: &str,
    target: &Location,
    copy_sheets: bool,
) -> Result<ReportSummary, ReportError> {
    let records = read_records(dir, job_id).await?;
    let mut sheets = BTreeMap::new();
    let mut sheets_left_out = Vec::new();
    // Each sheet is read whole and checked by its sha256 (by its size alone, another class's
    // sheet cut to the same size was shown), a few at a time, in class order.
    let mut checked = futures::stream::iter(&records.markers)
        .map(|marker| async move { (marker, commit::check_sheet(dir, marker).await) })
        .buffered(SHEET_READS);
    while let Some((marker, check)) = checked.next().await {
        let mut left_out = |problem: commit::FileProblem| {
            sheets.insert(marker.wnid.clone(), Sheet::LeftOut(problem.file.clone(), problem.problem.clone()));
            sheets_left_out.push((marker.wnid.clone(), problem));
        };
        let found = match check {
            Ok(SheetCheck::Absent) => None,
            Ok(SheetCheck::Wrong(problem) | SheetCheck::Incomplete(problem)) => {
                left_out(problem);
                None
            }
            Ok(SheetCheck::Found(found)) => {
                let size = image::ImageReader::new(std::io::Cursor::new(&found.bytes[..]))
                    .with_guessed_format()
                    .ok()
                    .and_then(|r| r.into_dimensions().ok());
                match size {
                    Some(size) => Some((found, size)),
                    None => {
                        left_out(commit::FileProblem {
                            file: mgd3_common::layout::JobKeys::contact_sheet_in_job(&marker.wnid),
                            problem: "is not an image the report can read".into(),
                        });
                        None
                    }
                }
            }
            Err(error) => return Err(error.into()),
        };
        let Some((found, size)) = found else {
            // An earlier report's copy in the target is no longer what the class's sheet is.
            if copy_sheets {
                let copy = format!("contact_sheets/{}.png", marker.wnid);
                match target.store.delete(&target.key(&copy)).await {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(store_error(target, "delete", &copy)(e)),
                }
            }
            continue;
        };
        if copy_sheets {
            let copy = format!("contact_sheets/{}", marker.wnid);
            target
                .store
                .put(&target.key(&format!("{copy}.png")), PutPayload::from(found.bytes))
                .await
                .map_err(store_error(target, "write", &copy))?;
        }
        sheets.insert(marker.wnid.clone(), Sheet::Shown { size, checked: found.record.is_some() });
    }
    let overview = overview_png(dir, &records).await?;
    put(target, "overview.png", overview).await?;
    let assets = if copy_sheets { "../" } else { "../../" };
    for (i, marker) in records.markers.iter().enumerate() {
        let page = class_page(&records, i, sheets.get(&marker.wnid), assets);
        put(target, &format!("classes/{}", class_file(i)), page.into_bytes()).await?;
    }
    put(target, "index.html", index_page(&records, &sheets, if copy_sheets { "" } else { "../" }).into_bytes()).await?;
    let warnings = flagged(&records).into_iter().map(|(_, m, concerns)| (m.wnid.clone(), concerns)).collect();
    Ok(ReportSummary {
        classes: records.markers.len(),
        index: target.child("index.html").url,
        warnings,
        sheets_left_out,
    })
}

pub(crate) async fn put(target: &Location, key: &str, bytes: Vec<u8>) -> Result<(), ReportError> {
    target.store.put(&target.key(key), PutPayload::from(bytes)).await.map_err(store_error(target, "write", key))?;
    Ok(())
}

/// The class page's file name: by position, since class names may hold any character.
fn class_file(index: usize) -> String {
    format!("{index:05}.html")
}

/// Side of one overview tile (pixels).
const TILE: u32 = 96;

/// One tile per class (its sample 0), row by row in class order, on a square-ish grid.
async fn overview_png(dir: &Location, records: &JobRecords) -> Result<Vec<u8>, ReportError> {
    use mgd3_common::sheet::{GLYPH, draw_text, fit_text};
    // Each cell: the class's first sample, its folder name under it; a title band on top.
    let caption = GLYPH + 6;
    let (cell_w, cell_h) = (TILE + 2, TILE + caption + 2);
    let title_h = GLYPH + 10;
    let n = records.markers.len() as u32;
    let columns = (f64::from(n).sqrt().ceil() as u32).max(1);
    let rows = n.div_ceil(columns);
    let title = "first sample of each class";
    let width = (columns * cell_w + 2).max(title.len() as u32 * GLYPH + 12);
    let mut canvas = image::RgbImage::from_pixel(width, title_h + rows * cell_h + 2, image::Rgb([255; 3]));
    draw_text(&mut canvas, 6, 5, title, 1, [40, 40, 40]);
    for (i, marker) in records.markers.iter().enumerate() {
        let Some(first) = marker.images.first() else { continue };
        let decoded = committed_image(dir, marker, first).await?;
        let tile = image::imageops::resize(&decoded, TILE, TILE, image::imageops::FilterType::Triangle);
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let (x, y) = (2 + col * cell_w, title_h + 2 + row * cell_h);
        image::imageops::replace(&mut canvas, &tile, i64::from(x), i64::from(y));
        draw_text(&mut canvas, x, y + TILE + 3, &fit_text(&marker.wnid, TILE, 1), 1, [60, 60, 60]);
    }
    let mut png = std::io::Cursor::new(Vec::new());
    canvas.write_to(&mut png, image::ImageFormat::Png).expect("PNG encoding into memory");
    Ok(png.into_inner())
}

/// The bytes of `image`, one of `marker`'s committed images in the job folder `dir`, decoded:
/// what a report shows of it (the overview's tile, a sweep's grid) is checked against the sha256
/// the commit recorded, as `export` does, so a report never shows a file the job did not make.
///
/// # Errors
/// [`ReportError::NotCommitted`] for a missing or changed file, [`ReportError::Image`] for one
/// that does not decode, [`ReportError::Store`] when it cannot be read.
pub(crate) async fn committed_image(
    dir: &Location,
    marker: &ClassMarker,
    image: &mgd3_common::manifest::FileDigest,
) -> Result<image::RgbImage, ReportError> {
    let key = format!("dataset/{}/{}", marker.wnid, image.name);
    let not_committed = |missing| ReportError::NotCommitted { wnid: marker.wnid.clone(), key: key.clone(), missing };
    let bytes = match get_optional(dir.store.as_ref(), &dir.key(&key)).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(not_committed(true)),
        Err(e) => return Err(store_error(dir, "read", &key)(e)),
    };
    if mgd3_common::sha256_hex(&bytes) != image.sha256 {
        return Err(not_committed(false));
    }
    Ok(image::load_from_memory(&bytes)
        .map_err(|source| ReportError::Image { wnid: marker.wnid.clone(), key: key.clone(), source })?
        .to_rgb8())
}

/// Text for HTML element content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path segment of a relative URL (a class folder may be `x%y` or `a b`).
pub(crate) fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, &SEGMENT).to_string()
}

/// Everything but unreserved characters is encoded in a path segment.
const SEGMENT: percent_encoding::AsciiSet =
    percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// A number cell: rounded text, the exact value in `data-value`.
fn number(field: &str, wnid: &str, value: f64, decimals: usize) -> String {
    format!(
        "<td class=\"num\" data-field=\"{field}\" data-wnid=\"{}\" data-value=\"{value}\">{value:.decimals$}</td>",
        escape(wnid)
    )
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse}\
td,th{padding:3px 8px;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:middle}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}\
.bar{display:inline-block;height:10px;background:#4a7bd0}.thumb{height:40px;image-rendering:pixelated}\
.block{display:grid;gap:4px;margin:10px 0 18px}.tile{image-rendering:pixelated;border:1px solid #ccc}\
.label{font-size:12px;color:#555;align-self:center}pre{background:#f6f6f6;padding:10px;overflow:auto}\
.fail{color:#a00}nav a{margin-right:14px}.scroll{overflow-x:auto;max-width:100%}\
td code{word-break:break-all}img{max-width:100%}svg{max-width:100%;height:auto}.warn{color:#8a4b00}\
.warning{background:#fff4e0;border-left:4px solid #e08a00;padding:6px 10px;margin:8px 0}\
@media (max-width:600px){body{margin:8px}h1{font-size:18px;word-break:break-all}}";

/// Says, on the page and on the console, which images did not load (a report copied without its
/// job folder, a class whose contact sheet was never written): the images loaded so far and the
/// contact sheets the tiles cut up.
const CHECK_IMAGES: &str = "<p id=\"broken\" class=\"fail\" hidden></p><script>\
addEventListener('load',function(){var bad=[];function note(u){bad.push(u);console.error('mgd3 report: image not found: '+u);\
var p=document.getElementById('broken');p.hidden=false;p.textContent=bad.length+' image(s) not found, e.g. '+bad[0];}\
document.querySelectorAll('img').forEach(function(i){if(i.complete&&i.naturalWidth===0)note(i.getAttribute('src'));});\
var seen={};document.querySelectorAll('[data-sheet]').forEach(function(t){var u=t.getAttribute('data-sheet');\
if(seen[u])return;seen[u]=1;var i=new Image();i.onerror=function(){note(u);};i.src=u;});});</script>";

pub(crate) fn page(title: &str, body: &str) -> String {
    // Every table scrolls in its own box, so that a phone-width window never scrolls the page
    // sideways.
    let body = body.replace("<table", "<div class=\"scroll\"><table").replace("</table>", "</table></div>");
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body>\n{body}{CHECK_IMAGES}</body></html>\n",
        escape(title)
    )
}

fn seconds(total: f64) -> String {
    if total >= 3600.0 {
        format!("{:.0} h {:02.0} min", (total / 3600.0).floor(), (total % 3600.0) / 60.0)
    } else if total >= 60.0 {
        format!("{:.0} min {:02.0} s", (total / 60.0).floor(), total % 60.0)
    } else {
        format!("{total:.1} s")
    }
}

fn stages(timings: &StageSeconds) -> [(&'static str, f64); 7] {
    [
        ("decode", timings.decode),
        ("encode", timings.encode),
        ("kmeans", timings.kmeans),
        ("dit", timings.dit),
        ("guidance", timings.guidance),
        ("vae_decode", timings.vae_decode),
        ("png", timings.png),
    ]
}

fn stage_table(timings: &StageSeconds) -> String {
    let total: f64 = stages(timings).iter().map(|(_, s)| s).sum();
    let mut html = String::from(
        "<table><tr><th>stage</th><th class=\"num\">seconds</th><th class=\"num\">share</th><th></th></tr>",
    );
    for (name, value) in stages(timings) {
        let share = if total > 0.0 { value / total } else { 0.0 };
        let _ = write!(
            html,
            "<tr><td>{name}</td><td class=\"num\" data-field=\"stage_{name}\" data-value=\"{value}\">{value:.2}</td><td class=\"num\">{:.0} %</td><td><span class=\"bar\" style=\"width:{:.0}px\"></span></td></tr>",
            share * 100.0,
            share * 300.0
        );
    }
    html.push_str("</table>");
    html
}

/// [`state_phrase`] of the job folder `dir` (`<out>/jobs/<job>`), read from its `manifest.json`
/// and `state.json` alone (a folder whose records cannot be read says "not finished").
pub(crate) async fn folder_state(dir: &Location) -> &'static str {
    let manifest = matches!(get_optional(dir.store.as_ref(), &dir.key("manifest.json")).await, Ok(Some(_)));
    let state = crate::jobstore::read_state_in(dir, "state.json", "state/shards").await.ok().flatten().map(|(s, _)| s);
    state_phrase(manifest, state.as_ref())
}

/// The job's state as its folder tells it: succeeded with its manifest; else, from `state.json`
/// when there (the output is the coordinator's store), cancelled, paused, or failed (a finish
/// recorded with a shard out of attempts); else not finished.
fn state_phrase(manifest: bool, state: Option<&crate::scheduler::PersistedJob>) -> &'static str {
    match state {
        _ if manifest => "succeeded",
        Some(state) if state.cancelled => "cancelled",
        Some(state) if state.paused.is_some() => "paused",
        Some(state)
            if state.finished_unix_ms.is_some()
                && state.shards.iter().any(|s| s.state == crate::scheduler::ShardState::Failed) =>
        {
            "failed"
        }
        _ => "not finished",
    }
}

fn index_page(records: &JobRecords, shown: &BTreeMap<String, Sheet>, sheets: &str) -> String {
    let job = &records.job_id;
    let markers = &records.markers;
    let images: usize = markers.iter().map(|m| m.images.len()).sum();
    let mut body = format!("<h1>mgd3 job <code>{}</code></h1>\n", escape(job));
    let _ = write!(
        body,
        "<p class=\"muted\">{} · report of the output folder <code>{}</code></p>",
        env!("CARGO_PKG_NAME"),
        escape(&records.url)
    );
    body.push_str("<p><img src=\"overview.png\" alt=\"one sample per class\" style=\"max-width:100%;image-rendering:pixelated\"></p>");
    // The job.
    body.push_str("<h2>Job</h2><table>");
    let state = state_phrase(records.manifest.is_some(), records.state.as_ref());
    let _ = write!(body, "<tr><th>state</th><td id=\"state\">{state}</td></tr>");
    let of = records.job.as_ref().map(|j| format!(" of {}", j.classes.len())).unwrap_or_default();
    let _ = write!(
        body,
        "<tr><th>classes committed</th><td class=\"num\" id=\"classes\" data-value=\"{}\">{}{of}</td></tr><tr><th>images</th><td class=\"num\" id=\"images\" data-value=\"{images}\">{images}</td></tr>",
        markers.len(),
        markers.len()
    );
    let cache_hits = markers.iter().filter(|m| m.latent_cache_hit).count();
    let _ = write!(
        body,
        "<tr><th>latent cache hits</th><td class=\"num\" id=\"cache_hits\" data-value=\"{cache_hits}\">{cache_hits} of {}</td></tr>",
        markers.len()
    );
    // Classes whose latents came from the cache had their real images encoded by an earlier job.
    let real: u64 = markers.iter().map(|m| m.real_images).sum();
    let encoded: u64 = markers.iter().filter(|m| !m.latent_cache_hit).map(|m| m.real_images).sum();
    let _ = write!(
        body,
        "<tr><th>real images clustered</th><td class=\"num\" id=\"real_images\" data-value=\"{real}\">{real}</td></tr>\
         <tr><th>real images encoded by this job</th><td class=\"num\" id=\"real_encoded\" data-value=\"{encoded}\">{encoded}{}</td></tr>",
        if cache_hits > 0 {
            format!(" (the latents of {cache_hits} class(es) came from the cache)")
        } else {
            String::new()
        }
    );
    if let Some(manifest) = &records.manifest {
        let _ = write!(body, "<tr><th>fingerprint</th><td><code>{}</code></td></tr>", escape(&manifest.fingerprint));
        for (role, fingerprint) in &manifest.model_fingerprints {
            let _ =
                write!(body, "<tr><th>model {}</th><td><code>{}</code></td></tr>", escape(role), escape(fingerprint));
        }
        let wall = manifest.finished_unix_ms.saturating_sub(manifest.created_unix_ms) as f64 / 1000.0;
        let _ = write!(body, "<tr><th>submitted → finished</th><td>{}</td></tr>", seconds(wall));
        if let Some(repaired) = manifest.repaired_unix_ms {
            let after = repaired.saturating_sub(manifest.finished_unix_ms) as f64 / 1000.0;
            let _ = write!(
                body,
                "<tr><th>repaired</th><td id=\"repaired\">{} after it finished (classes distilled again: lost files put back, or changed data accepted)</td></tr>",
                seconds(after)
            );
        }
        if wall > 0.0 {
            let rate = manifest.images as f64 / wall;
            let _ = write!(
                body,
                "<tr><th>throughput</th><td class=\"num\" data-value=\"{rate}\">{rate:.2} images/s (submit to manifest, waits included)</td></tr>"
            );
        }
    }
    body.push_str("</table>");
    // Quality, averaged. How many real latents representativeness averages over: 50, or all of a
    // class's when it has fewer.
    fn neighbours(measured: &[&mgd3_common::manifest::ClassQuality]) -> String {
        let fewest = measured.iter().map(|q| q.neighbours).min().unwrap_or_default();
        let most = measured.iter().map(|q| q.neighbours).max().unwrap_or_default();
        if fewest == most {
            fewest.to_string()
        } else {
            format!("{fewest}–{most} (all of a class's when fewer than {most})")
        }
    }
    let measured: Vec<_> = markers.iter().filter_map(|m| m.quality.as_ref()).collect();
    if !measured.is_empty() {
        let mean = |f: fn(&mgd3_common::manifest::ClassQuality) -> f64| {
            measured.iter().map(|q| f(q)).sum::<f64>() / measured.len() as f64
        };
        let _ = write!(
            body,
            "<h2>Quality</h2><p>Mean over {} classes, in the scaled VAE latent space, divided by each class's real spread (the mean distance between two of its real latents): diversity <b id=\"mean_diversity\" data-value=\"{d}\">{d:.3}</b> (mean nearest-neighbour distance among a class's samples; higher is more diverse), representativeness <b id=\"mean_representativeness\" data-value=\"{r}\">{r:.3}</b> (mean distance of a sample to its {} nearest real latents; lower is more representative). Raw values per class are on its page.</p>",
            measured.len(),
            neighbours(&measured),
            d = mean(|q| q.diversity_normalised),
            r = mean(|q| q.representativeness_normalised)
        );
    }
    // Classes outside the quality band, each with what it usually means.
    let flagged = flagged(records);
    if !flagged.is_empty() {
        let _ = write!(
            body,
            "<h2 class=\"warn\">Warnings</h2><div class=\"warning\" id=\"warnings\" data-value=\"{}\"><p>{} of {} classes fall outside the band this report expects (representativeness ≤ {}, diversity ≥ {}, both ÷ the class's real spread):</p><ul>",
            flagged.len(),
            flagged.len(),
            markers.len(),
            band::REPRESENTATIVENESS_MAX,
            band::DIVERSITY_MIN
        );
        for (i, m, concerns) in flagged.iter().take(MAX_WARNINGS_LISTED) {
            let text: Vec<String> = concerns.iter().map(|c| escape(&c.to_string())).collect();
            let _ = write!(
                body,
                "<li><a href=\"classes/{}\">{}</a>: {}</li>",
                class_file(*i),
                escape(&m.wnid),
                text.join("; ")
            );
        }
        if flagged.len() > MAX_WARNINGS_LISTED {
            let _ = write!(body, "<li>and {} more (marked ⚠ below)</li>", flagged.len() - MAX_WARNINGS_LISTED);
        }
        body.push_str("</ul></div>");
    }
    // Contact sheets left out: not what the class's committing attempt wrote.
    let left_out: Vec<(usize, &ClassMarker, &str)> = markers
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match shown.get(&m.wnid) {
            Some(Sheet::LeftOut(_, problem)) => Some((i, m, problem.as_str())),
            _ => None,
        })
        .collect();
    if !left_out.is_empty() {
        let _ = write!(
            body,
            "<h2 class=\"warn\">Contact sheets left out</h2><div class=\"warning\" id=\"sheets_left_out\" data-value=\"{}\"><p>{} contact sheet(s) are not what the attempt that committed their class wrote, and are not shown (<code>coordinator verify</code> lists them, <code>coordinator resume</code> removes them):</p><ul>",
            left_out.len(),
            left_out.len()
        );
        for (i, m, problem) in left_out.iter().take(MAX_WARNINGS_LISTED) {
            let _ = write!(
                body,
                "<li><a href=\"classes/{}\">{}</a>: {}</li>",
                class_file(*i),
                escape(&m.wnid),
                escape(problem)
            );
        }
        if left_out.len() > MAX_WARNINGS_LISTED {
            let _ = write!(body, "<li>and {} more</li>", left_out.len() - MAX_WARNINGS_LISTED);
        }
        body.push_str("</ul></div>");
    }
    // Time.
    let mut total = StageSeconds::default();
    for m in markers {
        total.add(&m.timings);
    }
    body.push_str("<h2>Where the time went</h2><p class=\"muted\">Seconds summed over classes (a DiT batch shared by classes is split by their share of it).</p>");
    body.push_str(&stage_table(&total));
    // Workers.
    let mut workers: BTreeMap<&str, (usize, usize, f64)> = BTreeMap::new();
    for m in markers {
        let entry = workers.entry(&m.worker_id).or_default();
        entry.0 += 1;
        entry.1 += m.images.len();
        entry.2 += stages(&m.timings).iter().map(|(_, s)| s).sum::<f64>();
    }
    body.push_str("<h2>Workers</h2><table><tr><th>worker</th><th class=\"num\">classes</th><th class=\"num\">images</th><th class=\"num\">class seconds</th></tr>");
    for (worker, (classes, images, secs)) in &workers {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td class=\"num\">{classes}</td><td class=\"num\">{images}</td><td class=\"num\">{secs:.1}</td></tr>",
            escape(worker)
        );
    }
    body.push_str("</table>");
    // Failures and retries.
    body.push_str("<h2>Failures and retries</h2>");
    match &records.state {
        Some(state) => {
            let troubled: Vec<_> = state.shards.iter().enumerate().filter(|(_, s)| s.attempts > 1 || s.last_error.is_some() || s.state == ShardState::Failed || s.before_resume.is_some()).collect();
            let unfinished = state.shards.iter().filter(|s| !matches!(s.state, ShardState::Done { .. })).count();
            if troubled.is_empty() && unfinished == 0 {
                body.push_str("<p id=\"failures\" data-value=\"0\">Every shard succeeded at its first attempt.</p>");
            } else if troubled.is_empty() {
                let _ = write!(body, "<p id=\"failures\" data-value=\"0\">No failure so far; {unfinished} of {} shard(s) not finished.</p>", state.shards.len());
            } else {
                let _ = write!(body, "<table id=\"failures\" data-value=\"{}\"><tr><th class=\"num\">shard</th><th class=\"num\">attempts</th><th>state</th><th>class</th><th>last error</th></tr>", troubled.len());
                for (i, shard) in troubled {
                    let state = match shard.state {
                        ShardState::Done { .. } => "done",
                        ShardState::Failed => "failed",
                        ShardState::Pending => "pending",
                        ShardState::Leased { .. } => "running",
                    };
                    // The error of this run, else the one a resume moved into the shard's history.
                    let earlier = shard.before_resume.as_ref();
                    let (wnid, error) = match (&shard.last_error, earlier.and_then(|e| e.last_error.as_ref())) {
                        (Some(e), _) => (e.wnid.clone().unwrap_or_default(), e.error.clone()),
                        (None, Some(e)) => (e.wnid.clone().unwrap_or_default(), format!("before a resume: {}", e.error)),
                        (None, None) => Default::default(),
                    };
                    let attempts = match earlier {
                        Some(e) => format!("{} (+{} before resume)", shard.attempts, e.attempts),
                        None => shard.attempts.to_string(),
                    };
                    let _ = write!(body, "<tr><td class=\"num\">{i}</td><td class=\"num\">{attempts}</td><td class=\"{}\">{state}</td><td>{}</td><td>{}</td></tr>", if state == "failed" { "fail" } else { "" }, escape(&wnid), escape(&error));
                }
                body.push_str("</table>");
            }
        }
        None => body.push_str("<p class=\"muted\">Not recorded here: the job's state lives in the coordinator's store, not in this output folder (`coordinator status JOB` shows it).</p>"),
    }
    // Classes not committed yet.
    if let Some(job) = &records.job {
        let done: std::collections::HashSet<&str> = markers.iter().map(|m| m.wnid.as_str()).collect();
        let missing: Vec<_> = job.classes.iter().filter(|c| !done.contains(c.wnid.as_str())).collect();
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|c| format!("<code>{}</code>", escape(&c.wnid))).collect();
            let _ = write!(
                body,
                "<h2>Not committed yet</h2><p id=\"pending\" data-value=\"{}\">{}</p>",
                missing.len(),
                names.join(", ")
            );
        }
    }
    // The spec.
    let spec = records.manifest.as_ref().map(|m| &m.spec).or(records.job.as_ref().map(|j| &j.spec));
    if let Some(spec) = spec {
        let spec = serde_json::to_string_pretty(spec).unwrap_or_default();
        let _ = write!(
            body,
            "<h2>Spec</h2><details><summary>the resolved job spec</summary><pre>{}</pre></details>",
            escape(&spec)
        );
    }
    // Every class.
    body.push_str("<h2>Classes</h2><table id=\"classes-table\"><tr><th>class</th><th class=\"num\">label</th><th class=\"num\">real images</th><th class=\"num\">diversity</th><th class=\"num\">representativeness</th><th class=\"num\">seconds</th><th>cache</th><th>worker</th><th>contact sheet</th></tr>");
    for (i, m) in markers.iter().enumerate() {
        let _ = write!(
            body,
            "<tr><td><a href=\"classes/{}\">{}</a>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
            class_file(i),
            escape(&m.wnid),
            if flagged.iter().any(|(j, _, _)| *j == i) {
                " <span class=\"warn\" title=\"outside the quality band: see Warnings\">⚠</span>"
            } else {
                ""
            },
            m.label,
            m.real_images
        );
        match &m.quality {
            Some(q) => {
                body.push_str(&number("diversity_normalised", &m.wnid, q.diversity_normalised, 3));
                body.push_str(&number("representativeness_normalised", &m.wnid, q.representativeness_normalised, 3));
            }
            None => body.push_str("<td class=\"muted\">–</td><td class=\"muted\">–</td>"),
        }
        let secs: f64 = stages(&m.timings).iter().map(|(_, s)| s).sum();
        let thumb = match shown.get(&m.wnid) {
            Some(Sheet::Shown { .. }) => format!(
                "<img class=\"thumb\" loading=\"lazy\" src=\"{sheets}contact_sheets/{}.png\" alt=\"contact sheet of {}\">",
                segment(&m.wnid),
                escape(&m.wnid)
            ),
            Some(Sheet::LeftOut(..)) => {
                "<span class=\"warn\" title=\"see Contact sheets left out\">⚠ left out</span>".into()
            }
            None => "<span class=\"muted\">–</span>".into(),
        };
        let _ = write!(
            body,
            "<td class=\"num\">{secs:.1}</td><td>{}</td><td><code>{}</code></td><td>{thumb}</td></tr>",
            if m.latent_cache_hit { "hit" } else { "miss" },
            escape(&m.worker_id),
        );
    }
    body.push_str("</table>");
    page(&format!("mgd3 job {job}"), &body)
}

/// Contact sheets read at once while a report checks them.
const SHEET_READS: usize = 8;

/// Classes named in the index's warnings; more are counted (and marked in the class table).
const MAX_WARNINGS_LISTED: usize = 20;

/// Tiles per row of a wrapped contact sheet.
const COLUMNS: usize = 10;
/// Displayed width of one contact-sheet tile (CSS pixels).
const SHOWN: f64 = 96.0;

fn class_page(records: &JobRecords, index: usize, sheet: Option<&Sheet>, assets: &str) -> String {
    let m = &records.markers[index];
    let mut body = String::from("<nav><a href=\"../index.html\">job</a>");
    if index > 0 {
        let _ =
            write!(body, "<a href=\"{}\">← {}</a>", class_file(index - 1), escape(&records.markers[index - 1].wnid));
    }
    if let Some(next) = records.markers.get(index + 1) {
        let _ = write!(body, "<a href=\"{}\">{} →</a>", class_file(index + 1), escape(&next.wnid));
    }
    body.push_str("</nav>");
    let _ = write!(body, "<h1>class <code>{}</code> (label {})</h1><table>", escape(&m.wnid), m.label);
    let _ = write!(
        body,
        "<tr><th>images</th><td>{}</td></tr><tr><th>real images</th><td>{}</td></tr><tr><th>latent cache</th><td>{}</td></tr><tr><th>worker</th><td><code>{}</code></td></tr><tr><th>attempt</th><td><code>{}</code></td></tr></table>",
        m.images.len(),
        m.real_images,
        if m.latent_cache_hit { "hit" } else { "miss" },
        escape(&m.worker_id),
        escape(&m.attempt_id)
    );
    let ipc = records.job.as_ref().map_or(m.images.len(), |j| j.spec.ipc);
    for concern in m.quality.as_ref().map(|q| q.concerns(ipc)).unwrap_or_default() {
        let _ = write!(body, "<p class=\"warning\">⚠ {}</p>", escape(&concern.to_string()));
    }
    if let Some(q) = &m.quality {
        body.push_str(
            "<h2>Quality</h2><table><tr><th></th><th class=\"num\">raw</th><th class=\"num\">÷ real spread</th></tr>",
        );
        let _ = write!(
            body,
            "<tr><td>diversity (mean distance to the nearest other sample)</td>{}{}</tr>",
            number("diversity", &m.wnid, q.diversity, 3),
            number("diversity_normalised", &m.wnid, q.diversity_normalised, 3)
        );
        let _ = write!(
            body,
            "<tr><td>representativeness (mean distance to the {} nearest real latents)</td>{}{}</tr>",
            q.neighbours,
            number("representativeness", &m.wnid, q.representativeness, 3),
            number("representativeness_normalised", &m.wnid, q.representativeness_normalised, 3)
        );
        let _ = write!(
            body,
            "<tr><td>real spread (mean distance between two real latents)</td>{}<td></td></tr></table>",
            number("real_spread", &m.wnid, q.real_spread, 3)
        );
    }
    body.push_str("<h2>Samples</h2>");
    match sheet {
        Some(Sheet::Shown { size: (width, height), checked }) => {
            body.push_str("<p class=\"muted\">Each block: real images of the class (the first ones listed, for reference), then mode j as the VAE decodes it and sample j, which was guided to mode j.</p>");
            if !checked {
                body.push_str("<p class=\"muted\">This sheet was written by an earlier version of mgd3, which recorded no digest of it: it is shown unchecked.</p>");
            }
            body.push_str(&wrapped_sheet(m, *width, *height, assets));
        }
        Some(Sheet::LeftOut(file, problem)) => {
            let _ = write!(
                body,
                "<p class=\"warning\">⚠ The contact sheet is left out: <code>{}</code> {}. <code>coordinator verify</code> lists such sheets and <code>coordinator resume</code> removes them; only distilling the class again makes its sheet anew.</p>",
                escape(file),
                escape(problem)
            );
        }
        None if m.sheet_record => body.push_str("<p class=\"warning\">⚠ No contact sheet: the attempt that committed this class made one after its commit, and it is not there (deleted since, or writing it failed: the worker's log says why). A sheet is made only when its class is distilled.</p>"),
        None => body.push_str("<p class=\"muted\">No contact sheet for this class (contact sheets were turned off, or one was not written after the commit).</p>"),
    }
    if let Some(embedding) = &m.embedding {
        let _ = write!(
            body,
            "<h2>Latent space</h2><p class=\"muted\">Real latents (grey), modes (red, numbered) and samples (blue; a line joins sample j to mode j) on the first two principal components of the class's real latents (PCA; the paper's figures use t-SNE), explaining {:.0} % and {:.0} % of their variance.</p>",
            embedding.explained_variance[0] * 100.0,
            embedding.explained_variance[1] * 100.0
        );
        body.push_str(&scatter(embedding));
    }
    body.push_str("<h2>Time</h2>");
    body.push_str(&stage_table(&m.timings));
    page(&format!("class {} — mgd3 job {}", m.wnid, records.job_id), &body)
}

/// The contact sheet (rows: real, modes, samples; column j) cut into tiles with CSS and wrapped
/// [`COLUMNS`] to a row, each block labelled. The tiles are found by the sheet's layout
/// ([`SheetLayout::of_sheet`]: this version's labelled sheets and the plain grids of earlier
/// ones); a sheet of any other size is shown whole.
fn wrapped_sheet(m: &ClassMarker, width: u32, height: u32, assets: &str) -> String {
    let ipc = m.images.len().max(1);
    let url = format!("{assets}contact_sheets/{}.png", segment(&m.wnid));
    let Some(layout) = SheetLayout::of_sheet((width, height), ipc as u32, 3) else {
        return format!(
            "<p><img src=\"{url}\" alt=\"contact sheet of {}\" style=\"max-width:100%\"></p>",
            escape(&m.wnid)
        );
    };
    let scale = SHOWN / f64::from(layout.tile.0);
    let shown_h = f64::from(layout.tile.1) * scale;
    let (w, h) = (f64::from(width) * scale, f64::from(height) * scale);
    let rows = [("real", m.real_images.min(ipc as u64) as usize), ("mode", ipc), ("sample", ipc)];
    let mut html = String::new();
    for start in (0..ipc).step_by(COLUMNS) {
        let end = (start + COLUMNS).min(ipc);
        let _ = write!(
            html,
            "<div class=\"scroll\"><div class=\"block\" style=\"grid-template-columns:60px repeat({}, {SHOWN}px)\">",
            end - start
        );
        for (r, (label, count)) in rows.iter().enumerate() {
            // The numbers head the mode and sample rows only: real image j is no partner of mode j.
            if r == 1 {
                html.push_str("<span></span>");
                for j in start..end {
                    let _ = write!(html, "<span class=\"label\">j = {j}</span>");
                }
            }
            let _ = write!(html, "<span class=\"label\">{label}</span>");
            for j in start..end {
                if j >= *count {
                    html.push_str("<span></span>");
                    continue;
                }
                let (x, y) = layout.tile_origin(j as u32, r as u32);
                let (x, y) = (f64::from(x) * scale, f64::from(y) * scale);
                let _ = write!(
                    html,
                    "<span class=\"tile\" role=\"img\" aria-label=\"{label} {j}\" data-sheet=\"{url}\" style=\"width:{SHOWN}px;height:{shown_h:.2}px;background:url('{url}') -{x:.2}px -{y:.2}px / {w:.2}px {h:.2}px no-repeat\"></span>"
                );
            }
        }
        html.push_str("</div></div>");
    }
    html
}

/// An SVG scatter plot of an embedding, scaled to fit.
fn scatter(e: &mgd3_common::manifest::Embedding) -> String {
    const SIZE: f32 = 520.0;
    const MARGIN: f32 = 24.0;
    let all = e.real.iter().chain(&e.modes).chain(&e.samples);
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for p in all {
        for k in 0..2 {
            lo[k] = lo[k].min(p[k]);
            hi[k] = hi[k].max(p[k]);
        }
    }
    let span = (0..2).map(|k| (hi[k] - lo[k]).max(f32::EPSILON)).fold(0.0f32, f32::max);
    let at = |p: &[f32; 2]| {
        let x = MARGIN + (p[0] - lo[0]) / span * (SIZE - 2.0 * MARGIN);
        let y = SIZE - MARGIN - (p[1] - lo[1]) / span * (SIZE - 2.0 * MARGIN);
        (x, y)
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SIZE}\" height=\"{SIZE}\" viewBox=\"0 0 {SIZE} {SIZE}\" role=\"img\" aria-label=\"latent space\" style=\"border:1px solid #ddd;background:#fff\">"
    );
    for p in &e.real {
        let (x, y) = at(p);
        let _ = write!(svg, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.2\" fill=\"#bbb\"/>");
    }
    for (j, (mode, sample)) in e.modes.iter().zip(&e.samples).enumerate() {
        let ((mx, my), (sx, sy)) = (at(mode), at(sample));
        let _ = write!(
            svg,
            "<line x1=\"{mx:.1}\" y1=\"{my:.1}\" x2=\"{sx:.1}\" y2=\"{sy:.1}\" stroke=\"#8aa6d8\" stroke-width=\"1\"/>"
        );
        let _ = write!(
            svg,
            "<circle cx=\"{sx:.1}\" cy=\"{sy:.1}\" r=\"4\" fill=\"#2f64c8\"><title>sample {j}</title></circle>"
        );
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"8\" height=\"8\" fill=\"#d33\" transform=\"rotate(45 {mx:.1} {my:.1})\"><title>mode {j}</title></rect>",
            mx - 4.0,
            my - 4.0
        );
        let _ =
            write!(svg, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" fill=\"#a00\">{j}</text>", mx + 6.0, my - 4.0);
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed job's folder says failed (its finish and a shard out of attempts are in
    /// state.json), not "not finished"; a running one's does.
    #[test]
    fn the_state_is_told_from_the_folder() {
        use crate::scheduler::{PersistedJob, Shard, ShardState};
        let failed = PersistedJob {
            shards: vec![Shard::pending(), Shard { state: ShardState::Failed, ..Shard::pending() }],
            finished_unix_ms: Some(7),
            ..Default::default()
        };
        assert_eq!(state_phrase(false, Some(&failed)), "failed");
        assert_eq!(state_phrase(true, Some(&failed)), "succeeded", "a manifest is the truth");
        let running = PersistedJob { finished_unix_ms: None, ..failed.clone() };
        assert_eq!(state_phrase(false, Some(&running)), "not finished");
        assert_eq!(state_phrase(false, Some(&PersistedJob { cancelled: true, ..running.clone() })), "cancelled");
        assert_eq!(state_phrase(false, Some(&PersistedJob { paused: Some("full".into()), ..running })), "paused");
        assert_eq!(state_phrase(false, None), "not finished");
    }

    #[test]
    fn names_are_escaped_in_text_and_encoded_in_urls() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(segment("x%y"), "x%25y");
        assert_eq!(segment("a b/é"), "a%20b%2F%C3%A9");
        assert_eq!(segment("n01440764"), "n01440764");
        assert_eq!(class_file(7), "00007.html");
        assert_eq!(seconds(42.0), "42.0 s");
        assert_eq!(seconds(200.0), "3 min 20 s");
    }

    /// A report of ImageNet-1K's size stays light: one page per class, an index of numbers and
    /// lazy thumbnails only, one overview.
    #[tokio::test]
    async fn a_thousand_classes_make_a_light_index_and_a_page_each() {
        use mgd3_common::manifest::{ClassQuality, Embedding, FileDigest};
        let dir = mgd3_common::store::open("memory://report-scale/out/jobs/big").unwrap();
        let digest = |name: &str| FileDigest { name: name.into(), sha256: String::new(), bytes: 0 };
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([9, 99, 199]))
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        let png = png.into_inner();
        for i in 0..1000u64 {
            let wnid = format!("n{i:08}");
            let marker = ClassMarker {
                schema_version: 1,
                job_id: "big".into(),
                fingerprint: "sha256:f".into(),
                attempt_id: "a".into(),
                worker_id: format!("w{}", i % 7),
                wnid: wnid.clone(),
                label: i as i64,
                class_index: i,
                // The overview reads sample 0 of each class, checked against its digest.
                images: (0..10)
                    .map(|j| match j {
                        0 => FileDigest {
                            name: "0.png".into(),
                            sha256: mgd3_common::sha256_hex(&png),
                            bytes: png.len() as u64,
                        },
                        _ => digest(&format!("{j}.png")),
                    })
                    .collect(),
                modes: digest("modes.npy"),
                real_images: 1300,
                timings: StageSeconds::default(),
                committed_unix_ms: 0,
                latent_cache_hit: i % 2 == 0,
                modes_cache_hit: false,
                skipped: Default::default(),
                quality: Some(ClassQuality {
                    diversity: 1.0,
                    representativeness: 2.0,
                    neighbours: if i == 7 { 40 } else { 50 },
                    real_spread: 4.0,
                    diversity_normalised: 0.25,
                    representativeness_normalised: 0.5,
                }),
                embedding: Some(Embedding {
                    method: "pca".into(),
                    explained_variance: [0.3, 0.1],
                    real: vec![[0.0, 1.0]; 300],
                    modes: vec![[1.0, 0.0]; 10],
                    samples: vec![[1.0, 1.0]; 10],
                }),
                versions_changed: false,
                data: None,
                // Half the sheets recorded; the others an earlier version's (no record), shown too.
                sheet_record: i % 2 == 0,
            };
            let bytes = serde_json::to_vec(&marker).unwrap();
            dir.store.put(&dir.key(&format!("shards/{wnid}.json")), bytes.into()).await.unwrap();
            dir.store.put(&dir.key(&format!("dataset/{wnid}/0.png")), png.clone().into()).await.unwrap();
            dir.store.put(&dir.key(&format!("contact_sheets/{wnid}.png")), png.clone().into()).await.unwrap();
            if marker.sheet_record {
                let record = serde_json::to_vec(&commit::sheet_record(&marker, &png)).unwrap();
                dir.store.put(&dir.key(&format!("contact_sheets/{wnid}.json")), record.into()).await.unwrap();
            }
        }
        let target = dir.child("report");
        let summary = write_report(&dir, "big", &target, false).await.unwrap();
        assert_eq!(summary.classes, 1000);
        let index = mgd3_common::store::get_bytes(target.store.as_ref(), &target.key("index.html")).await.unwrap();
        let index = String::from_utf8(index.to_vec()).unwrap();
        assert!(index.len() < 1_000_000, "index of {} bytes", index.len());
        assert_eq!(index.matches("loading=\"lazy\"").count(), 1000);
        assert!(index.contains("id=\"cache_hits\" data-value=\"500\""));
        // Every class's real images were clustered; half of them were encoded by this job, the
        // other half's latents came from the cache.
        assert!(index.contains("id=\"real_images\" data-value=\"1300000\""));
        assert!(index.contains("id=\"real_encoded\" data-value=\"650000\""));
        assert!(index.contains("(the latents of 500 class(es) came from the cache)"));
        assert!(index.contains("its 40–50 (all of a class's when fewer than 50) nearest real latents"), "as recorded");
        assert!(index.contains("Not recorded here"), "no state.json: said, not invented");
        let page =
            mgd3_common::store::get_bytes(target.store.as_ref(), &target.key("classes/00999.html")).await.unwrap();
        assert!(String::from_utf8_lossy(&page).contains("n00000999"));
        assert!(String::from_utf8_lossy(&page).contains("earlier version of mgd3"), "an unrecorded sheet is said so");
        let page =
            mgd3_common::store::get_bytes(target.store.as_ref(), &target.key("classes/00998.html")).await.unwrap();
        assert!(!String::from_utf8_lossy(&page).contains("earlier version of mgd3"));
        let overview = mgd3_common::store::get_bytes(target.store.as_ref(), &target.key("overview.png")).await.unwrap();
        let overview = image::load_from_memory(&overview).unwrap();
        // A title line, then a 32 × 32 grid of tiles, each with its class's name under it.
        let glyph = mgd3_common::sheet::GLYPH;
        let size = (32 * (TILE + 2) + 2, glyph + 10 + 32 * (TILE + glyph + 8) + 2);
        assert_eq!((overview.width(), overview.height()), size, "a 32 × 32 grid of {TILE} px tiles");
    }
}
