//! The MGD³ paper's Figure 2 through the real sampler (`cargo run --release -p mgd3-worker
//! --example mode_coverage [OUT.png]`): an imbalanced 4-Gaussian mixture with an exact denoiser;
//! plain sampling (left) piles onto the dominant mode, mode-guided sampling (right) covers all four.
//! Prints coverage for several λ / t_stop and with k-means-found modes; draws docs/mode_coverage.png.

use image::{Rgb, RgbImage};
use mgd3_common::job::SamplingSpec;
use mgd3_worker::toy::{Mixture, ModeSource, coverage_experiment, sample_points};

const SIDE: u32 = 360;

fn plot(img: &mut RgbImage, x0: u32, point: &[f32], color: Rgb<u8>, radius: i32) {
    let to_px = |v: f32| ((v + 5.0) / 10.0 * SIDE as f32) as i32;
    let (cx, cy) = (to_px(point[0]) + x0 as i32, SIDE as i32 - to_px(point[1]));
    for dx in -radius..=radius {
        for dy in -radius..=radius {
            let (x, y) = (cx + dx, cy + dy);
            if dx * dx + dy * dy <= radius * radius
                && x >= x0 as i32
                && x < (x0 + SIDE) as i32
                && y >= 0
                && y < SIDE as i32
            {
                img.put_pixel(x as u32, y as u32, color);
            }
        }
    }
}

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| "docs/mode_coverage.png".into());
    let mixture = Mixture::imbalanced_square();
    println!("mixture: 4 Gaussians at (±3, ±3), weights {:?}, std {}", mixture.weights, mixture.std);
    println!("samples on the mode they were guided to, IPC 4, 10 seeds (plain sampling ≈ 10/40 by chance):");
    for (lambda, t_stop) in [(0.1, 25), (0.1, 10), (0.3, 25), (0.3, 10), (1.0, 25)] {
        for source in [ModeSource::TrueMeans, ModeSource::KMeans] {
            let (mut on_mode, mut covered, mut plain_covered) = (0, 0, 0);
            for seed in 0..10 {
                let r = coverage_experiment(&mixture, 4, seed, source, lambda, t_stop);
                on_mode +=
                    r.guided.iter().zip(&r.modes).filter(|(p, m)| mixture.nearest(p) == mixture.nearest(m)).count();
                covered += r.guided_counts.iter().filter(|c| **c > 0).count();
                plain_covered += r.unguided_counts.iter().filter(|c| **c > 0).count();
            }
            println!(
                "  λ {lambda:<4} t_stop {t_stop:<3} modes {source:<9?}: {on_mode:>2}/40 on their mode, {covered:>2}/40 modes covered (plain sampling: {plain_covered}/40)"
            );
        }
    }
    let n = 40;
    let plain =
        SamplingSpec { guidance_scale: 0.0, stop_guidance: 50, cfg_scale: 1.0, cfg_channels: 0, ..Default::default() };
    let guided =
        SamplingSpec { guidance_scale: 0.3, stop_guidance: 10, cfg_scale: 1.0, cfg_channels: 0, ..Default::default() };
    let modes: Vec<Vec<f32>> = mixture.means.iter().map(|m| m.iter().map(|v| *v as f32).collect()).collect();
    let unguided_points = sample_points(&mixture, &[], plain, n, 7);
    let guided_points = sample_points(&mixture, &modes, guided, n, 7);
    let mut img = RgbImage::from_pixel(2 * SIDE + 10, SIDE, Rgb([255, 255, 255]));
    for y in 0..SIDE {
        for x in 0..10 {
            img.put_pixel(SIDE + x, y, Rgb([200, 200, 200]));
        }
    }
    for (panel, points, color) in
        [(0, &unguided_points, Rgb([220, 40, 40])), (SIDE + 10, &guided_points, Rgb([30, 90, 220]))]
    {
        for p in mixture.draw(1500, 1) {
            plot(&mut img, panel, &[p[0] as f32, p[1] as f32], Rgb([190, 190, 190]), 1);
        }
        for m in &modes {
            plot(&mut img, panel, m, Rgb([0, 0, 0]), 5);
        }
        for p in points.iter() {
            plot(&mut img, panel, p, color, 3);
        }
    }
    img.save(&out).expect("write the figure");
    let on_dominant = unguided_points.iter().filter(|p| mixture.nearest(p) == 0).count();
    println!(
        "figure: {out} (left: plain sampling, {on_dominant}/{n} samples on the dominant mode; right: mode guidance λ 0.3, t_stop 10, 10 samples guided to each black mode)"
    );
}
