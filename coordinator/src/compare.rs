//! `coordinator report` of a sweep: one page that puts the variants side by side —
//! `<output>/sweeps/<sweep>/report/index.html`, self-contained (the sample grid is embedded) —
//! with, per variant, its settings, the classes committed, the mean and spread over classes of
//! diversity and representativeness (each divided by the class's real spread, as the job report
//! and the manifest give them), the classes outside the quality band, and a link to the variant's
//! own report; and a grid of the same classes' first samples across variants (rows = variants).
//! The table sorts by any column. Numbers appear rounded and, in `data-value`, exactly.

use std::fmt::Write as _;

use base64::Engine as _;
use mgd3_common::manifest::ClassMarker;
use mgd3_common::store::Location;
use mgd3_common::sweep::SweepRecord;
use object_store::ObjectStoreExt;

use crate::report::{ReportError, escape, page, put, read_records, segment, write_report};

/// Classes shown in the sample grid (the first ones every variant committed).
const GRID_CLASSES: usize = 8;
/// Side of one grid tile (pixels).
const GRID_TILE: u32 = 64;

/// Mean and sample standard deviation; `None` for no values.
fn mean_sd(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    Some((mean, var.sqrt()))
}

/// One variant as the comparison shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantSummary {
    /// The variant's job.
    pub job_id: String,
    /// Its settings, `key=value` in the sweep's order.
    pub label: String,
    /// Its state as its folder tells it (succeeded, failed, cancelled, paused, not finished).
    pub state: &'static str,
    /// Classes with a commit marker.
    pub classes: usize,
    /// Mean and sample standard deviation over classes of `diversity_normalised`.
    pub diversity: Option<(f64, f64)>,
    /// Mean and sample standard deviation over classes of `representativeness_normalised`.
    pub representativeness: Option<(f64, f64)>,
    /// Classes outside the quality band.
    pub flagged: usize,
    /// The variant's own report, relative to the comparison page, once written.
    pub report: Option<String>,
}

/// What [`write_sweep_report`] wrote.
#[derive(Clone, Debug)]
pub struct SweepReportSummary {
    /// Where `index.html` is.
    pub index: String,
    /// Each variant, in the sweep's order.
    pub variants: Vec<VariantSummary>,
}

