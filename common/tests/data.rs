//! Dataset readers and sharding, on small CIFAR-10 and MNIST files written here with known
//! content, plus the real data in ../shared when it is present.

use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ccq_common::data::{self, DataFormat, DataSource, Dataset, Shard, Split};
use ccq_common::Error;
use flate2::write::GzEncoder;
use flate2::Compression;
use tempfile::TempDir;

mod support;
use support::{shared, skip};

// ---------------------------------------------------------------------------------------
// Fixtures

const CIFAR_RECORD: usize = 3073;
const CIFAR_IMAGE: usize = 3072;
/// Records per training batch file in the small CIFAR fixture (15 in all).
const TRAIN_BATCHES: [usize; 5] = [3, 5, 1, 4, 2];
const TEST_RECORDS: usize = 6;

/// Label of record `g` of a fixture split; `salt` tells the splits apart.
fn fixture_label(salt: usize, g: usize) -> u8 {
    ((g * 3 + salt) % 10) as u8
}

/// Pixel `j` of record `g` of a fixture split: varies with position and record, so that a
/// shifted, swapped or misaligned record cannot match.
fn fixture_pixel(salt: usize, g: usize, j: usize) -> u8 {
    ((g * 31 + j * 7 + j / 1024 * 13 + salt * 101) % 256) as u8
}

fn fixture_image(salt: usize, g: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| fixture_pixel(salt, g, j)).collect()
}

const TRAIN_SALT: usize = 1;
const TEST_SALT: usize = 2;

fn cifar_records(salt: usize, global: Range<usize>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(global.len() * CIFAR_RECORD);
    for g in global {
        bytes.push(fixture_label(salt, g));
        bytes.extend(fixture_image(salt, g, CIFAR_IMAGE));
    }
    bytes
}

/// Writes the CIFAR fixture into `dir` (which must exist).
fn write_cifar(dir: &Path) {
    let mut start = 0;
    for (i, &n) in TRAIN_BATCHES.iter().enumerate() {
        let name = format!("data_batch_{}.bin", i + 1);
        fs::write(dir.join(name), cifar_records(TRAIN_SALT, start..start + n)).unwrap();
        start += n;
    }
    fs::write(
        dir.join("test_batch.bin"),
        cifar_records(TEST_SALT, 0..TEST_RECORDS),
    )
    .unwrap();
}

fn cifar_fixture() -> (TempDir, DataSource) {
    let tmp = TempDir::new().unwrap();
    write_cifar(tmp.path());
    let source = DataSource::new(DataFormat::Cifar10, tmp.path());
    (tmp, source)
}

fn train_total() -> usize {
    TRAIN_BATCHES.iter().sum()
}

