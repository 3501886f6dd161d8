//! `folder:DIR`: JPEG and PNG images in one directory per class, torchvision's ImageFolder
//! convention, decoded (resized, centre-cropped) into u8 CHW once when records are loaded.
//!
//! Two layouts:
//! - `DIR/train/<class>/...` with `DIR/test/<class>/...` or `DIR/val/<class>/...` beside it;
//! - a single tree `DIR/<class>/...`, split into train and test by a seeded hash of each
//!   file's path (`test_percent`, `split_seed`).
//!
//! Classes are the training tree's subdirectories in sorted order, numbered from 0 as
//! torchvision numbers them; the test tree is numbered by the same list. Records are ordered
//! by a hash of their path within the split, not by class: the validation hold-out (the end
//! of the training split), the calibration images (its start) and every shard then hold
//! every class, and the order depends on the file names alone, not on the file system.

use std::fmt;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageReader};

use super::{check_dir, Dataset, Split};
use crate::{Error, Result};

/// File extensions read as images (case-insensitive); other files are skipped.
const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];
/// Labels are bytes.
const MAX_CLASSES: usize = 256;
const DEFAULT_TEST_PERCENT: u8 = 20;

/// Channel order of decoded images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Channels {
    /// Red, green, blue (3 channels): what torchvision and PIL give.
    #[default]
    Rgb,
    /// Blue, green, red (3 channels): what OpenCV gives.
    Bgr,
    /// One luma channel (the `image` crate's conversion: Rec. 709 weights).
    Gray,
}

impl Channels {
    fn count(self) -> usize {
        match self {
            Channels::Rgb | Channels::Bgr => 3,
            Channels::Gray => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Channels::Rgb => "rgb",
            Channels::Bgr => "bgr",
            Channels::Gray => "gray",
        }
    }
}

/// How a `folder:` dataset's images become the model's input: written as the options of
/// the data source, e.g. `folder:photos?resize=36&crop=32`.
///
/// Without `resize` and `crop` every image must already have the size of the split's first
/// record. The pixels stay raw (0–255); mean and standard deviation are the model's input
/// normalisation (`[model] mean`, `std`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FolderOptions {
    /// `resize=N`: scale so that the shorter side is N pixels (the longer one
    /// `floor(N * long / short)`, as torchvision's `Resize(N)`), bilinear with
    /// antialiasing.
    pub resize: Option<u32>,
    /// `crop=N` or `crop=HxW`: centre crop to height × width after resizing (offsets as
    /// torchvision's `CenterCrop`). An image smaller than the crop is an error.
    pub crop: Option<(u32, u32)>,
    /// `channels=rgb|bgr|gray` (default rgb).
    pub channels: Channels,
    /// `test_percent=P`: in a single tree, the share of files held out as the test split
    /// (default 20).
    pub test_percent: Option<u8>,
    /// `split_seed=S`: in a single tree, the seed of the train/test split (default 0).
    pub split_seed: Option<u64>,
}

impl FolderOptions {
    /// Sets one `KEY=VALUE` option; the error is the reason, for the caller to place.
    pub(super) fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let positive = |v: &str| match v.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("expected a positive number of pixels, not '{v}'")),
        };
        match key {
            "resize" => self.resize = Some(positive(value)?),
            "crop" => {
                self.crop = Some(match value.split_once('x') {
                    Some((h, w)) => (positive(h)?, positive(w)?),
                    None => {
                        let n = positive(value)?;
                        (n, n)
                    }
                })
            }
            "channels" => {
                self.channels = match value {
                    "rgb" => Channels::Rgb,
                    "bgr" => Channels::Bgr,
                    "gray" => Channels::Gray,
                    _ => return Err("expected rgb, bgr or gray".into()),
                }
            }
            "test_percent" => match value.parse::<u8>() {
                Ok(p) if (1..=99).contains(&p) => self.test_percent = Some(p),
                _ => return Err("expected a whole percentage from 1 to 99".into()),
            },
            "split_seed" => {
                self.split_seed = Some(
                    value
                        .parse()
                        .map_err(|_| format!("expected an unsigned integer, not '{value}'"))?,
                )
            }
            _ => {
                return Err(
                    "unknown option for folder: (expected resize, crop, channels, \
                     test_percent or split_seed)"
                        .into(),
                )
            }
        }
        Ok(())
    }
}

