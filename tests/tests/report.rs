//! What a person looks at after a job: `coordinator report` opened in a real headless browser
//! (Chromium from the distribution; `MGD3_REQUIRE_CHROMIUM=1` in CI makes a missing one a
//! failure), and `coordinator export --npz` read back as the ADM evaluation suite reads it.
//!
//! The job is a real distillation with the tiny models, IPC 12 (contact sheets wrap into two
//! rows of blocks), and one class named `x%y <b>&` so that names must be escaped in the page and
//! encoded in its links.

mod support;

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

const WEIRD: &str = "x%y <b>&";
const IPC: usize = 12;

/// A finished job's output folder `<out>/jobs/<job>` and its id.
fn distilled(scratch: &Path) -> (PathBuf, String) {
    let data = scratch.join("data");
    dataset(&data, 3, IPC + 2);
    std::fs::rename(data.join("c2"), data.join(WEIRD)).unwrap();
    let out = scratch.join("out");
    let text = spec(&data.display().to_string(), &out.display().to_string(), 3, IPC, 7, "classes_per_shard = 2")
        .replace("\"c2\"", &format!("\"{WEIRD}\""));
    let spec_path = scratch.join("job.toml");
    std::fs::write(&spec_path, text).unwrap();
    run_locally(&spec_path, &[]);
    let job = std::fs::read_dir(out.join("jobs")).unwrap().next().unwrap().unwrap().file_name();
    let job = job.to_string_lossy().into_owned();
    (out.join("jobs").join(&job), job)
}

fn coordinator(args: &[&str]) -> std::process::Output {
    Command::new(bin("coordinator")).args(args).output().unwrap()
}

/// Every `data-field="F" data-wnid="W" data-value="V"` cell of a page, with its text.
fn cells(dom: &str) -> Vec<(String, String, f64, String)> {
    let mut found = Vec::new();
    for piece in dom.split("data-field=\"").skip(1) {
        let field = piece.split('"').next().unwrap().to_owned();
        let Some(rest) = piece.split_once("data-wnid=\"") else { continue };
        let wnid = rest.1.split('"').next().unwrap().replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
        let value = piece.split_once("data-value=\"").unwrap().1.split('"').next().unwrap().parse().unwrap();
        let text = piece.split_once('>').unwrap().1.split('<').next().unwrap().to_owned();
        found.push((field, wnid, value, text));
    }
    found
}

