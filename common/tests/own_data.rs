//! Bring-your-own data: `folder:` image trees and `npy:` arrays, on small files written here
//! with known pixels, and every way such a dataset can be wrong.

use std::fs;
use std::path::{Path, PathBuf};

use ccq_common::data::{self, Channels, DataFormat, DataSource, Dataset, NpyLayout, Split};
use ccq_common::Error;
use image::{ImageFormat, Rgb, RgbImage};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------
// Fixtures

/// A `w`×`h` image whose every pixel tells its class, its number within the class and its
/// position, so that a misplaced, mislabelled or transposed image cannot match.
fn pattern(class: u8, k: u8, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([class * 40, k * 10 + (x as u8), y as u8 * 3 + 1])
    })
}

fn save(img: &RgbImage, path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// `root/<class>/<k>.png` for `counts[class]` images per class of `w`×`h`.
fn write_tree(root: &Path, classes: &[&str], counts: &[u8], w: u32, h: u32) {
    for (c, (name, &n)) in classes.iter().zip(counts).enumerate() {
        for k in 0..n {
            save(
                &pattern(c as u8, k, w, h),
                &root.join(name).join(format!("{k}.png")),
            );
        }
    }
}

fn source(spec: &str, dir: &Path) -> DataSource {
    let (format, options) = spec.split_once('?').unwrap_or((spec, ""));
    let sep = if options.is_empty() { "" } else { "?" };
    format!("{format}:{}{sep}{options}", dir.display())
        .parse()
        .unwrap()
}

/// The CHW planes of `img` as the loader must produce them.
fn chw(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    for c in 0..3 {
        out.extend(img.pixels().map(|p| p.0[c]));
    }
    out
}

/// Which (class, k) an image of the fixture pattern is, read from its first pixel.
fn identify(d: &Dataset, i: usize) -> (u8, u8) {
    let img = d.image(i);
    let plane = d.height * d.width;
    (img[0] / 40, img[plane] / 10)
}

fn expect_data_file(r: ccq_common::Result<impl std::fmt::Debug>, path: &Path, words: &str) {
    match r {
        Err(Error::DataFile { path: p, reason }) => {
            assert_eq!(p, path, "the error names the file at fault ({reason})");
            assert!(reason.contains(words), "'{reason}' should say '{words}'");
        }
        other => panic!(
            "expected a DataFile error naming {}, got {other:?}",
            path.display()
        ),
    }
}

// ---------------------------------------------------------------------------------------
// folder:

#[test]
fn folder_with_train_and_val_loads_exact_pixels_and_torchvision_labels() {
    let tmp = TempDir::new().unwrap();
    // Created out of order: classes are numbered by sorted name, not creation.
    write_tree(
        &tmp.path().join("train"),
        &["zebra", "cat", "dog"],
        &[3, 4, 5],
        6,
        5,
    );
    write_tree(&tmp.path().join("val"), &["zebra", "cat"], &[2, 1], 6, 5);
    let s = source("folder", tmp.path());
    assert_eq!(data::split_len(&s, Split::Train).unwrap(), 12);
    assert_eq!(data::split_len(&s, Split::Test).unwrap(), 3);

    let train = data::load(&s, Split::Train, None).unwrap();
    assert_eq!((train.channels, train.height, train.width), (3, 5, 6));
    assert_eq!(train.num_classes, 3);
    let mut seen = Vec::new();
    for i in 0..train.len() {
        let (pattern_class, k) = identify(&train, i);
        // The fixture wrote "zebra" as pattern class 0, "cat" 1, "dog" 2; sorted: cat 0, dog 1, zebra 2.
        let label = [2, 0, 1][pattern_class as usize];
        assert_eq!(train.labels[i], label, "record {i}");
        assert_eq!(
            train.image(i),
            chw(&pattern(pattern_class, k, 6, 5)),
            "record {i}"
        );
        seen.push((pattern_class, k));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 12, "every file exactly once");
    // Records are not grouped by class: the first half holds more than one class.
    let first: std::collections::BTreeSet<u8> = train.labels[..6].iter().copied().collect();
    assert!(first.len() > 1, "class-sorted order: {:?}", train.labels);

    // The test split is numbered by the training classes.
    let test = data::load(&s, Split::Test, None).unwrap();
    let mut labels = test.labels.clone();
    labels.sort();
    assert_eq!(labels, vec![0, 2, 2]);
}

#[test]
fn folder_ranges_equal_slices_of_the_whole_split_and_the_order_is_stable() {
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a", "b"], &[7, 6], 4, 4);
    write_tree(&tmp.path().join("test"), &["a", "b"], &[1, 1], 4, 4);
    let s = source("folder", tmp.path());
    let whole = data::load(&s, Split::Train, None).unwrap();
    for range in [0..13, 0..5, 5..13, 3..4, 13..13] {
        let part = data::load(&s, Split::Train, Some(range.clone())).unwrap();
        assert_eq!(part.first_index, range.start);
        assert_eq!(part.labels, whole.labels[range.clone()]);
        assert_eq!(part.images, whole.images[range.start * 48..range.end * 48]);
    }
    assert!(data::load(&s, Split::Train, Some(10..14)).is_err());
    // Another listing of the same files gives the same order.
    assert_eq!(data::load(&s, Split::Train, None).unwrap(), whole);
}

#[test]
fn folder_resize_and_centre_crop_as_torchvision() {
    let tmp = TempDir::new().unwrap();
    // 12 wide, 6 high, uniform colour: resize=4 makes it 8x4 (shorter side 4), crop=2x4
    // keeps the middle. A uniform image stays uniform through the bilinear filter.
    save(
        &RgbImage::from_pixel(12, 6, Rgb([200, 100, 50])),
        &tmp.path().join("train/a/0.png"),
    );
    save(
        &RgbImage::from_pixel(12, 6, Rgb([200, 100, 50])),
        &tmp.path().join("val/a/0.png"),
    );
    let d = data::load(
        &source("folder?resize=4&crop=2x4", tmp.path()),
        Split::Train,
        None,
    )
    .unwrap();
    assert_eq!((d.channels, d.height, d.width), (3, 2, 4));
    assert_eq!(d.images, [vec![200; 8], vec![100; 8], vec![50; 8]].concat());

    // Crop offsets: columns 0..8 of an 8-wide image with values = column; crop 4 wide
    // starts at column 2, rows likewise.
    let img = RgbImage::from_fn(8, 7, |x, y| Rgb([x as u8, y as u8, 0]));
    save(&img, &tmp.path().join("train/a/0.png"));
    let d = data::load(&source("folder?crop=4", tmp.path()), Split::Train, None).unwrap();
    let red: Vec<u8> = d.images[..16].to_vec();
    assert_eq!(red, [2, 3, 4, 5].repeat(4));
    // Rows: (7 - 4) / 2 = 1.5 rounds to 2 as Python's round does.
    let green: Vec<u8> = d.images[16..32].to_vec();
    assert_eq!(green, [2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5]);
}

#[test]
fn folder_channel_orders() {
    let tmp = TempDir::new().unwrap();
    for split in ["train", "val"] {
        save(
            &RgbImage::from_pixel(2, 2, Rgb([10, 20, 30])),
            &tmp.path().join(split).join("a/0.png"),
        );
    }
    let bgr = data::load(
        &source("folder?channels=bgr", tmp.path()),
        Split::Train,
        None,
    )
    .unwrap();
    assert_eq!(bgr.images, [vec![30; 4], vec![20; 4], vec![10; 4]].concat());
    let gray = data::load(
        &source("folder?channels=gray", tmp.path()),
        Split::Train,
        None,
    )
    .unwrap();
    assert_eq!(gray.channels, 1);
    assert_eq!(gray.images.len(), 4);
    assert!(
        gray.images.iter().all(|&v| v > 10 && v < 30),
        "{:?}",
        gray.images
    );
}

#[test]
fn jpeg_files_decode() {
    let tmp = TempDir::new().unwrap();
    for split in ["train", "val"] {
        let path = tmp.path().join(split).join("a/0.JPG");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(8, 8, Rgb([120, 60, 200]))
            .save_with_format(&path, ImageFormat::Jpeg)
            .unwrap();
    }
    let d = data::load(&source("folder", tmp.path()), Split::Test, None).unwrap();
    assert_eq!(d.len(), 1);
    // Lossy, but a flat colour survives within a few levels.
    for (c, want) in [120i32, 60, 200].into_iter().enumerate() {
        let got = d.images[c * 64] as i32;
        assert!((got - want).abs() <= 4, "channel {c}: {got} vs {want}");
    }
}

#[test]
fn single_tree_splits_by_seed_into_disjoint_train_and_test() {
    let tmp = TempDir::new().unwrap();
    write_tree(tmp.path(), &["a", "b", "c"], &[10, 10, 10], 3, 3);
    let ids = |spec: &str, split| {
        let d = data::load(&source(spec, tmp.path()), split, None).unwrap();
        (0..d.len()).map(|i| identify(&d, i)).collect::<Vec<_>>()
    };
    let train = ids("folder", Split::Train);
    let test = ids("folder", Split::Test);
    assert_eq!(
        (train.len(), test.len()),
        (24, 6),
        "20 % held out by default"
    );
    assert!(test.iter().all(|t| !train.contains(t)));
    let test10 = ids("folder?test_percent=10", Split::Test);
    assert_eq!(test10.len(), 3);
    let other_seed = ids("folder?split_seed=5", Split::Test);
    assert_eq!(other_seed.len(), 6);
    assert_ne!(other_seed, test, "another seed holds out other images");
    assert_eq!(
        ids("folder", Split::Test),
        test,
        "the same seed the same images"
    );
}

#[test]
fn folder_spec_strings_round_trip() {
    let s: DataSource = "folder:/data/photos?resize=36&crop=32&channels=bgr"
        .parse()
        .unwrap();
    assert_eq!(s.dir, PathBuf::from("/data/photos"));
    match s.format {
        DataFormat::Folder(o) => {
            assert_eq!(
                (o.resize, o.crop, o.channels),
                (Some(36), Some((32, 32)), Channels::Bgr)
            )
        }
        f => panic!("{f:?}"),
    }
    assert_eq!(
        s.to_string(),
        "folder:/data/photos?resize=36&crop=32x32&channels=bgr"
    );
    assert_eq!(s.to_string().parse::<DataSource>().unwrap(), s);
    let n: DataSource = "npy:arrays?layout=nchw".parse().unwrap();
    assert_eq!(n.format, DataFormat::Npy(NpyLayout::Nchw));
    assert_eq!(n.to_string(), "npy:arrays?layout=nchw");
    assert_eq!(
        "npy:arrays".parse::<DataSource>().unwrap().to_string(),
        "npy:arrays"
    );
    // A '?' in a CIFAR-10 or MNIST directory is part of its name, as before.
    let c: DataSource = "mnist:odd?dir".parse().unwrap();
    assert_eq!(c.dir, PathBuf::from("odd?dir"));
}

#[test]
fn bad_option_strings_name_the_option() {
    for (spec, words) in [
        ("folder:d?resize=big", "resize=big"),
        ("folder:d?crop=0", "positive"),
        ("folder:d?size=32", "unknown option"),
        ("folder:d?resize", "KEY=VALUE"),
        ("folder:?resize=3", "empty"),
        ("npy:d?layout=hwc", "nhwc or nchw"),
        ("npy:d?resize=3", "unknown option for npy"),
    ] {
        match spec.parse::<DataSource>() {
            Err(Error::InvalidDataSource { spec: s, reason }) => {
                assert_eq!(s, spec);
                assert!(
                    reason.contains(words),
                    "{spec}: '{reason}' should say '{words}'"
                );
            }
            other => panic!("{spec}: {other:?}"),
        }
    }
}

// Every way a folder can be wrong, each named.

#[test]
fn folder_missing_directory_is_an_io_error_naming_it() {
    let tmp = TempDir::new().unwrap();
    let missing = tmp.path().join("nope");
    match data::split_len(&source("folder", &missing), Split::Train) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
}

#[test]
fn folder_without_class_directories_is_named() {
    let tmp = TempDir::new().unwrap();
    fs::write(tmp.path().join("stray.png"), b"x").unwrap();
    expect_data_file(
        data::split_len(&source("folder", tmp.path()), Split::Train),
        tmp.path(),
        "no class directories",
    );
}

#[test]
fn folder_class_without_images_is_named() {
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a"], &[2], 3, 3);
    fs::create_dir_all(tmp.path().join("train/b")).unwrap();
    fs::write(tmp.path().join("train/b/notes.txt"), b"no images here").unwrap();
    expect_data_file(
        data::split_len(&source("folder", tmp.path()), Split::Train),
        &tmp.path().join("train/b"),
        "no images",
    );
}

#[test]
fn folder_with_train_but_no_test_split_is_named() {
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a"], &[2], 3, 3);
    assert_eq!(
        data::split_len(&source("folder", tmp.path()), Split::Train).unwrap(),
        2
    );
    expect_data_file(
        data::split_len(&source("folder", tmp.path()), Split::Test),
        tmp.path(),
        "neither test/ nor val/",
    );
    expect_data_file(
        data::split_len(&source("folder?test_percent=10", tmp.path()), Split::Train),
        tmp.path(),
        "single tree",
    );
}

#[test]
fn folder_test_class_unknown_to_training_is_named() {
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a", "b"], &[1, 1], 3, 3);
    write_tree(&tmp.path().join("val"), &["a", "c"], &[1, 1], 3, 3);
    expect_data_file(
        data::split_len(&source("folder", tmp.path()), Split::Test),
        &tmp.path().join("val/c"),
        "class 'c' is not a class",
    );
}

#[test]
fn folder_with_too_many_classes_is_refused() {
    let tmp = TempDir::new().unwrap();
    let train = tmp.path().join("train");
    for c in 0..257 {
        fs::create_dir_all(train.join(format!("{c:03}"))).unwrap();
    }
    expect_data_file(
        data::split_len(&source("folder", tmp.path()), Split::Train),
        &train,
        "at most 256",
    );
}

#[test]
fn undecodable_and_truncated_images_are_named() {
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a"], &[3], 4, 4);
    write_tree(&tmp.path().join("val"), &["a"], &[1], 4, 4);
    let s = source("folder", tmp.path());
    let d = data::load(&s, Split::Train, None).unwrap();
    assert_eq!(d.len(), 3);

    let bad = tmp.path().join("train/a/1.png");
    fs::write(&bad, b"this is not a PNG file at all").unwrap();
    expect_data_file(data::load(&s, Split::Train, None), &bad, "cannot decode");

    let good = fs::read(tmp.path().join("train/a/0.png")).unwrap();
    fs::write(&bad, &good[..good.len() / 2]).unwrap();
    expect_data_file(data::load(&s, Split::Train, None), &bad, "cannot decode");
}

#[test]
fn images_of_another_size_are_named_with_a_fix() {
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a"], &[4], 4, 4);
    write_tree(&tmp.path().join("val"), &["a"], &[1], 4, 4);
    let odd = tmp.path().join("train/a/9.png");
    save(&pattern(0, 9, 5, 4), &odd);
    // The odd one out is named, as the file at fault or (when it sorts first) as the
    // split's first image every other is measured against.
    match data::load(&source("folder", tmp.path()), Split::Train, None) {
        Err(Error::DataFile { path, reason }) => {
            assert!(reason.contains("resize= and crop="), "{reason}");
            assert!(
                path == odd || reason.contains(&odd.display().to_string()),
                "{}: {reason}",
                path.display()
            );
        }
        other => panic!("{other:?}"),
    }
    // A crop larger than an image.
    let tmp = TempDir::new().unwrap();
    write_tree(&tmp.path().join("train"), &["a"], &[1], 4, 4);
    write_tree(&tmp.path().join("val"), &["a"], &[1], 4, 4);
    expect_data_file(
        data::load(&source("folder?crop=5", tmp.path()), Split::Train, None).map(|d| d.len()),
        &tmp.path().join("train/a/0.png"),
        "smaller than the 5x5 crop",
    );
}

// ---------------------------------------------------------------------------------------
// npy:

/// A version 1.0 `.npy` file: magic, header dict padded to 64 bytes, data.
fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let fortran = if fortran { "True" } else { "False" };
    let mut dict =
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out.extend(data);
    out
}

