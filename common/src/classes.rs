//! ImageNet-1K class lists shipped with the project: the 1000 synsets in the sorted order that
//! defines DiT's labels, their names, and the named subsets used by the MGD³ paper.

use thiserror::Error;

const IMAGENET1K: &str = include_str!("../data/class_indices.txt");
const IMAGENET1K_NAMES: &str = include_str!("../data/class_names.txt");
const IMAGENETTE: &str = include_str!("../data/class_nette.txt");
const IMAGEWOOF: &str = include_str!("../data/class_woof.txt");
const IMAGENET100: &str = include_str!("../data/class100.txt");

/// Errors of the class-list lookups.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClassListError {
    /// [`named_subset`] was given a name that is not one of the shipped subsets.
    #[error("unknown class subset `{0}` (expected imagenet1k, imagenette, imagewoof, imagenet100 or imageidc)")]
    UnknownSubset(String),
    /// The wnid is not among the 1000 ImageNet-1K synsets.
    #[error("`{0}` is not an ImageNet-1K synset (wnid)")]
    UnknownWnid(String),
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// The 1000 ImageNet-1K wnids; the position of a wnid is its DiT class label.
pub fn imagenet1k() -> Vec<&'static str> {
    lines(IMAGENET1K).collect()
}

/// Human-readable name of ImageNet-1K label `label` (`None` beyond 999).
pub fn imagenet1k_name(label: usize) -> Option<&'static str> {
    lines(IMAGENET1K_NAMES).nth(label)
}

/// DiT label (sorted-synset index) of an ImageNet-1K wnid.
///
/// # Errors
/// [`ClassListError::UnknownWnid`] when `wnid` is not an ImageNet-1K synset.
pub fn imagenet1k_label(wnid: &str) -> Result<usize, ClassListError> {
    lines(IMAGENET1K).position(|w| w == wnid).ok_or_else(|| ClassListError::UnknownWnid(wnid.to_owned()))
}

/// A named subset as (wnid, DiT label) pairs in the order of the reference spec files:
/// `imagenet1k`, `imagenette`, `imagewoof`, `imagenet100`, or `imageidc` (the first 10 classes of
/// `imagenet100`).
///
/// # Errors
/// [`ClassListError::UnknownSubset`] for any other name.
pub fn named_subset(name: &str) -> Result<Vec<(&'static str, usize)>, ClassListError> {
    let wnids: Vec<&'static str> = match name {
        "imagenet1k" => imagenet1k(),
        "imagenette" => lines(IMAGENETTE).collect(),
        "imagewoof" => lines(IMAGEWOOF).collect(),
        "imagenet100" => lines(IMAGENET100).collect(),
        "imageidc" => lines(IMAGENET100).take(10).collect(),
        other => return Err(ClassListError::UnknownSubset(other.to_owned())),
    };
    wnids.into_iter().map(|w| imagenet1k_label(w).map(|label| (w, label))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet1k_is_sorted_and_complete() {
        let all = imagenet1k();
        assert_eq!(all.len(), 1000);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(imagenet1k_name(0), Some("tench, Tinca tinca"));
        assert!(imagenet1k_name(999).is_some());
    }

    #[test]
    fn subsets_map_to_the_reference_labels() {
        let labels = |n| named_subset(n).unwrap().into_iter().map(|(_, l)| l).collect::<Vec<_>>();
        assert_eq!(labels("imagenette"), [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]);
        assert_eq!(labels("imagewoof"), [155, 159, 162, 167, 182, 193, 207, 229, 258, 273]);
        assert_eq!(labels("imageidc"), [15, 45, 54, 57, 64, 74, 90, 99, 119, 120]);
        let in100 = labels("imagenet100");
        assert_eq!(in100.len(), 100);
        assert_eq!(in100[99], 994);
        assert!(matches!(named_subset("imagenet7"), Err(ClassListError::UnknownSubset(_))));
    }
}