impl fmt::Display for FolderOptions {
    /// The options that differ from the defaults, in a fixed order, `&`-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.resize {
            parts.push(format!("resize={n}"));
        }
        if let Some((h, w)) = self.crop {
            parts.push(format!("crop={h}x{w}"));
        }
        if self.channels != Channels::default() {
            parts.push(format!("channels={}", self.channels.name()));
        }
        if let Some(p) = self.test_percent {
            parts.push(format!("test_percent={p}"));
        }
        if let Some(s) = self.split_seed {
            parts.push(format!("split_seed={s}"));
        }
        f.write_str(&parts.join("&"))
    }
}

/// One image file and its class.
struct Record {
    path: PathBuf,
    label: u8,
}

/// The records of one split, in their fixed order.
pub(super) struct Index {
    records: Vec<Record>,
    classes: usize,
}

/// `split`'s record count, from the directory listing alone.
pub(super) fn split_len(dir: &Path, options: &FolderOptions, split: Split) -> Result<usize> {
    Ok(Index::open(dir, options, split)?.len())
}

impl Index {
    /// Lists `split`'s files and orders them. Nothing is decoded.
    pub(super) fn open(dir: &Path, options: &FolderOptions, split: Split) -> Result<Index> {
        check_dir(dir)?;
        let train = dir.join("train");
        if train.is_dir() {
            if options.test_percent.is_some() || options.split_seed.is_some() {
                return Err(Error::DataFile {
                    path: dir.to_path_buf(),
                    reason: "test_percent and split_seed split a single tree of class \
                             directories, but this directory has train/ (and its own test \
                             split): drop the options"
                        .into(),
                });
            }
            let classes = class_dirs(&train)?;
            let root = match split {
                Split::Train => train,
                Split::Test => ["test", "val"]
                    .iter()
                    .map(|name| dir.join(name))
                    .find(|p| p.is_dir())
                    .ok_or_else(|| Error::DataFile {
                        path: dir.to_path_buf(),
                        reason: "has train/ but neither test/ nor val/ beside it".into(),
                    })?,
            };
            let mut records = Vec::new();
            for (name, path) in class_dirs(&root)? {
                let label = classes
                    .iter()
                    .position(|(n, _)| *n == name)
                    .ok_or_else(|| Error::DataFile {
                        path: path.clone(),
                        reason: format!(
                            "class '{name}' is not a class of {} (the training classes \
                             number the labels)",
                            dir.join("train").display()
                        ),
                    })?;
                list_images(&path, &root, label as u8, &mut records)?;
            }
            Ok(Index {
                records: ordered(records, &root, 0),
                classes: classes.len(),
            })
        } else {
            let classes = class_dirs(dir)?;
            let mut records = Vec::new();
            for (label, (_, path)) in classes.iter().enumerate() {
                list_images(path, dir, label as u8, &mut records)?;
            }
            let seed = options.split_seed.unwrap_or(0);
            let mut records = ordered(records, dir, seed);
            let percent = options.test_percent.unwrap_or(DEFAULT_TEST_PERCENT) as usize;
            let test = (records.len() * percent + 50) / 100;
            let train_len = records.len() - test;
            if train_len == 0 || test == 0 {
                return Err(Error::DataFile {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "{} images cannot be split {}/{percent} into a training and a test \
                         split that both hold images",
                        records.len(),
                        100 - percent
                    ),
                });
            }
            let records = match split {
                Split::Train => {
                    records.truncate(train_len);
                    records
                }
                Split::Test => records.split_off(train_len),
            };
            Ok(Index {
                records,
                classes: classes.len(),
            })
        }
    }

    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// Classes of the training tree, which numbers the labels of both splits.
    pub(super) fn classes(&self) -> usize {
        self.classes
    }

    /// Decodes the records in `range` (global indices of the split, already checked).
    /// Without a crop every image must have the size of the split's record 0.
    pub(super) fn load(&self, options: &FolderOptions, range: Range<usize>) -> Result<Dataset> {
        // Without a crop, record 0 of the split sets the size, whichever shard is loaded.
        let first = self
            .records
            .first()
            .map_or(Path::new(""), |r| r.path.as_path());
        let (height, width) = match options.crop {
            Some(hw) => hw,
            None if self.records.is_empty() => (0, 0),
            None => {
                let img = decode(first, options)?;
                (img.height(), img.width())
            }
        };
        let channels = options.channels.count();
        let image_len = channels * height as usize * width as usize;
        let records = &self.records[range.clone()];
        let mut images = vec![0u8; records.len() * image_len];
        // Decoding dominates loading; images are independent, so they are decoded on every
        // core, each into its own slot, and the first error in record order is reported.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = records.len().div_ceil(threads).max(1);
        let errors: Vec<Error> = std::thread::scope(|scope| {
            let workers: Vec<_> = records
                .chunks(per_thread)
                .zip(images.chunks_mut((per_thread * image_len).max(1)))
                .map(|(recs, out)| {
                    scope.spawn(move || -> Result<()> {
                        for (rec, pixels) in recs.iter().zip(out.chunks_mut(image_len.max(1))) {
                            let img = decode(&rec.path, options)?;
                            if (img.height(), img.width()) != (height, width) {
                                return Err(Error::DataFile {
                                    path: rec.path.clone(),
                                    reason: format!(
                                        "image is {}x{} (height x width) after resizing, \
                                         the split's first image ({}) {height}x{width}: \
                                         give the data source resize= and crop= options",
                                        img.height(),
                                        img.width(),
                                        first.display()
                                    ),
                                });
                            }
                            to_chw(&img, options.channels, pixels);
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .filter_map(|w| w.join().expect("an image decoder thread panicked").err())
                .collect()
        });
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        Ok(Dataset {
            channels,
            height: height as usize,
            width: width as usize,
            num_classes: self.classes,
            images,
            labels: records.iter().map(|r| r.label).collect(),
            first_index: range.start,
        })
    }
}

/// Subdirectories of `dir` as `(name, path)`, sorted by name (torchvision's class order);
/// names starting with '.' are skipped. At least one, at most 256.
fn class_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut classes = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| Error::DataFile {
                path: path.clone(),
                reason: "class directory name is not UTF-8".into(),
            })?;
        if !name.starts_with('.') {
            classes.push((name, path));
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(Error::DataFile {
            path: dir.to_path_buf(),
            reason: "no class directories: expected one subdirectory of images per class".into(),
        });
    }
    if classes.len() > MAX_CLASSES {
        return Err(Error::DataFile {
            path: dir.to_path_buf(),
            reason: format!(
                "{} class directories; ccq's labels are bytes, so at most {MAX_CLASSES}",
                classes.len()
            ),
        });
    }
    Ok(classes)
}

/// Appends every image file under `class_dir` (recursively) with `label`. A class without
/// images is an error: it would shift nothing, but it is almost always a mistake.
fn list_images(class_dir: &Path, root: &Path, label: u8, out: &mut Vec<Record>) -> Result<()> {
    let before = out.len();
    let mut pending = vec![class_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if is_image(&path) {
                out.push(Record { path, label });
            }
        }
    }
    if out.len() == before {
        return Err(Error::DataFile {
            path: class_dir.to_path_buf(),
            reason: format!(
                "class directory holds no images (.jpg, .jpeg or .png) under {}",
                root.display()
            ),
        });
    }
    Ok(())
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Records sorted by a seeded hash of their path relative to `root` (with '/' separators,
/// so the order is the same on every system), ties by the path.
fn ordered(records: Vec<Record>, root: &Path, seed: u64) -> Vec<Record> {
    let mut keyed: Vec<(u64, String, Record)> = records
        .into_iter()
        .map(|r| {
            let rel = r.path.strip_prefix(root).unwrap_or(&r.path);
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            (path_hash(seed, &rel), rel, r)
        })
        .collect();
    keyed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    keyed.into_iter().map(|(_, _, r)| r).collect()
}

/// FNV-1a over the seed's bytes and the path, finished with a 64-bit mix so that paths
/// differing in their last byte still spread over the whole range.
fn path_hash(seed: u64, path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(path.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// Decodes one file, resizes and centre-crops it as `options` say.
fn decode(path: &Path, options: &FolderOptions) -> Result<DynamicImage> {
    let bad = |reason: String| Error::DataFile {
        path: path.to_path_buf(),
        reason,
    };
    let img = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let img = match options.resize {
        Some(side) => {
            let (w, h) = img.dimensions();
            let (short, long) = (w.min(h) as u64, w.max(h) as u64);
            let other = (side as u64 * long / short.max(1)).max(1) as u32;
            let (nw, nh) = if w <= h { (side, other) } else { (other, side) };
            img.resize_exact(nw, nh, FilterType::Triangle)
        }
        None => img,
    };
    match options.crop {
        Some((ch, cw)) => {
            let (w, h) = img.dimensions();
            if ch > h || cw > w {
                return Err(bad(format!(
                    "image is {h}x{w} (height x width) after resizing, smaller than the \
                     {ch}x{cw} crop"
                )));
            }
            Ok(img.crop_imm(centre(w, cw), centre(h, ch), cw, ch))
        }
        None => Ok(img),
    }
}

/// torchvision's crop offset `int(round((size - crop) / 2))`: Python rounds halves to even.
fn centre(size: u32, crop: u32) -> u32 {
    let d = size - crop;
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Writes `img`'s pixels into `out` as CHW planar bytes in `channels` order.
fn to_chw(img: &DynamicImage, channels: Channels, out: &mut [u8]) {
    let plane = (img.width() * img.height()) as usize;
    match channels {
        Channels::Gray => out.copy_from_slice(img.to_luma8().as_raw()),
        Channels::Rgb | Channels::Bgr => {
            let rgb = img.to_rgb8();
            for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                for (c, &v) in px.iter().enumerate() {
                    let c = if channels == Channels::Bgr { 2 - c } else { c };
                    out[c * plane + i] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_crop_offsets_round_halves_to_even_as_torchvision() {
        // int(round((size - crop) / 2.0)) in Python.
        for (size, crop, want) in [
            (32, 32, 0),
            (33, 32, 0),
            (35, 32, 2),
            (37, 32, 2),
            (36, 32, 2),
            (39, 32, 4),
        ] {
            assert_eq!(centre(size, crop), want, "size {size} crop {crop}");
        }
    }

    #[test]
    fn options_round_trip_through_their_string() {
        let mut o = FolderOptions::default();
        for (k, v) in [
            ("resize", "36"),
            ("crop", "24x32"),
            ("channels", "bgr"),
            ("test_percent", "10"),
            ("split_seed", "7"),
        ] {
            o.set(k, v).unwrap();
        }
        assert_eq!(
            o.to_string(),
            "resize=36&crop=24x32&channels=bgr&test_percent=10&split_seed=7"
        );
        let mut p = FolderOptions::default();
        for kv in o.to_string().split('&') {
            let (k, v) = kv.split_once('=').unwrap();
            p.set(k, v).unwrap();
        }
        assert_eq!(o, p);
        assert_eq!(FolderOptions::default().to_string(), "");
    }

    #[test]
    fn bad_options_say_what_is_expected() {
        let mut o = FolderOptions::default();
        assert!(o.set("resize", "0").unwrap_err().contains("positive"));
        assert!(o.set("crop", "32x").unwrap_err().contains("positive"));
        assert!(o
            .set("channels", "rgba")
            .unwrap_err()
            .contains("rgb, bgr or gray"));
        assert!(o
            .set("test_percent", "100")
            .unwrap_err()
            .contains("1 to 99"));
        assert!(o.set("split_seed", "-1").unwrap_err().contains("unsigned"));
        assert!(o.set("size", "32").unwrap_err().contains("unknown option"));
        assert_eq!(
            o,
            FolderOptions::default(),
            "a refused option changes nothing"
        );
    }

    #[test]
    fn path_order_depends_on_the_seed_and_mixes_neighbours() {
        let a: Vec<u64> = (0..8)
            .map(|i| path_hash(0, &format!("cat/{i}.png")))
            .collect();
        let b: Vec<u64> = (0..8)
            .map(|i| path_hash(1, &format!("cat/{i}.png")))
            .collect();
        assert_ne!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_ne!(a, sorted, "consecutive names do not come out in name order");
    }
}