/// Checks every record of `d` against the fixture generator, by global index.
fn assert_fixture_records(d: &Dataset, salt: usize, shape: (usize, usize, usize)) {
    assert_eq!((d.channels, d.height, d.width), shape);
    assert_eq!(d.num_classes, 10);
    assert_eq!(d.image_len(), shape.0 * shape.1 * shape.2);
    assert_eq!(d.images.len(), d.len() * d.image_len());
    for i in 0..d.len() {
        let g = d.first_index + i;
        assert_eq!(d.labels[i], fixture_label(salt, g), "label of record {g}");
        assert_eq!(
            d.image(i),
            &fixture_image(salt, g, d.image_len())[..],
            "pixels of record {g}"
        );
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_images(magic: u32, count: usize, rows: usize, cols: usize, salt: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for v in [magic, count as u32, rows as u32, cols as u32] {
        bytes.extend(v.to_be_bytes());
    }
    for g in 0..count {
        bytes.extend(fixture_image(salt, g, rows * cols));
    }
    bytes
}

fn idx_labels(magic: u32, labels: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend(magic.to_be_bytes());
    bytes.extend((labels.len() as u32).to_be_bytes());
    bytes.extend(labels);
    bytes
}

fn fixture_labels(salt: usize, count: usize) -> Vec<u8> {
    (0..count).map(|g| fixture_label(salt, g)).collect()
}

/// Writes `bytes` as `dir/name`, or gzip-compressed as `dir/name.gz`.
fn write_maybe_gz(dir: &Path, name: &str, bytes: &[u8], gz: bool) -> PathBuf {
    let (path, contents) = if gz {
        (dir.join(format!("{name}.gz")), gzip(bytes))
    } else {
        (dir.join(name), bytes.to_vec())
    };
    fs::write(&path, contents).unwrap();
    path
}

const MNIST_TRAIN: usize = 7;
const MNIST_TEST: usize = 4;

/// A small MNIST directory: 7 training and 4 test digits of 28×28.
fn mnist_fixture(images_gz: bool, labels_gz: bool) -> (TempDir, DataSource) {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    for (prefix, salt, count) in [
        ("train", TRAIN_SALT, MNIST_TRAIN),
        ("t10k", TEST_SALT, MNIST_TEST),
    ] {
        let images = idx_images(2051, count, 28, 28, salt);
        let labels = idx_labels(2049, &fixture_labels(salt, count));
        write_maybe_gz(
            dir,
            &format!("{prefix}-images-idx3-ubyte"),
            &images,
            images_gz,
        );
        write_maybe_gz(
            dir,
            &format!("{prefix}-labels-idx1-ubyte"),
            &labels,
            labels_gz,
        );
    }
    let source = DataSource::new(DataFormat::Mnist, dir);
    (tmp, source)
}

fn malformed(err: Error) -> (PathBuf, u64, String) {
    match err {
        Error::MalformedData {
            path,
            offset,
            reason,
        } => (path, offset, reason),
        other => panic!("expected MalformedData, got {other:?}"),
    }
}

/// The error of a load that must fail; on success reports only the record count, not the
/// (possibly megabytes of) pixels that `unwrap_err` would print.
fn load_err(result: ccq_common::Result<Dataset>) -> Error {
    match result {
        Ok(d) => panic!("expected an error, loaded {} records", d.len()),
        Err(e) => e,
    }
}

fn io_path(err: Error) -> PathBuf {
    match err {
        Error::Io { path, .. } => path,
        other => panic!("expected Io, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Shards, sources, splits

#[test]
fn shard_ranges_tile_the_split_exactly_once() {
    let mut cases: Vec<(usize, usize)> = Vec::new();
    for n in 0..=120 {
        for s in 1..=17 {
            cases.push((n, s));
        }
    }
    for s in [1, 2, 3, 7, 16, 63, 64, 1000] {
        cases.push((50_000, s));
        cases.push((10_000, s));
    }
    for (n, s) in cases {
        let ranges: Vec<Range<usize>> =
            (0..s).map(|k| Shard::new(k, s).unwrap().range(n)).collect();
        assert_eq!(ranges[0].start, 0, "N={n} S={s}");
        assert_eq!(ranges[s - 1].end, n, "N={n} S={s}");
        for k in 0..s {
            assert!(ranges[k].start <= ranges[k].end, "N={n} S={s} k={k}");
            // The documented formula, which every process must compute identically.
            assert_eq!(ranges[k], k * n / s..(k + 1) * n / s, "N={n} S={s} k={k}");
            let size = ranges[k].len();
            assert!(size == n / s || size == n / s + 1, "N={n} S={s} k={k}");
            if k + 1 < s {
                assert_eq!(ranges[k].end, ranges[k + 1].start, "N={n} S={s} k={k}");
            }
        }
        if n <= 120 {
            let mut hits = vec![0u32; n];
            for r in &ranges {
                for i in r.clone() {
                    hits[i] += 1;
                }
            }
            assert!(hits.iter().all(|&h| h == 1), "N={n} S={s}: {hits:?}");
        }
    }
}

#[test]
fn shard_strings_parse_and_print() {
    for (text, index, count) in [("0/1", 0, 1), ("2/3", 2, 3), ("15/16", 15, 16)] {
        let shard: Shard = text.parse().unwrap();
        assert_eq!(shard, Shard { index, count });
        assert_eq!(shard.to_string(), text);
    }
    assert_eq!(Shard::WHOLE.range(10), 0..10);
}

#[test]
fn bad_shard_strings_are_rejected() {
    for text in [
        "3/3", "4/3", "a/b", "1/0", "0/0", "", "1", "/3", "1/", "-1/3", "1/2/3", " 1/2",
    ] {
        match text.parse::<Shard>() {
            Err(Error::InvalidShard { .. }) => {}
            other => panic!("'{text}': expected InvalidShard, got {other:?}"),
        }
    }
    assert!(matches!(
        Shard::new(3, 3),
        Err(Error::InvalidShard {
            index: 3,
            count: 3,
            ..
        })
    ));
}

#[test]
fn shard_built_from_fields_cannot_panic_or_load() {
    let (_tmp, source) = cifar_fixture();
    for bad in [Shard { index: 0, count: 0 }, Shard { index: 5, count: 2 }] {
        assert!(bad.range(100).is_empty());
        match data::load_shard(&source, Split::Train, bad).map(|d| d.len()) {
            Err(Error::InvalidShard { .. }) => {}
            other => panic!("{bad:?}: expected InvalidShard, got {other:?}"),
        }
    }
}

#[test]
fn data_source_strings_parse_and_print() {
    let s: DataSource = "cifar10:/data/cifar-10-batches-bin".parse().unwrap();
    assert_eq!(s.format, DataFormat::Cifar10);
    assert_eq!(s.dir, PathBuf::from("/data/cifar-10-batches-bin"));
    assert_eq!(s.to_string(), "cifar10:/data/cifar-10-batches-bin");

    // Only the first colon separates: the directory may contain colons.
    let s: DataSource = "mnist:rel/dir:x".parse().unwrap();
    assert_eq!(s.format, DataFormat::Mnist);
    assert_eq!(s.dir, PathBuf::from("rel/dir:x"));
    assert_eq!(s.to_string(), "mnist:rel/dir:x");
}

#[test]
fn bad_data_source_strings_are_rejected() {
    for spec in [
        "",
        "cifar10",
        "cifar10:",
        ":/data",
        "imagenet:/data",
        "CIFAR10:/data",
        "/data/cifar-10-batches-bin",
    ] {
        match spec.parse::<DataSource>() {
            Err(Error::InvalidDataSource { spec: s, .. }) => assert_eq!(s, spec),
            other => panic!("'{spec}': expected InvalidDataSource, got {other:?}"),
        }
    }
}

#[test]
fn split_strings_parse_and_print() {
    assert_eq!("train".parse::<Split>().unwrap(), Split::Train);
    assert_eq!("test".parse::<Split>().unwrap(), Split::Test);
    assert_eq!(Split::Train.to_string(), "train");
    assert_eq!(Split::Test.to_string(), "test");
    for bad in ["", "Train", "validation"] {
        assert!(
            matches!(bad.parse::<Split>(), Err(Error::InvalidSetting { .. })),
            "'{bad}'"
        );
    }
}

// ---------------------------------------------------------------------------------------
// CIFAR-10

#[test]
fn cifar_loads_exact_records_of_both_splits() {
    let (_tmp, source) = cifar_fixture();
    assert_eq!(data::split_len(&source, Split::Train).unwrap(), 15);
    assert_eq!(data::split_len(&source, Split::Test).unwrap(), TEST_RECORDS);

    let train = data::load(&source, Split::Train, None).unwrap();
    assert_eq!(train.len(), 15);
    assert_eq!(train.first_index, 0);
    assert_fixture_records(&train, TRAIN_SALT, (3, 32, 32));

    let test = data::load(&source, Split::Test, None).unwrap();
    assert_eq!(test.len(), TEST_RECORDS);
    assert_fixture_records(&test, TEST_SALT, (3, 32, 32));
}

#[test]
fn cifar_images_are_the_stored_planes() {
    // One record whose R, G and B planes are constant 10, 20, 30: the image must be the
    // 3,072 bytes after the label, planes in file order.
    let tmp = TempDir::new().unwrap();
    write_cifar(tmp.path());
    let mut record = vec![7u8];
    for value in [10u8, 20, 30] {
        record.extend(std::iter::repeat_n(value, 1024));
    }
    fs::write(tmp.path().join("test_batch.bin"), &record).unwrap();
    let source = DataSource::new(DataFormat::Cifar10, tmp.path());
    let d = data::load(&source, Split::Test, None).unwrap();
    assert_eq!(d.labels, [7]);
    let img = d.image(0);
    assert!(img[..1024].iter().all(|&p| p == 10));
    assert!(img[1024..2048].iter().all(|&p| p == 20));
    assert!(img[2048..].iter().all(|&p| p == 30));
}

#[test]
fn cifar_range_load_equals_slice_of_full_load() {
    let (_tmp, source) = cifar_fixture();
    let full = data::load(&source, Split::Train, None).unwrap();
    let n = train_total();
    // Every range, so every way of starting, ending and crossing batch files is covered.
    for start in 0..=n {
        for end in start..=n {
            let part = data::load(&source, Split::Train, Some(start..end)).unwrap();
            assert_eq!(part.first_index, start);
            assert_eq!(part.len(), end - start);
            assert_eq!(part.labels, full.labels[start..end], "{start}..{end}");
            assert_eq!(
                part.images,
                full.images[start * CIFAR_IMAGE..end * CIFAR_IMAGE],
                "{start}..{end}"
            );
        }
    }
}

#[test]
fn cifar_shards_concatenate_to_the_full_split() {
    let (_tmp, source) = cifar_fixture();
    let full = data::load(&source, Split::Train, None).unwrap();
    for count in [1, 2, 4, 6, 15, 20] {
        let mut labels = Vec::new();
        let mut images = Vec::new();
        let mut next = 0;
        for index in 0..count {
            let shard = Shard::new(index, count).unwrap();
            let part = data::load_shard(&source, Split::Train, shard).unwrap();
            assert_eq!(part.first_index, next, "shard {shard}");
            assert_fixture_records(&part, TRAIN_SALT, (3, 32, 32));
            next += part.len();
            labels.extend(part.labels);
            images.extend(part.images);
        }
        assert_eq!(labels, full.labels, "S={count}");
        assert_eq!(images, full.images, "S={count}");
    }
}

#[test]
fn cifar_accepts_the_directory_above_the_batches() {
    let tmp = TempDir::new().unwrap();
    let nested = tmp.path().join("cifar-10-batches-bin");
    fs::create_dir(&nested).unwrap();
    write_cifar(&nested);
    let above = DataSource::new(DataFormat::Cifar10, tmp.path());
    let direct = DataSource::new(DataFormat::Cifar10, &nested);
    assert_eq!(data::split_len(&above, Split::Train).unwrap(), 15);
    // Compared with `==` so that a failure does not print 18,000 pixels.
    assert!(
        data::load(&above, Split::Test, None).unwrap()
            == data::load(&direct, Split::Test, None).unwrap()
    );
}

#[test]
fn cifar_range_outside_the_split_is_an_error() {
    let (_tmp, source) = cifar_fixture();
    let n = train_total();
    // The last one is deliberately reversed: start after end.
    let reversed = Range { start: 3, end: 2 };
    for range in [n..n + 1, 0..n + 1, n + 5..n + 9, reversed] {
        match data::load(&source, Split::Train, Some(range.clone())) {
            Err(err @ Error::InvalidSetting { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains("range"), "{msg}");
                assert!(msg.contains(&format!("has {n} records")), "{msg}");
            }
            other => panic!("{range:?}: expected InvalidSetting, got {other:?}"),
        }
    }
    // The empty range at the very end is inside the split.
    let empty = data::load(&source, Split::Train, Some(n..n)).unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.first_index, n);
}

#[test]
fn cifar_truncated_batch_points_at_the_partial_record() {
    let (tmp, source) = cifar_fixture();
    let path = tmp.path().join("data_batch_2.bin");
    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(2 * CIFAR_RECORD + 1000);
    fs::write(&path, bytes).unwrap();

    let expect = |err: Error| {
        let (p, offset, reason) = malformed(err);
        assert_eq!(p, path);
        assert_eq!(offset, 2 * CIFAR_RECORD as u64);
        assert!(reason.contains("1000 bytes"), "{reason}");
    };
    expect(data::split_len(&source, Split::Train).unwrap_err());
    expect(load_err(data::load(&source, Split::Train, Some(0..1))));
    // The other split does not use that file.
    assert_eq!(
        data::load(&source, Split::Test, None).unwrap().len(),
        TEST_RECORDS
    );
}

#[test]
fn cifar_bad_label_points_at_its_record() {
    let (tmp, source) = cifar_fixture();
    let path = tmp.path().join("data_batch_2.bin");
    let mut bytes = fs::read(&path).unwrap();
    bytes[3 * CIFAR_RECORD] = 12;
    fs::write(&path, bytes).unwrap();

    // Record 3 of data_batch_2 is global record 3 + 3 = 6.
    let err = load_err(data::load(&source, Split::Train, None));
    let msg = err.to_string();
    let (p, offset, reason) = malformed(err);
    assert_eq!(p, path);
    assert_eq!(offset, 3 * CIFAR_RECORD as u64);
    assert!(reason.contains("label 12"), "{reason}");
    assert!(msg.contains("data_batch_2.bin"), "{msg}");
    assert!(data::load(&source, Split::Train, Some(5..7)).is_err());
    // Only the records a process loads are read, and so checked.
    assert_eq!(
        data::load(&source, Split::Train, Some(0..6)).unwrap().len(),
        6
    );
}

#[test]
fn cifar_missing_file_or_directory_is_named() {
    let (tmp, source) = cifar_fixture();
    let path = tmp.path().join("data_batch_4.bin");
    fs::remove_file(&path).unwrap();
    let err = load_err(data::load(&source, Split::Train, None));
    assert!(err.to_string().contains("data_batch_4.bin"), "{err}");
    assert_eq!(io_path(err), path);
    assert_eq!(
        io_path(data::split_len(&source, Split::Train).unwrap_err()),
        path
    );

    let missing = tmp.path().join("nowhere");
    let source = DataSource::new(DataFormat::Cifar10, &missing);
    assert_eq!(
        io_path(load_err(data::load(&source, Split::Test, None))),
        missing
    );
}

// ---------------------------------------------------------------------------------------
// MNIST

#[test]
fn mnist_loads_exact_digits_raw_and_gz() {
    for (images_gz, labels_gz) in [(false, false), (true, true), (true, false), (false, true)] {
        let (_tmp, source) = mnist_fixture(images_gz, labels_gz);
        let case = format!("images_gz={images_gz} labels_gz={labels_gz}");
        assert_eq!(
            data::split_len(&source, Split::Train).unwrap(),
            MNIST_TRAIN,
            "{case}"
        );
        assert_eq!(
            data::split_len(&source, Split::Test).unwrap(),
            MNIST_TEST,
            "{case}"
        );
        let train = data::load(&source, Split::Train, None).unwrap();
        assert_eq!(train.len(), MNIST_TRAIN, "{case}");
        assert_eq!(train.first_index, 0);
        assert_fixture_records(&train, TRAIN_SALT, (1, 28, 28));
        let test = data::load(&source, Split::Test, None).unwrap();
        assert_eq!(test.len(), MNIST_TEST, "{case}");
        assert_fixture_records(&test, TEST_SALT, (1, 28, 28));
    }
}

#[test]
fn mnist_image_size_comes_from_the_header() {
    // 5 rows × 3 columns: height and width must not be swapped.
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    write_maybe_gz(
        dir,
        "t10k-images-idx3-ubyte",
        &idx_images(2051, 2, 5, 3, TEST_SALT),
        true,
    );
    write_maybe_gz(
        dir,
        "t10k-labels-idx1-ubyte",
        &idx_labels(2049, &fixture_labels(TEST_SALT, 2)),
        true,
    );
    let source = DataSource::new(DataFormat::Mnist, dir);
    let d = data::load(&source, Split::Test, None).unwrap();
    assert_fixture_records(&d, TEST_SALT, (1, 5, 3));
}

#[test]
fn mnist_range_load_equals_slice_of_full_load() {
    for gz in [false, true] {
        let (_tmp, source) = mnist_fixture(gz, gz);
        let full = data::load(&source, Split::Train, None).unwrap();
        for start in 0..=MNIST_TRAIN {
            for end in start..=MNIST_TRAIN {
                let part = data::load(&source, Split::Train, Some(start..end)).unwrap();
                assert_eq!(part.first_index, start);
                assert_eq!(
                    part.labels,
                    full.labels[start..end],
                    "gz={gz} {start}..{end}"
                );
                assert_eq!(
                    part.images,
                    full.images[start * 784..end * 784],
                    "gz={gz} {start}..{end}"
                );
            }
        }
        for count in 1..=8 {
            let mut labels = Vec::new();
            for index in 0..count {
                let shard = Shard::new(index, count).unwrap();
                labels.extend(
                    data::load_shard(&source, Split::Train, shard)
                        .unwrap()
                        .labels,
                );
            }
            assert_eq!(labels, full.labels, "gz={gz} S={count}");
        }
        assert!(matches!(
            data::load(&source, Split::Train, Some(0..MNIST_TRAIN + 1)),
            Err(Error::InvalidSetting { .. })
        ));
    }
}

#[test]
fn mnist_bad_magic_is_reported_at_offset_zero() {
    for gz in [false, true] {
        let (tmp, source) = mnist_fixture(gz, gz);
        // A labels header where the images belong.
        let images = write_maybe_gz(
            tmp.path(),
            "train-images-idx3-ubyte",
            &idx_labels(2049, &[1, 2, 3]),
            gz,
        );
        let (p, offset, reason) = malformed(data::split_len(&source, Split::Train).unwrap_err());
        assert_eq!((p, offset), (images, 0));
        assert!(
            reason.contains("2049") && reason.contains("2051"),
            "{reason}"
        );

        // And an images header where the labels belong.
        let labels = write_maybe_gz(
            tmp.path(),
            "t10k-labels-idx1-ubyte",
            &idx_images(2051, MNIST_TEST, 28, 28, TEST_SALT),
            gz,
        );
        let (p, offset, _) = malformed(load_err(data::load(&source, Split::Test, None)));
        assert_eq!((p, offset), (labels, 0));
    }
}

#[test]
fn mnist_truncated_header_is_reported() {
    for gz in [false, true] {
        let (tmp, source) = mnist_fixture(gz, gz);
        let full = idx_images(2051, MNIST_TRAIN, 28, 28, TRAIN_SALT);
        let images = write_maybe_gz(tmp.path(), "train-images-idx3-ubyte", &full[..10], gz);
        let (p, offset, reason) = malformed(data::split_len(&source, Split::Train).unwrap_err());
        assert_eq!((p, offset), (images, 10), "gz={gz}");
        assert!(reason.contains("row count"), "{reason}");
    }
}

#[test]
fn mnist_truncated_raw_body_is_reported_by_split_len() {
    let (tmp, source) = mnist_fixture(false, false);
    let full = idx_images(2051, MNIST_TRAIN, 28, 28, TRAIN_SALT);
    let cut = 16 + 5 * 784 + 100;
    let images = write_maybe_gz(tmp.path(), "train-images-idx3-ubyte", &full[..cut], false);
    let (p, offset, _) = malformed(data::split_len(&source, Split::Train).unwrap_err());
    assert_eq!((p, offset), (images.clone(), cut as u64));
    let (p, _, _) = malformed(load_err(data::load(&source, Split::Train, Some(0..1))));
    assert_eq!(p, images);
}

#[test]
fn mnist_short_gz_body_is_reported_where_it_ends() {
    // A well-formed gzip stream whose content stops 2 labels short of its header's count.
    let (tmp, source) = mnist_fixture(true, true);
    let mut bytes = idx_labels(2049, &fixture_labels(TRAIN_SALT, MNIST_TRAIN));
    bytes.truncate(bytes.len() - 2);
    let labels = write_maybe_gz(tmp.path(), "train-labels-idx1-ubyte", &bytes, true);
    let (p, offset, _) = malformed(load_err(data::load(&source, Split::Train, None)));
    assert_eq!((p, offset), (labels, 8 + MNIST_TRAIN as u64 - 2));
}

#[test]
fn mnist_truncated_gzip_stream_is_malformed_data() {
    let (tmp, source) = mnist_fixture(true, true);
    let raw = idx_images(2051, MNIST_TRAIN, 28, 28, TRAIN_SALT);
    let path = tmp.path().join("train-images-idx3-ubyte.gz");
    let compressed = gzip(&raw);
    // Cut mid-data, and cut in the 8-byte trailer (CRC and length) after all the data.
    for cut in [compressed.len() / 2, compressed.len() - 4] {
        fs::write(&path, &compressed[..cut]).unwrap();
        let err = load_err(data::load(&source, Split::Train, None));
        let (p, offset, reason) = malformed(err);
        assert_eq!(p, path, "cut at {cut}");
        assert!(offset <= raw.len() as u64, "cut at {cut}: offset {offset}");
        assert!(reason.contains("decompressed"), "{reason}");
    }
}

#[test]
fn mnist_count_mismatch_is_reported_in_the_labels_file() {
    let (tmp, source) = mnist_fixture(false, true);
    let labels = write_maybe_gz(
        tmp.path(),
        "t10k-labels-idx1-ubyte",
        &idx_labels(2049, &fixture_labels(TEST_SALT, MNIST_TEST - 1)),
        true,
    );
    let (p, offset, reason) = malformed(data::split_len(&source, Split::Test).unwrap_err());
    assert_eq!((p, offset), (labels, 4));
    assert!(
        reason.contains(&format!("{} labels", MNIST_TEST - 1))
            && reason.contains(&format!("{MNIST_TEST} images")),
        "{reason}"
    );
}

#[test]
fn mnist_label_out_of_range_points_at_its_byte() {
    for gz in [false, true] {
        let (tmp, source) = mnist_fixture(gz, gz);
        let mut labels = fixture_labels(TRAIN_SALT, MNIST_TRAIN);
        labels[4] = 10;
        let path = write_maybe_gz(
            tmp.path(),
            "train-labels-idx1-ubyte",
            &idx_labels(2049, &labels),
            gz,
        );
        let (p, offset, reason) = malformed(load_err(data::load(&source, Split::Train, None)));
        assert_eq!((p, offset), (path.clone(), 8 + 4), "gz={gz}");
        assert!(reason.contains("label 10"), "{reason}");
        let (_, offset, _) = malformed(load_err(data::load(&source, Split::Train, Some(3..6))));
        assert_eq!(
            offset,
            8 + 4,
            "gz={gz}: offsets are global, not range-relative"
        );
    }
}

#[test]
fn mnist_missing_file_or_directory_is_named() {
    let (tmp, source) = mnist_fixture(true, true);
    fs::remove_file(tmp.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let err = load_err(data::load(&source, Split::Test, None));
    assert!(err.to_string().contains("t10k-labels-idx1-ubyte"), "{err}");
    assert_eq!(io_path(err), tmp.path().join("t10k-labels-idx1-ubyte"));
    // The training split is unaffected.
    assert_eq!(data::split_len(&source, Split::Train).unwrap(), MNIST_TRAIN);

    let missing = tmp.path().join("nowhere");
    let source = DataSource::new(DataFormat::Mnist, &missing);
    assert_eq!(
        io_path(data::split_len(&source, Split::Train).unwrap_err()),
        missing
    );
}

// ---------------------------------------------------------------------------------------
// Real data in ../shared, when present

fn class_counts(d: &Dataset) -> [usize; 10] {
    let mut counts = [0; 10];
    for &l in &d.labels {
        counts[usize::from(l)] += 1;
    }
    counts
}

#[test]
fn real_cifar10_splits() {
    let Some(parent) = shared("datasets/cifar10-jpeg") else {
        return skip("../shared/datasets/cifar10-jpeg not found");
    };
    let batches = parent.join("cifar-10-batches-bin");
    let source = DataSource::new(DataFormat::Cifar10, &batches);
    assert_eq!(data::split_len(&source, Split::Train).unwrap(), 50_000);
    assert_eq!(data::split_len(&source, Split::Test).unwrap(), 10_000);

    let test = data::load(&source, Split::Test, None).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.images.len(), 10_000 * 3072);
    let counts = class_counts(&test);
    assert!(counts.iter().all(|&c| c >= 500), "{counts:?}");

    // A range across the first batch boundary, checked against the files' own bytes.
    let part = data::load(&source, Split::Train, Some(9_998..10_002)).unwrap();
    let b1 = fs::read(batches.join("data_batch_1.bin")).unwrap();
    let b2 = fs::read(batches.join("data_batch_2.bin")).unwrap();
    let records = [
        &b1[9_998 * CIFAR_RECORD..9_999 * CIFAR_RECORD],
        &b1[9_999 * CIFAR_RECORD..10_000 * CIFAR_RECORD],
        &b2[..CIFAR_RECORD],
        &b2[CIFAR_RECORD..2 * CIFAR_RECORD],
    ];
    for (i, record) in records.iter().enumerate() {
        assert_eq!(part.labels[i], record[0]);
        assert_eq!(part.image(i), &record[1..]);
    }

    // A worker's shard, through the directory above the batches.
    let above = DataSource::new(DataFormat::Cifar10, &parent);
    let shard = data::load_shard(&above, Split::Train, Shard::new(3, 7).unwrap()).unwrap();
    assert_eq!(shard.first_index, 3 * 50_000 / 7);
    assert_eq!(shard.len(), 4 * 50_000 / 7 - 3 * 50_000 / 7);
    let counts = class_counts(&shard);
    assert!(counts.iter().all(|&c| c >= 300), "{counts:?}");
}

#[test]
fn real_mnist_splits() {
    let Some(dir) = shared("datasets/mnist-10k") else {
        return skip("../shared/datasets/mnist-10k not found");
    };
    let source = DataSource::new(DataFormat::Mnist, &dir);
    for (split, n) in [(Split::Train, 8_000), (Split::Test, 2_000)] {
        assert_eq!(data::split_len(&source, split).unwrap(), n);
        let d = data::load(&source, split, None).unwrap();
        assert_eq!(d.len(), n);
        assert_eq!((d.channels, d.height, d.width), (1, 28, 28));
        let counts = class_counts(&d);
        assert!(counts.iter().all(|&c| c >= n / 20), "{split}: {counts:?}");
        // Digits are bright strokes on a black background: some ink, mostly background.
        let ink = d.images.iter().filter(|&&p| p > 127).count();
        assert!(
            ink > d.images.len() / 20 && ink < d.images.len() / 2,
            "{split}: {ink} bright pixels"
        );
    }
}