fn i64_labels(labels: &[i64]) -> Vec<u8> {
    labels.iter().flat_map(|l| l.to_le_bytes()).collect()
}

/// NHWC pixels of `n` images 3x2 with 2 channels, each value telling (image, y, x, c).
fn nhwc(n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        for y in 0..3 {
            for x in 0..2 {
                for c in 0..2 {
                    v.push((i * 50 + y * 10 + x * 3 + c) as u8);
                }
            }
        }
    }
    v
}

fn write_npy_pair(dir: &Path, split: &str, x: Vec<u8>, y: Vec<u8>) {
    fs::write(dir.join(format!("x_{split}.npy")), x).unwrap();
    fs::write(dir.join(format!("y_{split}.npy")), y).unwrap();
}

fn npy_fixture() -> TempDir {
    let tmp = TempDir::new().unwrap();
    write_npy_pair(
        tmp.path(),
        "train",
        npy("|u1", false, &[5, 3, 2, 2], &nhwc(5)),
        npy("<i8", false, &[5], &i64_labels(&[3, 1, 4, 1, 5])),
    );
    write_npy_pair(
        tmp.path(),
        "test",
        npy("|u1", false, &[2, 3, 2, 2], &nhwc(2)),
        npy("<i8", false, &[2], &i64_labels(&[9, 2])),
    );
    tmp
}