/// Writes the comparison page of sweep `record` whose variants' outputs are under `root`
/// (`<output>`, holding `jobs/<job>/`), into `root/sweeps/<sweep>/report/`; with
/// `variant_reports`, each variant's own report first (into its `jobs/<job>/report/`). A variant
/// with nothing committed yet is a row without numbers.
///
/// # Errors
/// [`ReportError`] for a record, marker or sample that cannot be read, or a page that cannot be
/// written.
pub async fn write_sweep_report(
    root: &Location,
    record: &SweepRecord,
    variant_reports: bool,
) -> Result<SweepReportSummary, ReportError> {
    let mut variants = Vec::new();
    let mut markers: Vec<Vec<ClassMarker>> = Vec::new();
    for (number, variant) in record.variants.iter().enumerate() {
        let dir = root.child(&format!("jobs/{}", variant.job_id));
        let in_variant = |error| in_variant(record, number, error);
        let records = match read_records(&dir, &variant.job_id).await {
            Ok(records) => Some(records),
            Err(ReportError::NothingCommitted { .. } | ReportError::NoFolder { .. }) => None,
            Err(error) => return Err(in_variant(error)),
        };
        let mut summary = VariantSummary {
            job_id: variant.job_id.clone(),
            label: record.label(variant),
            state: crate::report::folder_state(&dir).await,
            classes: 0,
            diversity: None,
            representativeness: None,
            flagged: 0,
            report: None,
        };
        if let Some(records) = records {
            // The sweep's record says which settings each job was run with; the job's own record
            // is what ran: a row must not carry another job's numbers under its settings.
            if let Some(job) = &records.job {
                let differing: Vec<String> = variant
                    .settings
                    .iter()
                    .filter_map(|(key, value)| {
                        let ran = mgd3_common::sweep::SweepKey::from_name(key)?.value_in(&job.spec);
                        (ran != *value).then(|| format!("{key} = {value} in the sweep's record, {ran} in the job's"))
                    })
                    .chain((job.fingerprint != variant.fingerprint).then(|| "its fingerprint".to_owned()))
                    .collect();
                if !differing.is_empty() {
                    return Err(ReportError::SweepRecordMismatch {
                        sweep: record.sweep_id.clone(),
                        job: variant.job_id.clone(),
                        differing,
                    });
                }
            }
            let ipc = records.job.as_ref().map(|j| j.spec.ipc);
            let quality: Vec<_> = records.markers.iter().filter_map(|m| m.quality.as_ref()).collect();
            summary.classes = records.markers.len();
            summary.diversity = mean_sd(&quality.iter().map(|q| q.diversity_normalised).collect::<Vec<_>>());
            summary.representativeness =
                mean_sd(&quality.iter().map(|q| q.representativeness_normalised).collect::<Vec<_>>());
            summary.flagged = records
                .markers
                .iter()
                .filter(|m| m.quality.as_ref().is_some_and(|q| !q.concerns(ipc.unwrap_or(m.images.len())).is_empty()))
                .count();
            if variant_reports {
                write_report(&dir, &variant.job_id, &dir.child("report"), false).await.map_err(in_variant)?;
                summary.report = Some(format!("../../../jobs/{}/report/index.html", segment(&variant.job_id)));
            } else if dir.store.head(&dir.key("report/index.html")).await.is_ok() {
                summary.report = Some(format!("../../../jobs/{}/report/index.html", segment(&variant.job_id)));
            }
            markers.push(records.markers);
        } else {
            markers.push(Vec::new());
        }
        variants.push(summary);
    }
    let grid = grid_png(root, record, &markers).await?;
    let html =
        comparison_page(record, &variants, grid.as_ref().map(|(png, classes)| (png.as_slice(), classes.as_slice())));
    let target = root.child(&format!("sweeps/{}/report", record.sweep_id));
    put(&target, "index.html", html.into_bytes()).await?;
    let index = match &target.local_root {
        Some(path) => path.join("index.html").display().to_string(),
        None => format!("{}/index.html", target.url.trim_end_matches('/')),
    };
    Ok(SweepReportSummary { index, variants })
}

/// `error` of the variant at `index` of `record`, named as the comparison page numbers it.
fn in_variant(record: &SweepRecord, index: usize, error: ReportError) -> ReportError {
    let variant = &record.variants[index];
    ReportError::InVariant {
        sweep: record.sweep_id.clone(),
        number: index + 1,
        label: record.label(variant),
        job: variant.job_id.clone(),
        source: Box::new(error),
    }
}

