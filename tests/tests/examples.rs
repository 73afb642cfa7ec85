//! The job files in `examples/` that the README points to parse, validate and resolve to the
//! paper's settings and the class lists and DiT labels of the MGD³ reference
//! (`misc/class_nette.txt`, `misc/class_woof.txt`, all 1,000 synsets in sorted order).

use std::path::{Path, PathBuf};

use mgd3_common::job::{ClassRef, JobSpec, SamplerKind};

fn example(name: &str) -> (PathBuf, JobSpec) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut spec = JobSpec::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    spec.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    spec.resolve_paths(path.parent().unwrap());
    (path, spec)
}

fn classes(spec: &JobSpec) -> Vec<ClassRef> {
    spec.class_list(|| panic!("a named subset needs no folder listing")).unwrap()
}

/// The paper's sampling settings: DiT-XL/2's 50 DDPM steps, CFG 4 on 3 channels, λ 0.1, t_stop 25.
fn assert_paper_settings(name: &str, spec: &JobSpec) {
    let s = &spec.sampling;
    assert_eq!((s.steps, s.stop_guidance, s.cfg_channels, s.sampler), (50, 25, 3, SamplerKind::Ddpm), "{name}");
    assert_eq!((s.guidance_scale, s.cfg_scale), (0.1, 4.0), "{name}");
    assert_eq!((spec.ipc, spec.seed), (10, 0), "{name}");
}

#[test]
fn the_imagenet_examples_are_the_papers_jobs() {
    let cases: [(&str, usize, &[i64]); 3] = [
        ("imagenette-ipc10.toml", 10, &[0, 217, 482, 491, 497, 566, 569, 571, 574, 701]),
        ("imagewoof-ipc10.toml", 10, &[155, 159, 162, 167, 182, 193, 207, 229, 258, 273]),
        ("imagenet1k-ipc10.toml", 1000, &[]),
    ];
    for (name, count, labels) in cases {
        let (path, spec) = example(name);
        assert_paper_settings(name, &spec);
        let classes = classes(&spec);
        assert_eq!(classes.len(), count, "{name}");
        let got: Vec<i64> = classes.iter().map(|c| c.label).collect();
        if labels.is_empty() {
            assert_eq!(got, (0..1000).collect::<Vec<i64>>(), "{name}: every synset at its sorted index");
            assert_eq!(classes[0].wnid, "n01440764");
        } else {
            assert_eq!(got, labels, "{name}");
        }
        // Relative paths resolve against the example's folder, as a user's copy would.
        let dataset = Path::new(&spec.dataset);
        assert!(dataset.is_absolute() && dataset.ends_with("data/imagenet/train"), "{name}: {}", spec.dataset);
        let _ = path;
        assert!(Path::new(&spec.models.dit).ends_with("models/dit.onnx"), "{name}");
    }
}

#[test]
fn the_quick_start_example_parses() {
    let (_, spec) = example("fashion-mnist.toml");
    let folders: Vec<String> = (0..10).map(|i| format!("{i:02}_class")).collect();
    let classes = spec.class_list(|| Ok(folders.clone())).unwrap();
    assert_eq!(classes.len(), 10);
    assert_eq!(spec.ipc, 10);
}

#[test]
fn the_sweep_examples_expand_to_the_papers_ablation_and_the_demo_grid() {
    use mgd3_common::sweep::Sweep;
    let read = |name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
        Sweep::parse(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}")).unwrap()
    };
    let tstop = read("imagenette-tstop-sweep.toml");
    let stops: Vec<usize> = tstop.variants.iter().map(|v| v.spec.sampling.stop_guidance).collect();
    assert_eq!(stops, (0..=50).step_by(5).collect::<Vec<_>>(), "Appendix A: 50 → 0 in steps of 5");
    for variant in &tstop.variants {
        let mut spec = variant.spec.clone();
        spec.sampling.stop_guidance = 25;
        let (_, paper) = example("imagenette-ipc10.toml");
        assert_paper_settings("imagenette-tstop-sweep.toml", &spec);
        assert_eq!(spec.classes, paper.classes);
    }
    let demo = read("fashion-mnist-sweep.toml");
    assert_eq!(demo.variants.len(), 9);
    assert_eq!(demo.variants[4].label(), "guidance_scale=0.1 stop_guidance=25");
    let (_, quick) = example("fashion-mnist.toml");
    let mut middle = demo.variants[4].spec.clone();
    middle.latent_cache = None;
    middle.resolve_paths(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").as_path());
    assert_eq!(middle, quick, "the middle of the demo grid is the quick-start job");
}