#[test]
fn npy_nhwc_arrays_load_as_chw_with_their_labels() {
    let tmp = npy_fixture();
    let s = source("npy", tmp.path());
    assert_eq!(data::split_len(&s, Split::Train).unwrap(), 5);
    let d = data::load(&s, Split::Train, None).unwrap();
    assert_eq!((d.channels, d.height, d.width), (2, 3, 2));
    assert_eq!(d.labels, vec![3, 1, 4, 1, 5]);
    for i in 0..5 {
        let img = d.image(i);
        for c in 0..2 {
            for y in 0..3 {
                for x in 0..2 {
                    assert_eq!(img[c * 6 + y * 2 + x] as usize, i * 50 + y * 10 + x * 3 + c);
                }
            }
        }
    }
    let part = data::load(&s, Split::Train, Some(2..4)).unwrap();
    assert_eq!(part.images, d.images[2 * 12..4 * 12]);
    assert_eq!(part.labels, vec![4, 1]);
    assert_eq!(
        data::load(&s, Split::Test, None).unwrap().labels,
        vec![9, 2]
    );
}

#[test]
fn npy_nchw_and_grayscale_arrays_are_read_as_stored() {
    let tmp = TempDir::new().unwrap();
    let pixels: Vec<u8> = (0..24).collect();
    write_npy_pair(
        tmp.path(),
        "train",
        npy("|u1", false, &[2, 3, 2, 2], &pixels),
        npy("|u1", false, &[2], &[7, 8]),
    );
    let d = data::load(&source("npy?layout=nchw", tmp.path()), Split::Train, None).unwrap();
    assert_eq!((d.channels, d.height, d.width), (3, 2, 2));
    assert_eq!(d.images, pixels, "NCHW is already CHW per image");
    assert_eq!(d.labels, vec![7, 8]);

    write_npy_pair(
        tmp.path(),
        "train",
        npy("|u1", false, &[2, 3, 4], &pixels),
        npy(">i4", false, &[2, 1], &[0, 0, 0, 6, 0, 0, 0, 2]),
    );
    let d = data::load(&source("npy", tmp.path()), Split::Train, None).unwrap();
    assert_eq!((d.channels, d.height, d.width), (1, 3, 4));
    assert_eq!(d.images, pixels);
    assert_eq!(d.labels, vec![6, 2]);
}