#[test]
fn the_report_renders_in_a_browser_with_the_manifests_numbers() {
    let scratch = tempfile::tempdir().unwrap();
    let (dir, job) = distilled(scratch.path());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(dir.join("report/index.html").is_file(), "`coordinator run` writes the report of a job that succeeded");
    let dir_arg = dir.display().to_string();
    let out = coordinator(&["report", &job, "--job-dir", &dir_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let index = dir.join("report/index.html");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), index.display().to_string());
    for page in ["overview.png", "classes/00000.html", "classes/00001.html", "classes/00002.html"] {
        assert!(dir.join("report").join(page).is_file(), "{page}");
    }
    // Every class has its quality numbers in the manifest and its picture in its marker.
    let classes = manifest["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 3);
    for class in classes {
        let q = &class["quality"];
        for field in
            ["diversity", "representativeness", "real_spread", "diversity_normalised", "representativeness_normalised"]
        {
            assert!(q[field].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{field}: {class:#}");
        }
        assert_eq!(q["neighbours"], IPC as u64 + 2, "fewer than 50 real latents: all of them");
        let wnid = class["wnid"].as_str().unwrap();
        let marker: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("shards").join(format!("{wnid}.json"))).unwrap()).unwrap();
        assert_eq!(marker["embedding"]["samples"].as_array().unwrap().len(), IPC);
        assert_eq!(marker["embedding"]["real"].as_array().unwrap().len(), IPC + 2);
        assert_eq!(marker["quality"], *q);
    }
    // The raw page escapes the name in text and encodes it in links.
    let raw = std::fs::read_to_string(&index).unwrap();
    assert!(raw.contains("x%y &lt;b&gt;&amp;") && !raw.contains("<b>&"), "unescaped name");
    assert!(raw.contains("contact_sheets/x%25y%20%3Cb%3E%26.png"));

    let Some(browser) = chromium() else { return };
    let (dom, console) = browse(&browser, &index);
    assert!(console.is_empty(), "console messages on the index: {console:#?}");
    assert!(dom.contains("id=\"broken\"") && dom.contains("hidden"), "the broken-image note must stay hidden");
    let value = |id: &str| {
        let rest = dom.split_once(&format!("id=\"{id}\"")).unwrap().1;
        rest.split_once("data-value=\"").unwrap().1.split('"').next().unwrap().parse::<f64>().unwrap()
    };
    assert_eq!(value("images"), manifest["images"].as_f64().unwrap());
    assert_eq!(value("classes"), 3.0);
    assert_eq!(value("failures"), 0.0);
    let mut checked = 0;
    let by_wnid = |wnid: &str| classes.iter().find(|c| c["wnid"] == wnid).unwrap_or_else(|| panic!("{wnid}"));
    for (field, wnid, shown, text) in cells(&dom) {
        let want = by_wnid(&wnid)["quality"][&field].as_f64().unwrap();
        assert_eq!(shown, want, "{field} of {wnid}");
        assert_eq!(text, format!("{want:.3}"), "{field} of {wnid} as text");
        checked += 1;
    }
    assert_eq!(checked, 6, "two numbers per class on the index");
    // Each class page: its five numbers, two blocks of tiles (IPC 12 wraps at 10), the plot.
    for (i, class) in classes.iter().enumerate() {
        let (dom, console) = browse(&browser, &dir.join("report/classes").join(format!("{i:05}.html")));
        assert!(console.is_empty(), "console messages on class {i}: {console:#?}");
        let numbers = cells(&dom);
        assert_eq!(numbers.len(), 5, "{numbers:?}");
        for (field, _, shown, _) in numbers {
            assert_eq!(shown, class["quality"][&field].as_f64().unwrap(), "{field} of class {i}");
        }
        assert_eq!(dom.matches("class=\"block\"").count(), 2);
        assert_eq!(dom.matches("aria-label=\"sample ").count(), IPC);
        assert!(dom.contains("<svg") && dom.matches("<title>mode ").count() == IPC);
    }
    // The contact sheets carry their class and row names and are enlarged to a readable size.
    for class in classes {
        let wnid = class["wnid"].as_str().unwrap();
        let sheet = image::open(dir.join("contact_sheets").join(format!("{wnid}.png"))).unwrap();
        let layout = mgd3_common::sheet::SheetLayout::of_sheet((sheet.width(), sheet.height()), IPC as u32, 3)
            .unwrap_or_else(|| panic!("{wnid}: a sheet of {}×{}", sheet.width(), sheet.height()));
        assert!(layout.header > 0 && layout.label_width > 0 && layout.tile.0 >= 96, "{layout:?}");
        let rgb = sheet.to_rgb8();
        let ink = |x0: u32, y0: u32, w: u32, h: u32| {
            (x0..x0 + w).flat_map(|x| (y0..y0 + h).map(move |y| (x, y))).any(|(x, y)| rgb.get_pixel(x, y).0 != [255; 3])
        };
        assert!(ink(0, 0, sheet.width(), layout.header), "{wnid}: no title");
        for row in 0..3 {
            let (_, y) = layout.tile_origin(0, row);
            assert!(ink(0, y, layout.label_width, layout.tile.1), "{wnid}: no name for row {row}");
        }
    }
    // Classes outside the quality band are warned about, on the index and on their pages (the
    // tiny random-weight models give samples that do not resemble the data).
    let band = mgd3_common::manifest::band::REPRESENTATIVENESS_MAX;
    let far: Vec<&str> = classes
        .iter()
        .filter(|c| c["quality"]["representativeness_normalised"].as_f64().unwrap() > band)
        .map(|c| c["wnid"].as_str().unwrap())
        .collect();
    assert!(!far.is_empty(), "the tiny models should give at least one class outside the band");
    assert_eq!(value("warnings"), far.len() as f64, "{far:?}");
    // … and on the console of `coordinator report` (and `run`).
    assert!(report_stderr.contains(&format!("warning: {} of 3 classes fall outside the quality band", far.len())));
    for wnid in &far {
        assert!(report_stderr.contains(&format!("class `{wnid}`: samples do not resemble")), "{report_stderr}");
    }
    assert!(dom.contains("usually models that do not match the data"), "the warning says what it usually means");
    for (i, class) in classes.iter().enumerate() {
        let page = std::fs::read_to_string(dir.join("report/classes").join(format!("{i:05}.html"))).unwrap();
        let warned = page.contains("class=\"warning\"");
        assert_eq!(warned, far.contains(&class["wnid"].as_str().unwrap()), "class {i}");
    }
    // A phone-width window: nothing makes the page wider than the window (wide tables and the
    // contact-sheet blocks scroll in their own boxes).
    for page in ["index.html", "classes/00000.html"] {
        let path = dir.join("report").join(page);
        let probe = path.with_file_name("probe.html");
        let probing = "<script>addEventListener('load',function(){document.body.setAttribute('data-scroll-width',\
                       document.documentElement.scrollWidth);});</script></body>";
        std::fs::write(&probe, std::fs::read_to_string(&path).unwrap().replace("</body>", probing)).unwrap();
        let (dom, _) = browse_at(&browser, &probe, 420);
        std::fs::remove_file(&probe).unwrap();
        let width: u32 = dom.split_once("data-scroll-width=\"").unwrap().1.split('"').next().unwrap().parse().unwrap();
        assert!(width <= 420, "{page} is {width} px wide in a 420 px window");
    }
    // The check can fail: a class page whose contact sheet is gone says so on the console.
    std::fs::remove_file(dir.join("contact_sheets/c0.png")).unwrap();
    let (_, console) = browse(&browser, &dir.join("report/classes/00000.html"));
    assert!(console.iter().any(|l| l.contains("image not found") && l.contains("c0.png")), "{console:#?}");
    // A report written elsewhere carries its own contact sheets.
    let elsewhere = scratch.path().join("elsewhere");
    let out = coordinator(&["report", &job, "--job-dir", &dir_arg, "--out", &elsewhere.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::rename(&dir, scratch.path().join("moved")).unwrap();
    let (_, console) = browse(&browser, &elsewhere.join("classes/00001.html"));
    assert!(console.is_empty(), "a report elsewhere needs nothing of the job folder: {console:#?}");
    // Mistakes name what is wrong.
    let moved = scratch.path().join("moved").display().to_string();
    let out = coordinator(&["report", "wrong-id", "--job-dir", &moved]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains(&format!("is the output folder of job `{job}`, not of `wrong-id`")),
        "{text}"
    );
    let out = coordinator(&["report", &job, "--job-dir", "/no/such/jobs/folder"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`/no/such/jobs/folder` does not exist"));
    // An unfinished job: what is committed, of how many, and which classes are missing.
    std::fs::remove_file(scratch.path().join("moved/shards/c1.json")).unwrap();
    std::fs::remove_file(scratch.path().join("moved/manifest.json")).unwrap();
    let partial = scratch.path().join("partial");
    let out = coordinator(&["report", &job, "--job-dir", &moved, "--out", &partial.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index = std::fs::read_to_string(partial.join("index.html")).unwrap();
    assert!(
        index.contains(">2 of 3</td>") && index.contains("id=\"pending\" data-value=\"1\"><code>c1</code>"),
        "{index}"
    );
    assert!(index.contains("not finished"));
}

#[test]
fn export_writes_the_adm_npz_of_every_image_in_class_order() {
    let scratch = tempfile::tempdir().unwrap();
    let (dir, job) = distilled(scratch.path());
    let npz = scratch.path().join("samples.npz");
    let out =
        coordinator(&["export", &job, "--job-dir", &dir.display().to_string(), "--npz", &npz.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&npz).unwrap()).unwrap();
    assert_eq!(archive.len(), 1);
    let mut entry = archive.by_name("arr_0.npy").unwrap();
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    let first = image::open(dir.join("dataset/c0/0.png")).unwrap().to_rgb8();
    let (w, h) = first.dimensions();
    assert!(
        header.contains("'descr': '|u1'") && header.contains(&format!("'shape': ({}, {h}, {w}, 3)", 3 * IPC)),
        "{header}"
    );
    let pixels = &bytes[10 + header_len..];
    let mut expected = Vec::new();
    for wnid in ["c0", "c1", WEIRD] {
        for j in 0..IPC {
            expected.extend(
                image::open(dir.join("dataset").join(wnid).join(format!("{j}.png"))).unwrap().to_rgb8().into_raw(),
            );
        }
    }
    assert!(pixels == expected.as_slice(), "arr_0 holds every image, class by class, sample by sample");
    // An unfinished job is refused unless asked for.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let out =
        coordinator(&["export", &job, "--job-dir", &dir.display().to_string(), "--npz", &npz.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("has no manifest.json") && text.contains("--partial"), "{text}");
    let export = |npz: &Path| {
        coordinator(&[
            "export",
            &job,
            "--job-dir",
            &dir.display().to_string(),
            "--npz",
            &npz.display().to_string(),
            "--partial",
        ])
    };
    let out = export(&npz);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(
        told.contains(&format!(
            "classes in the array's order (the job's class order, images per class): c0 ({IPC}), c1 ({IPC})"
        )),
        "{told}"
    );
    // Not into the job's own ImageFolder, where it would become a file of the set.
    let inside = dir.join("dataset/c0/samples.npz");
    let out = export(&inside);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("is inside the job's folder"), "{text}");
    assert!(!inside.exists() && !inside.with_extension("npz.partial").exists());
    // Nor over its records or markers.
    let marker = dir.join("shards/c0.json");
    let before = std::fs::read(&marker).unwrap();
    let out = export(&marker);
    assert!(!out.status.success() && std::fs::read(&marker).unwrap() == before, "a marker was overwritten");
    // An image changed since its commit (another valid PNG of the same size) is not exported.
    let (first, second) = (dir.join("dataset/c0/0.png"), dir.join("dataset/c0/1.png"));
    let kept = std::fs::read(&first).unwrap();
    std::fs::copy(&second, &first).unwrap();
    let out = export(&scratch.path().join("changed.npz"));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("is not the image its commit marker records"), "{text}");
    std::fs::write(&first, kept).unwrap();
    // A failed export (an image cut short) leaves no partial file behind.
    let image = dir.join("dataset/c1/0.png");
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(&image, &bytes[..bytes.len() / 2]).unwrap();
    let failed = scratch.path().join("failed.npz");
    let out = export(&failed);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!failed.exists() && !failed.with_extension("npz.partial").exists(), "a failed export left a file");
    // A class without a commit is named as left out of a partial export.
    std::fs::remove_file(dir.join("shards/c1.json")).unwrap();
    let out = export(&failed);
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && told.contains("not in the array (no commit") && told.contains("1 class(es): c1"),
        "{told}"
    );
}

/// What `report` and `export` write never damages a job or shows what the job did not make:
/// `report --out` inside a job's folder, or into a folder of other files, is refused (it
/// overwrote another job's contact sheets and a user's index.html); a report whose images changed
/// or went missing since their commit fails naming the file (it showed another class's picture
/// under this one's name); `export --npz` onto a pipe, a link or `-` is refused, not replaced.
#[test]
fn report_and_export_refuse_targets_and_images_that_would_mislead() {
    let scratch = tempfile::tempdir().unwrap();
    let (dir, job) = distilled(scratch.path());
    let job_dir = dir.display().to_string();
    let report =
        |out: &Path| coordinator(&["report", &job, "--job-dir", &job_dir, "--out", &out.display().to_string()]);
    let sheet = dir.join("contact_sheets/c0.png");
    let sheet_before = std::fs::read(&sheet).unwrap();
    for inside in [dir.clone(), dir.join("dataset/c0"), dir.join("new-folder")] {
        let out = report(&inside);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains("the folder of mgd3 job"), "{}: {text}", inside.display());
    }
    assert!(std::fs::read(&sheet).unwrap() == sheet_before, "a contact sheet was overwritten");
    assert!(!dir.join("dataset/c0/index.html").exists() && !dir.join("new-folder").exists());
    // A folder of someone's files is not written into; an earlier report's folder is.
    let theirs = scratch.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("index.html"), "mine").unwrap();
    let out = report(&theirs);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("holds other files (`index.html`)"), "{text}");
    assert_eq!(std::fs::read_to_string(theirs.join("index.html")).unwrap(), "mine");
    let elsewhere = scratch.path().join("report");
    for _ in 0..2 {
        let out = report(&elsewhere);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // An image changed since its commit (another class's valid PNG), then one missing.
    let (image, other) = (dir.join("dataset/c0/0.png"), dir.join("dataset/c1/0.png"));
    let kept = std::fs::read(&image).unwrap();
    std::fs::copy(&other, &image).unwrap();
    let out = report(&elsewhere);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("is not the image its commit marker records"), "{text}");
    assert!(text.contains("dataset/c0/0.png") && text.contains("coordinator verify"), "{text}");
    std::fs::remove_file(&image).unwrap();
    let out = report(&elsewhere);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("dataset/c0/0.png` is missing"), "{text}");
    std::fs::write(&image, kept).unwrap();
    // A contact sheet replaced by another class's: left out of the report (in the job folder,
    // checked by its record and size; elsewhere, by its sha256), named there and on the console,
    // and by verify (the report showed it as this class's; verify did not check sheets).
    let (sheet_c0, sheet_c1) = (dir.join("contact_sheets/c0.png"), dir.join("contact_sheets/c1.png"));
    assert!(dir.join("contact_sheets/c0.json").is_file(), "the worker records each sheet");
    let verify = || coordinator(&["verify", &job, "--job-dir", &job_dir]);
    let clean = verify();
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stdout));
    // Cut (or padded) to the size c0's own sheet had: only its sha256 tells it apart.
    let mut other = std::fs::read(&sheet_c1).unwrap();
    other.resize(sheet_before.len(), 0);
    std::fs::write(&sheet_c0, &other).unwrap();
    let in_folder = coordinator(&["report", &job, "--job-dir", &job_dir]);
    for (out, folder) in [(in_folder, dir.join("report")), (report(&elsewhere), elsewhere.clone())] {
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 contact sheet(s) left out") && text.contains("class `c0`"), "{text}");
        let index = std::fs::read_to_string(folder.join("index.html")).unwrap();
        assert!(index.contains("id=\"sheets_left_out\"") && index.contains("⚠ left out"), "{index}");
        let page = std::fs::read_to_string(folder.join("classes/00000.html")).unwrap();
        assert!(page.contains("The contact sheet is left out") && !page.contains("data-sheet="), "{page}");
        let next = std::fs::read_to_string(folder.join("classes/00001.html")).unwrap();
        assert!(next.contains("data-sheet=") && !next.contains("left out"), "the other classes' sheets are shown");
    }
    assert!(!elsewhere.join("contact_sheets/c0.png").exists(), "the earlier report's copy of c0's sheet stays");
    let damaged = verify();
    let text = String::from_utf8_lossy(&damaged.stdout);
    assert!(!damaged.status.success() && text.contains("contact_sheets/c0.png"), "{text}");
    std::fs::write(&sheet_c0, &sheet_before).unwrap();
    assert!(verify().status.success());
    // A sheet lost with its record: no damage to the dataset, but said by verify and the page.
    let record_c0 = std::fs::read(dir.join("contact_sheets/c0.json")).unwrap();
    std::fs::remove_file(&sheet_c0).unwrap();
    std::fs::remove_file(dir.join("contact_sheets/c0.json")).unwrap();
    let lost = verify();
    let text = String::from_utf8_lossy(&lost.stderr);
    assert!(
        lost.status.success() && text.contains("1 committed class(es) have no contact sheet") && text.contains(": c0"),
        "{text}"
    );
    let out = coordinator(&["report", &job, "--job-dir", &job_dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = std::fs::read_to_string(dir.join("report/classes/00000.html")).unwrap();
    assert!(page.contains("⚠ No contact sheet: the attempt that committed this class made one"), "{page}");
    std::fs::write(&sheet_c0, &sheet_before).unwrap();
    std::fs::write(dir.join("contact_sheets/c0.json"), record_c0).unwrap();
    assert!(verify().status.success());
    // Export onto what is not a regular file.
    let fifo = scratch.path().join("fifo.npz");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let link = scratch.path().join("link.npz");
    std::os::unix::fs::symlink(scratch.path().join("nowhere.npz"), &link).unwrap();
    for (target, what) in [(fifo.clone(), "a device, pipe or socket"), (link.clone(), "a symbolic link")] {
        let out = coordinator(&["export", &job, "--job-dir", &job_dir, "--npz", &target.display().to_string()]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(what), "{text}");
    }
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo() && link.is_symlink());
    let out = coordinator(&["export", &job, "--job-dir", &job_dir, "--npz", "-"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("standard output"));
    // A job's folder under another job's id (folders swapped or renamed): verify says whose it is
    // (it said "0 problem(s)").
    let other = "other-0123456789ab";
    let renamed = dir.parent().unwrap().join(other);
    std::fs::rename(&dir, &renamed).unwrap();
    let out = coordinator(&["verify", other, "--job-dir", &renamed.display().to_string()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains(&format!("holds job `{job}`'s records, not `{other}`'s")), "{text}");
    assert!(!text.contains("resume"), "verify advised a repair of another job's folder: {text}");
}

/// A job that failed before committing any class still gets its report, with its failures:
/// where a person looks first to see why (it was refused as "holds no commit marker"). Export
/// of it says there is nothing to export.
#[test]
fn a_job_that_failed_with_nothing_committed_is_reported_with_its_failures() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    std::fs::create_dir_all(data.join("c0")).unwrap();
    std::fs::write(data.join("c0").join("0.png"), b"not a picture").unwrap();
    let out = scratch.path().join("out");
    let text = spec(&data.display().to_string(), &out.display().to_string(), 1, 1, 7, "")
        .replace("max_attempts = 4", "max_attempts = 1");
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, text).unwrap();
    let run = Command::new(bin("coordinator"))
        .args(["run", spec_path.to_str().unwrap(), "--local-workers", "1", "--worker-arg=--threads=1", "--no-report"])
        .output()
        .unwrap();
    assert!(!run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let job = std::fs::read_dir(out.join("jobs")).unwrap().next().unwrap().unwrap().file_name();
    let job = job.to_string_lossy().into_owned();
    let dir = out.join("jobs").join(&job).display().to_string();
    let report = coordinator(&["report", &job, "--job-dir", &dir]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let index = std::fs::read_to_string(out.join("jobs").join(&job).join("report/index.html")).unwrap();
    assert!(index.contains("0.png"), "the failure is not shown:\n{index}");
    let export = coordinator(&["export", &job, "--job-dir", &dir, "--npz", "x.npz", "--partial"]);
    let text = String::from_utf8_lossy(&export.stderr);
    assert!(!export.status.success() && text.contains("holds no commit marker"), "{text}");
}