/// The grid of first samples: a row per variant, a column per class that every variant with
/// commits has, as PNG bytes with the classes shown; `None` when no class is common.
async fn grid_png(
    root: &Location,
    record: &SweepRecord,
    markers: &[Vec<ClassMarker>],
) -> Result<Option<(Vec<u8>, Vec<String>)>, ReportError> {
    use mgd3_common::sheet::{GLYPH, draw_text, fit_text};
    let with_commits: Vec<&Vec<ClassMarker>> = markers.iter().filter(|m| !m.is_empty()).collect();
    let Some(first) = with_commits.first() else { return Ok(None) };
    let classes: Vec<String> = first
        .iter()
        .map(|m| m.wnid.clone())
        .filter(|wnid| with_commits.iter().all(|ms| ms.iter().any(|m| &m.wnid == wnid)))
        .take(GRID_CLASSES)
        .collect();
    if classes.is_empty() {
        return Ok(None);
    }
    let label_w = 5 * GLYPH + 8;
    let caption = GLYPH + 6;
    let (cell_w, cell_h) = (GRID_TILE + 4, GRID_TILE + 4);
    let width = label_w + classes.len() as u32 * cell_w;
    let height = caption + record.variants.len() as u32 * cell_h;
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([255; 3]));
    for (c, wnid) in classes.iter().enumerate() {
        draw_text(&mut canvas, label_w + c as u32 * cell_w + 2, 4, &fit_text(wnid, GRID_TILE, 1), 1, [60, 60, 60]);
    }
    for (r, (variant, ms)) in record.variants.iter().zip(markers).enumerate() {
        let in_variant = |error| in_variant(record, r, error);
        let y = caption + r as u32 * cell_h;
        draw_text(&mut canvas, 4, y + GRID_TILE / 2 - GLYPH / 2, &format!("{}", r + 1), 1, [40, 40, 40]);
        for (c, wnid) in classes.iter().enumerate() {
            let Some(marker) = ms.iter().find(|m| &m.wnid == wnid) else { continue };
            let Some(image) = marker.images.first() else { continue };
            let dir = root.child(&format!("jobs/{}", variant.job_id));
            let decoded = crate::report::committed_image(&dir, marker, image).await.map_err(in_variant)?;
            let tile = image::imageops::resize(&decoded, GRID_TILE, GRID_TILE, image::imageops::FilterType::Triangle);
            image::imageops::replace(&mut canvas, &tile, i64::from(label_w + c as u32 * cell_w + 2), i64::from(y + 2));
        }
    }
    let mut png = std::io::Cursor::new(Vec::new());
    canvas.write_to(&mut png, image::ImageFormat::Png).expect("PNG encoding into memory");
    Ok(Some((png.into_inner(), classes)))
}

/// A number cell: rounded text, the exact value in `data-value` (the sort key).
fn cell(field: &str, value: Option<(f64, f64)>) -> String {
    match value {
        Some((mean, sd)) => format!(
            "<td class=\"num\" data-field=\"{field}\" data-value=\"{mean}\" data-sd=\"{sd}\">{mean:.3} <span class=\"muted\">± {sd:.3}</span></td>"
        ),
        None => format!("<td class=\"num muted\" data-field=\"{field}\" data-value=\"\">—</td>"),
    }
}

/// Sorts the table by a clicked header (numbers by `data-value`, text by its content; a second
/// click reverses), or on load by the page's `#sort=<column>` / `#sort=<column>-desc` (a column's
/// `data-key`: a swept key, `diversity`, `representativeness`, ...), so a link can open it sorted.
const SORT_SCRIPT: &str = "<script>(function(){function sortBy(th,asc){var t=th.closest('table'),b=t.tBodies[0],col=th.cellIndex;\
var rows=Array.from(b.rows);t.querySelectorAll('th').forEach(function(h){h.removeAttribute('data-order');});\
th.setAttribute('data-order',asc?'asc':'desc');rows.sort(function(x,y){var a=x.cells[col],c=y.cells[col];\
var na=parseFloat(a.getAttribute('data-value')),nc=parseFloat(c.getAttribute('data-value'));\
var r=(!isNaN(na)&&!isNaN(nc))?na-nc:(isNaN(na)&&!isNaN(nc))?1:(!isNaN(na)&&isNaN(nc))?-1:a.textContent.localeCompare(c.textContent);\
return asc?r:-r;});rows.forEach(function(r){b.appendChild(r);});}\
document.querySelectorAll('table.sortable th').forEach(function(th){th.style.cursor='pointer';th.title='sort';\
th.addEventListener('click',function(){sortBy(th,th.getAttribute('data-order')!=='asc');});});\
var m=/^#sort=([^&]+?)(-desc)?$/.exec(decodeURIComponent(location.hash));if(m){var th=document.querySelector('table.sortable th[data-key=\"'+m[1]+'\"]');\
if(th)sortBy(th,!m[2]);}})();</script>";