/// Rewrites one file of the fixture and expects a MalformedData error naming it, at
/// `offset`, saying `words`.
fn expect_malformed(file: &str, bytes: Vec<u8>, offset: Option<u64>, words: &str) {
    let tmp = npy_fixture();
    let path = tmp.path().join(file);
    fs::write(&path, bytes).unwrap();
    let s = source("npy", tmp.path());
    let r = data::load(&s, Split::Train, None);
    match r {
        Err(Error::MalformedData {
            path: p,
            offset: o,
            reason,
        }) => {
            assert_eq!(p, path, "{reason}");
            if let Some(want) = offset {
                assert_eq!(o, want, "{reason}");
            }
            assert!(reason.contains(words), "'{reason}' should say '{words}'");
        }
        other => panic!("{file}: expected MalformedData, got {other:?}"),
    }
}

#[test]
fn npy_not_an_array_is_reported_at_offset_zero() {
    expect_malformed(
        "x_train.npy",
        b"PK\x03\x04 a zip file".to_vec(),
        Some(0),
        "not a NumPy",
    );
}

#[test]
fn npy_float_images_are_refused_with_the_conversion() {
    expect_malformed(
        "x_train.npy",
        npy("<f4", false, &[5, 3, 2, 2], &[0; 5 * 12 * 4]),
        Some(0),
        "uint8",
    );
}

