//! The worker's preprocessing against Pillow itself: `tests/fixtures/pillow` holds lossless
//! inputs and Pillow's `center_crop_arr` output for each (scripts/make_pillow_goldens.py); the
//! crop must be the same bytes. Covers BOX halvings, bicubic down- and up-scaling, odd sizes,
//! grayscale and an input already at the target size.

use std::path::{Path, PathBuf};

use mgd3_worker::data;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pillow")
}

#[test]
fn center_crop_matches_pillow_byte_for_byte() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let target = case["target"].as_u64().unwrap() as usize;
        let channels = if case["mode"] == "L" { 1 } else { 3 };
        let input = fixtures().join(format!("{name}.png"));
        let pixels = data::load(&input, channels).unwrap();
        let want_path = fixtures().join(format!("{name}.crop{target}.png"));
        let want = data::load(&want_path, channels).unwrap();
        let got = data::center_crop(&pixels, target);
        assert_eq!((got.width, got.height), (target, target), "{name}");
        let differing = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} of {} bytes differ from Pillow", want.data.len());
        assert_eq!(got, want, "{}", Path::new(name).display());
    }
}