fn comparison_page(record: &SweepRecord, variants: &[VariantSummary], grid: Option<(&[u8], &[String])>) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Sweep {}</h1><p>{} variant(s) over {}; each is its own job with its own report. Diversity and \
         representativeness are each class's numbers divided by its real images' spread (mean over classes ± \
         sample standard deviation): larger diversity is more varied, smaller representativeness is closer to \
         the data. Click a column to sort.</p>",
        escape(&record.sweep_id),
        record.variants.len(),
        escape(&record.keys.join(", "))
    );
    body.push_str("<table class=\"sortable\" id=\"variants\"><thead><tr><th class=\"num\" data-key=\"variant\">#</th>");
    for key in &record.keys {
        let _ = write!(body, "<th data-key=\"{0}\">{0}</th>", escape(key));
    }
    body.push_str(
        "<th data-key=\"state\">state</th><th class=\"num\" data-key=\"classes\">classes</th><th class=\"num\" data-key=\"diversity\">diversity</th>\
         <th class=\"num\" data-key=\"representativeness\">representativeness</th>\
         <th class=\"num\" data-key=\"flagged\">outside band</th><th data-key=\"job\">job</th></tr></thead><tbody>",
    );
    for (i, (variant, summary)) in record.variants.iter().zip(variants).enumerate() {
        let _ = write!(
            body,
            "<tr data-job=\"{}\"><td class=\"num\" data-value=\"{}\">{}</td>",
            escape(&variant.job_id),
            i + 1,
            i + 1
        );
        for key in &record.keys {
            let value = variant.settings.get(key).map_or("", String::as_str);
            let _ = write!(
                body,
                "<td data-field=\"{}\" data-value=\"{}\">{}</td>",
                escape(key),
                escape(value),
                escape(value)
            );
        }
        let _ = write!(
            body,
            "<td data-field=\"state\" data-value=\"{0}\"{1}>{0}</td>",
            summary.state,
            if matches!(summary.state, "failed" | "cancelled" | "paused") { " class=\"warn\"" } else { "" }
        );
        let _ = write!(body, "<td class=\"num\" data-field=\"classes\" data-value=\"{0}\">{0}</td>", summary.classes);
        body.push_str(&cell("diversity", summary.diversity));
        body.push_str(&cell("representativeness", summary.representativeness));
        let _ = write!(
            body,
            "<td class=\"num{1}\" data-field=\"flagged\" data-value=\"{0}\">{0}</td>",
            summary.flagged,
            if summary.flagged > 0 { " warn" } else { "" }
        );
        match &summary.report {
            Some(link) => {
                let _ = write!(body, "<td><a href=\"{}\">{}</a></td></tr>", escape(link), escape(&variant.job_id));
            }
            None => {
                let _ =
                    write!(body, "<td>{} <span class=\"muted\">(no report)</span></td></tr>", escape(&variant.job_id));
            }
        }
    }
    body.push_str("</tbody></table>");
    match grid {
        Some((png, classes)) => {
            let _ = write!(
                body,
                "<h2>Samples</h2><p>Sample 0 of the same {} class(es) ({}) in {}: row n is variant n.</p>\
                 <img id=\"grid\" class=\"tile\" alt=\"first samples, a row per variant\" src=\"data:image/png;base64,{}\">",
                classes.len(),
                escape(&classes.join(", ")),
                match variants.iter().filter(|v| v.classes == 0).count() {
                    0 => "every variant".to_owned(),
                    empty => format!(
                        "every variant with committed classes ({} of {}; the others' rows are empty)",
                        variants.len() - empty,
                        variants.len()
                    ),
                },
                base64::engine::general_purpose::STANDARD.encode(png)
            );
        }
        None => body.push_str("<h2>Samples</h2><p class=\"muted\">No class is committed in every variant yet.</p>"),
    }
    body.push_str(SORT_SCRIPT);
    page(&format!("sweep {}", record.sweep_id), &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_spread_are_the_sample_statistics() {
        assert_eq!(mean_sd(&[]), None);
        assert_eq!(mean_sd(&[2.0]), Some((2.0, 0.0)));
        let (mean, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((mean - 2.5).abs() < 1e-12 && (sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