#[test]
fn npy_fortran_order_is_refused() {
    expect_malformed(
        "x_train.npy",
        npy("|u1", true, &[5, 3, 2, 2], &nhwc(5)),
        Some(0),
        "Fortran",
    );
}

#[test]
fn npy_images_of_the_wrong_rank_are_refused() {
    expect_malformed(
        "x_train.npy",
        npy("|u1", false, &[5, 12], &nhwc(5)),
        Some(0),
        "N×H×W",
    );
}

#[test]
fn npy_truncated_images_are_reported_where_the_data_ends() {
    let mut x = npy("|u1", false, &[5, 3, 2, 2], &nhwc(5));
    x.truncate(x.len() - 7);
    let len = x.len() as u64;
    expect_malformed("x_train.npy", x, Some(len), "truncated");
}

#[test]
fn npy_label_count_must_match_the_images() {
    expect_malformed(
        "y_train.npy",
        npy("<i8", false, &[4], &i64_labels(&[1, 2, 3, 4])),
        None,
        "4 labels for the 5 images",
    );
}

#[test]
fn npy_float_labels_are_refused() {
    expect_malformed(
        "y_train.npy",
        npy("<f8", false, &[5], &[0; 40]),
        Some(0),
        "integers",
    );
}

#[test]
fn npy_labels_outside_a_byte_are_reported_at_their_offset() {
    for bad in [-1i64, 256] {
        let y = npy("<i8", false, &[5], &i64_labels(&[3, 1, bad, 1, 5]));
        let data_start = (y.len() - 40) as u64;
        expect_malformed(
            "y_train.npy",
            y,
            Some(data_start + 16),
            &format!("label {bad} of record 2"),
        );
    }
}

#[test]
fn npy_missing_labels_file_is_an_io_error_naming_it() {
    let tmp = npy_fixture();
    let path = tmp.path().join("y_test.npy");
    fs::remove_file(&path).unwrap();
    match data::split_len(&source("npy", tmp.path()), Split::Test) {
        Err(Error::Io { path: p, .. }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

#[test]
fn labels_beyond_the_model_outputs_are_refused_naming_the_data() {
    // A folder numbers its labels by its training classes: 3 classes fit a 3-output
    // model, not a 2-output one, in either split.
    let tmp = TempDir::new().unwrap();
    write_tree(
        &tmp.path().join("train"),
        &["a", "b", "c"],
        &[1, 1, 1],
        2,
        2,
    );
    write_tree(&tmp.path().join("val"), &["a"], &[1], 2, 2);
    let s = source("folder", tmp.path());
    data::check_classes(&s, Split::Train, 3).unwrap();
    for split in [Split::Train, Split::Test] {
        expect_data_file(
            data::check_classes(&s, split, 2),
            tmp.path(),
            &format!("the {split} split's labels name 3 classes (0 to 2), the model has 2 outputs"),
        );
    }
    // npy: the largest label decides; the labels file is named.
    let tmp = npy_fixture();
    let s = source("npy", tmp.path());
    data::check_classes(&s, Split::Train, 6).unwrap();
    expect_data_file(
        data::check_classes(&s, Split::Train, 5),
        &tmp.path().join("y_train.npy"),
        "name 6 classes",
    );
    expect_data_file(
        data::check_classes(&s, Split::Test, 9),
        &tmp.path().join("y_test.npy"),
        "name 10 classes (0 to 9), the model has 9 outputs",
    );
}
