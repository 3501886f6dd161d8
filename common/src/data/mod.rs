//! Dataset readers and deterministic sharding: CIFAR-10 binary batches, MNIST IDX files,
//! image folders (`folder.rs`) and NumPy arrays (`npy.rs`).
//!
//! The coordinator loads the test split whole; each worker loads only its [`Shard`] of the
//! training split. Shard boundaries depend on nothing but the split's record count, which
//! [`split_len`] gets from file sizes, headers or a directory listing alone, so every process
//! computes the same boundaries without talking to the others.
//!
//! Images are held as `u8`, CHW planar (3×32×32 for CIFAR-10, 1×H×W for MNIST, the
//! decoded, resized and cropped pixels for an image folder): the form fitness jobs read,
//! decoded once when a process loads its records, never per job. Normalisation belongs to
//! the model's input quantization, not here.
//!
//! File contents are never trusted: sizes, magic numbers, dimensions and labels are checked,
//! and anything wrong comes back as [`Error::MalformedData`] with the file and byte offset,
//! or [`Error::DataFile`] with the file and the reason (an image that does not decode).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use flate2::read::MultiGzDecoder;

use crate::model::Shape;
use crate::{Error, Result};

mod folder;
mod npy;

pub use folder::{Channels, FolderOptions};
pub use npy::NpyLayout;

/// CIFAR-10 and MNIST have ten classes.
const NUM_CLASSES: usize = 10;

/// The on-disk format of a dataset directory, with the options that say how to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataFormat {
    /// CIFAR-10 binary version: `data_batch_{1..5}.bin` and `test_batch.bin`.
    Cifar10,
    /// MNIST IDX files `{train,t10k}-{images-idx3,labels-idx1}-ubyte`, raw or `.gz`.
    Mnist,
    /// JPEG and PNG files in one directory per class (torchvision's ImageFolder).
    Folder(FolderOptions),
    /// `x_train.npy` / `y_train.npy` / `x_test.npy` / `y_test.npy`: u8 images, integer labels.
    Npy(NpyLayout),
}

impl DataFormat {
    fn name(self) -> &'static str {
        match self {
            DataFormat::Cifar10 => "cifar10",
            DataFormat::Mnist => "mnist",
            DataFormat::Folder(_) => "folder",
            DataFormat::Npy(_) => "npy",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "cifar10" => Some(DataFormat::Cifar10),
            "mnist" => Some(DataFormat::Mnist),
            "folder" => Some(DataFormat::Folder(FolderOptions::default())),
            "npy" => Some(DataFormat::Npy(NpyLayout::default())),
            _ => None,
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a dataset lives and how it is read, written `FORMAT:DIR[?OPTIONS]` on command lines
/// and in configs; the same string reaches the workers.
///
/// - `cifar10:DIR`: the `cifar-10-batches-bin` directory itself or the directory that
///   contains it (where the official tarball was unpacked).
/// - `mnist:DIR`: the four IDX files, raw or gzipped.
/// - `folder:DIR?resize=N&crop=N|HxW&channels=rgb|bgr|gray&test_percent=P&split_seed=S`:
///   see [`FolderOptions`].
/// - `npy:DIR?layout=nhwc|nchw`: see [`NpyLayout`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataSource {
    pub format: DataFormat,
    pub dir: PathBuf,
}

impl DataSource {
    pub fn new(format: DataFormat, dir: impl Into<PathBuf>) -> Self {
        DataSource {
            format,
            dir: dir.into(),
        }
    }
}

impl FromStr for DataSource {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidDataSource {
            spec: spec.to_string(),
            reason,
        };
        // Split at the first colon only: format names have none, directories may.
        let (format, rest) = spec.split_once(':').ok_or_else(|| {
            invalid("expected FORMAT:DIR, e.g. cifar10:data/cifar-10-batches-bin".into())
        })?;
        let mut format = DataFormat::from_name(format).ok_or_else(|| {
            invalid(format!(
                "unknown format '{format}' (expected cifar10, mnist, folder or npy)"
            ))
        })?;
        // Only the formats with options read a '?': an existing cifar10/mnist directory
        // whose name holds one keeps working.
        let (dir, options) = match format {
            DataFormat::Folder(_) | DataFormat::Npy(_) => match rest.rsplit_once('?') {
                Some((dir, options)) => (dir, Some(options)),
                None => (rest, None),
            },
            DataFormat::Cifar10 | DataFormat::Mnist => (rest, None),
        };
        if dir.is_empty() {
            return Err(invalid("the directory after ':' is empty".into()));
        }
        for option in options.into_iter().flat_map(|o| o.split('&')) {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| invalid(format!("option '{option}' is not KEY=VALUE")))?;
            let set = match &mut format {
                DataFormat::Folder(o) => o.set(key, value),
                DataFormat::Npy(l) => l.set(key, value),
                DataFormat::Cifar10 | DataFormat::Mnist => unreachable!("no options parsed"),
            };
            set.map_err(|reason| invalid(format!("option {key}={value}: {reason}")))?;
        }
        Ok(DataSource::new(format, dir))
    }
}

impl fmt::Display for DataSource {
    /// The canonical spec, options included: it parses back to the same source.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.format, self.dir.display())?;
        let options = match self.format {
            DataFormat::Folder(o) => o.to_string(),
            DataFormat::Npy(l) => l.to_string(),
            DataFormat::Cifar10 | DataFormat::Mnist => String::new(),
        };
        if !options.is_empty() {
            write!(f, "?{options}")?;
        }
        Ok(())
    }
}

/// Which half of a dataset: training records or held-out test records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl FromStr for Split {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(Error::setting("split", s, "expected 'train' or 'test'")),
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Shard `index` of `count` equal-as-possible contiguous parts of a split, written `K/S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole split as a single shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// A shard, checked: `count >= 1` and `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        let reason = if count == 0 {
            "the shard count must be at least 1"
        } else if index >= count {
            "the shard index must be less than the shard count (indices start at 0)"
        } else {
            return Ok(Shard { index, count });
        };
        Err(Error::InvalidShard {
            index,
            count,
            reason: reason.into(),
        })
    }

    /// Global record indices of this shard in a split of `total` records:
    /// `[K*N/S, (K+1)*N/S)`. Consecutive shards tile `0..total` exactly and their sizes
    /// differ by at most one.
    ///
    /// A shard that bypassed [`Shard::new`] through its public fields with `index >= count`
    /// gets an empty range instead of a division by zero; [`load_shard`] rejects it.
    pub fn range(&self, total: usize) -> Range<usize> {
        if self.index >= self.count {
            return total..total;
        }
        // u128 so that K*N cannot overflow, whatever the split size.
        let bound = |k: usize| (k as u128 * total as u128 / self.count as u128) as usize;
        bound(self.index)..bound(self.index + 1)
    }

    /// The index of the shard (of `count`) whose [`range`](Shard::range) holds global
    /// record `i` of a split of `total`: the inverse of `range`.
    pub fn holding(i: usize, total: usize, count: usize) -> usize {
        // Shard k holds [k*N/S, (k+1)*N/S); find the largest k with k*N/S <= i.
        let start = |k: usize| (k as u128 * total as u128 / count as u128) as usize;
        let mut k = ((i as u128 * count as u128) / total.max(1) as u128) as usize;
        k = k.min(count.saturating_sub(1));
        while k > 0 && start(k) > i {
            k -= 1;
        }
        while k + 1 < count && start(k + 1) <= i {
            k += 1;
        }
        k
    }
}

impl FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parsed = s
            .split_once('/')
            .and_then(|(k, n)| Some((k.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) => Shard::new(index, count),
            None => Err(Error::InvalidShard {
                index: 0,
                count: 0,
                reason: format!("cannot parse '{s}': expected K/S with integers 0 <= K < S"),
            }),
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// A contiguous run of records of one split, held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub num_classes: usize,
    /// `len() * image_len()` pixels; each image CHW planar, exactly as stored.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    /// Global index (within the split) of record 0 of this dataset.
    pub first_index: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image, `C*H*W`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The per-image shape, to compare with a model's input.
    pub fn shape(&self) -> Shape {
        Shape::new(self.channels, self.height, self.width)
    }

    /// Pixels of record `i` (local index). Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }
}

/// Number of records in `split`, from file sizes (CIFAR-10), headers (MNIST, npy) or the
/// directory listing (folder), without reading any pixels.
pub fn split_len(source: &DataSource, split: Split) -> Result<usize> {
    match source.format {
        DataFormat::Cifar10 => Ok(cifar_batches(&source.dir, split)?
            .iter()
            .map(|b| b.records)
            .sum()),
        DataFormat::Mnist => Ok(MnistFiles::open(&source.dir, split)?.count),
        DataFormat::Folder(options) => folder::split_len(&source.dir, &options, split),
        DataFormat::Npy(layout) => npy::split_len(&source.dir, layout, split),
    }
}

/// Loads the records of `split` whose global indices are in `range` (`None`: all of them).
/// CIFAR-10 batch files are seeked into, so a worker reads only its own records.
pub fn load(source: &DataSource, split: Split, range: Option<Range<usize>>) -> Result<Dataset> {
    let dataset = match source.format {
        DataFormat::Cifar10 => load_cifar(source, split, range)?,
        DataFormat::Mnist => load_mnist(source, split, range)?,
        DataFormat::Folder(options) => {
            let index = folder::Index::open(&source.dir, &options, split)?;
            let range = check_range(range, index.len(), source, split)?;
            index.load(&options, range)?
        }
        DataFormat::Npy(layout) => {
            let arrays = npy::Arrays::open(&source.dir, layout, split)?;
            let range = check_range(range, arrays.len(), source, split)?;
            arrays.load(range)?
        }
    };
    tracing::debug!(
        %source,
        %split,
        first = dataset.first_index,
        records = dataset.len(),
        "loaded dataset"
    );
    Ok(dataset)
}

/// Checks that every label of `split` names one of a model's `classes` outputs, from the
/// labels alone (a folder's class count, an npy labels file; CIFAR-10 and MNIST labels are
/// checked against their ten classes as they are read). A label beyond the model's outputs
/// would score as an impossible class, silently.
pub fn check_classes(source: &DataSource, split: Split, classes: usize) -> Result<()> {
    let (needed, path) = match source.format {
        DataFormat::Cifar10 | DataFormat::Mnist => (NUM_CLASSES, source.dir.clone()),
        DataFormat::Folder(options) => (
            folder::Index::open(&source.dir, &options, split)?.classes(),
            source.dir.clone(),
        ),
        DataFormat::Npy(layout) => {
            let arrays = npy::Arrays::open(&source.dir, layout, split)?;
            (arrays.class_count()?, arrays.labels_path().to_path_buf())
        }
    };
    if needed > classes {
        return Err(Error::DataFile {
            path,
            reason: format!(
                "the {split} split's labels name {needed} classes (0 to {}), the model has \
                 {classes} outputs",
                needed - 1
            ),
        });
    }
    Ok(())
}

/// Loads shard `shard` of `split`: `load` over `shard.range(split_len(..))`.
pub fn load_shard(source: &DataSource, split: Split, shard: Shard) -> Result<Dataset> {
    // The fields are public, so a shard may not have gone through `Shard::new`.
    let shard = Shard::new(shard.index, shard.count)?;
    let total = split_len(source, split)?;
    load(source, split, Some(shard.range(total)))
}

/// Resolves `None` to the whole split and rejects ranges that leave it.
fn check_range(
    range: Option<Range<usize>>,
    total: usize,
    source: &DataSource,
    split: Split,
) -> Result<Range<usize>> {
    let range = range.unwrap_or(0..total);
    let problem = if range.start > range.end {
        "the range starts after it ends"
    } else if range.end > total {
        "the range goes past the end of the split"
    } else {
        return Ok(range);
    };
    Err(Error::setting(
        "range",
        format!("{}..{}", range.start, range.end),
        format!("{problem}: the {split} split of {source} has {total} records"),
    ))
}

/// Fails with an `Io` error naming `dir` if it does not exist, rather than one naming a file
/// inside it, which would hide the real mistake.
fn check_dir(dir: &Path) -> Result<()> {
    fs::metadata(dir).map(drop).map_err(|e| Error::io(dir, e))
}

// ---------------------------------------------------------------------------------------
// CIFAR-10

const CIFAR_SIDE: usize = 32;
const CIFAR_IMAGE: usize = 3 * CIFAR_SIDE * CIFAR_SIDE;
/// One label byte, then the image.
const CIFAR_RECORD: usize = 1 + CIFAR_IMAGE;
const CIFAR_NESTED_DIR: &str = "cifar-10-batches-bin";
const CIFAR_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const CIFAR_TEST_FILES: [&str; 1] = ["test_batch.bin"];

/// One batch file of a split and how many records it holds.
struct BatchFile {
    path: PathBuf,
    records: usize,
}

/// The batch files of `split`, in order, sized and checked to hold whole records.
fn cifar_batches(dir: &Path, split: Split) -> Result<Vec<BatchFile>> {
    let dir = cifar_root(dir)?;
    let names: &[&str] = match split {
        Split::Train => &CIFAR_TRAIN_FILES,
        Split::Test => &CIFAR_TEST_FILES,
    };
    names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let size = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
            let partial = size % CIFAR_RECORD as u64;
            if partial != 0 {
                return Err(Error::MalformedData {
                    path,
                    offset: size - partial,
                    reason: format!(
                        "file is {size} bytes, not a whole number of {CIFAR_RECORD}-byte \
                         records: the last record has only {partial} bytes"
                    ),
                });
            }
            let records = (size / CIFAR_RECORD as u64) as usize;
            Ok(BatchFile { path, records })
        })
        .collect()
}

/// `dir` itself, or its `cifar-10-batches-bin/` when `dir` is where the tarball was unpacked.
fn cifar_root(dir: &Path) -> Result<PathBuf> {
    check_dir(dir)?;
    let has_batches = CIFAR_TEST_FILES
        .iter()
        .chain(&CIFAR_TRAIN_FILES)
        .any(|name| dir.join(name).exists());
    let nested = dir.join(CIFAR_NESTED_DIR);
    if !has_batches && nested.is_dir() {
        Ok(nested)
    } else {
        Ok(dir.to_path_buf())
    }
}

fn load_cifar(source: &DataSource, split: Split, range: Option<Range<usize>>) -> Result<Dataset> {
    let batches = cifar_batches(&source.dir, split)?;
    let total = batches.iter().map(|b| b.records).sum();
    let range = check_range(range, total, source, split)?;

    let mut images = Vec::with_capacity(range.len() * CIFAR_IMAGE);
    let mut labels = Vec::with_capacity(range.len());
    // Global index of the current batch's first record.
    let mut batch_start = 0;
    for batch in &batches {
        let batch_end = batch_start + batch.records;
        let start = range.start.max(batch_start);
        let end = range.end.min(batch_end);
        if start < end {
            read_cifar_records(
                &batch.path,
                start - batch_start..end - batch_start,
                &mut images,
                &mut labels,
            )?;
        }
        batch_start = batch_end;
    }

    Ok(Dataset {
        channels: 3,
        height: CIFAR_SIDE,
        width: CIFAR_SIDE,
        num_classes: NUM_CLASSES,
        images,
        labels,
        first_index: range.start,
    })
}

/// Appends records `local` (indices within this batch file) to `images` and `labels`.
fn read_cifar_records(
    path: &Path,
    local: Range<usize>,
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<()> {
    let io_error = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io_error)?;
    file.seek(SeekFrom::Start((local.start * CIFAR_RECORD) as u64))
        .map_err(io_error)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut record = [0u8; CIFAR_RECORD];
    for i in local {
        let offset = (i * CIFAR_RECORD) as u64;
        reader.read_exact(&mut record).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                // The size was checked moments ago, so the file shrank while we read it.
                Error::MalformedData {
                    path: path.to_path_buf(),
                    offset,
                    reason: "file ended inside this record (truncated while being read?)".into(),
                }
            } else {
                io_error(e)
            }
        })?;
        let label = record[0];
        if usize::from(label) >= NUM_CLASSES {
            return Err(Error::MalformedData {
                path: path.to_path_buf(),
                offset,
                reason: format!("label {label} of record {i} is not a CIFAR-10 class (0-9)"),
            });
        }
        labels.push(label);
        images.extend_from_slice(&record[1..]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// MNIST (IDX)

/// IDX magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
const IDX_IMAGES_HEADER: u64 = 16;
const IDX_LABELS_HEADER: u64 = 8;
/// Far above any IDX image dataset; stops a corrupt header from describing absurd images.
const IDX_MAX_SIDE: usize = 4096;

/// The image and label files of one MNIST split, each positioned just after its header.
struct MnistFiles {
    images: IdxReader,
    labels: IdxReader,
    count: usize,
    rows: usize,
    cols: usize,
}

impl MnistFiles {
    fn open(dir: &Path, split: Split) -> Result<Self> {
        check_dir(dir)?;
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };

        let mut images = IdxReader::open(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        images.expect_magic(IDX_IMAGES_MAGIC, "unsigned-byte images with 3 dimensions")?;
        let count = images.read_dim("image count")?;
        let rows = images.read_dim("row count")?;
        let cols = images.read_dim("column count")?;
        for (side, offset) in [(rows, 8), (cols, 12)] {
            if side == 0 || side > IDX_MAX_SIDE {
                return Err(images.malformed_at(
                    offset,
                    format!("image side {side} is outside 1..={IDX_MAX_SIDE}"),
                ));
            }
        }
        let body = count
            .checked_mul(rows * cols)
            .ok_or_else(|| images.malformed_at(4, format!("{count} images are too many")))?;
        images.check_raw_len(IDX_IMAGES_HEADER + body as u64)?;

        let mut labels = IdxReader::open(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        labels.expect_magic(IDX_LABELS_MAGIC, "unsigned-byte labels with 1 dimension")?;
        let label_count = labels.read_dim("label count")?;
        if label_count != count {
            return Err(labels.malformed_at(
                4,
                format!(
                    "{label_count} labels, but {} holds {count} images",
                    images.path.display()
                ),
            ));
        }
        labels.check_raw_len(IDX_LABELS_HEADER + count as u64)?;

        Ok(MnistFiles {
            images,
            labels,
            count,
            rows,
            cols,
        })
    }
}

fn load_mnist(source: &DataSource, split: Split, range: Option<Range<usize>>) -> Result<Dataset> {
    let MnistFiles {
        mut images,
        mut labels,
        count,
        rows,
        cols,
    } = MnistFiles::open(&source.dir, split)?;
    let range = check_range(range, count, source, split)?;
    let pixels = rows * cols;

    images.skip((range.start * pixels) as u64, "images before the range")?;
    let image_bytes = images.read_vec(range.len() * pixels, "image data")?;
    labels.skip(range.start as u64, "labels before the range")?;
    let label_bytes = labels.read_vec(range.len(), "label data")?;
    if range.end == count {
        // Reading on to the end makes the gzip decoder check the stream's CRC and length,
        // which catches a cut or corrupted trailer. Only free when we are there anyway.
        images.read_to_end("end of the file")?;
        labels.read_to_end("end of the file")?;
    }

    if let Some(i) = label_bytes
        .iter()
        .position(|&l| usize::from(l) >= NUM_CLASSES)
    {
        let offset = IDX_LABELS_HEADER + (range.start + i) as u64;
        return Err(labels.malformed_at(
            offset,
            format!("label {} is not a digit (0-9)", label_bytes[i]),
        ));
    }

    Ok(Dataset {
        channels: 1,
        height: rows,
        width: cols,
        num_classes: NUM_CLASSES,
        images: image_bytes,
        labels: label_bytes,
        first_index: range.start,
    })
}

/// A sequential reader of one IDX file, raw or gzip-compressed, that tracks its byte offset
/// (in the decompressed data for `.gz`) so that every error can point at it.
struct IdxReader {
    path: PathBuf,
    inner: Box<dyn Read>,
    pos: u64,
    /// Size of the file when it is not compressed, to check its length against the header.
    raw_len: Option<u64>,
}

impl IdxReader {
    /// Opens `dir/name`, or `dir/name.gz` when the raw file does not exist.
    fn open(dir: &Path, name: &str) -> Result<Self> {
        let raw = dir.join(name);
        match File::open(&raw) {
            Ok(file) => {
                let len = file.metadata().map_err(|e| Error::io(&raw, e))?.len();
                return Ok(IdxReader::new(raw, BufReader::new(file), Some(len)));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(raw, e)),
        }
        let gz = dir.join(format!("{name}.gz"));
        match File::open(&gz) {
            // MultiGzDecoder also reads files written as several concatenated gzip members.
            Ok(file) => Ok(IdxReader::new(
                gz,
                MultiGzDecoder::new(BufReader::new(file)),
                None,
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::io(
                raw,
                io::Error::new(ErrorKind::NotFound, "not found, with or without .gz"),
            )),
            Err(e) => Err(Error::io(gz, e)),
        }
    }

    fn new(path: PathBuf, inner: impl Read + 'static, raw_len: Option<u64>) -> Self {
        IdxReader {
            path,
            inner: Box::new(inner),
            pos: 0,
            raw_len,
        }
    }

    fn malformed_at(&self, offset: u64, reason: String) -> Error {
        let reason = if self.raw_len.is_none() {
            format!("{reason} (offset in the decompressed data)")
        } else {
            reason
        };
        Error::MalformedData {
            path: self.path.clone(),
            offset,
            reason,
        }
    }

    /// Fills `buf` from the stream; running out of data is a truncated file.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(self.malformed_at(self.pos, format!("file ends inside the {what}")))
                }
                Ok(n) => {
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_error(e, what)),
            }
        }
        Ok(())
    }

    fn read_error(&self, e: io::Error, what: &str) -> Error {
        // flate2 reports a cut or corrupt stream with these kinds; for a raw file they would
        // be genuine I/O failures.
        let bad_stream = matches!(
            e.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::InvalidData | ErrorKind::InvalidInput
        );
        if self.raw_len.is_none() && bad_stream {
            self.malformed_at(
                self.pos,
                format!("truncated or corrupt gzip stream in the {what}: {e}"),
            )
        } else {
            Error::io(&self.path, e)
        }
    }

    fn read_u32(&mut self, what: &str) -> Result<u32> {
        let mut bytes = [0u8; 4];
        self.fill(&mut bytes, what)?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn read_dim(&mut self, what: &str) -> Result<usize> {
        Ok(self.read_u32(what)? as usize)
    }

    fn expect_magic(&mut self, expected: u32, meaning: &str) -> Result<()> {
        let magic = self.read_u32("magic number")?;
        if magic != expected {
            return Err(self.malformed_at(
                0,
                format!(
                    "magic number {magic} ({magic:#010x}) is not {expected} ({expected:#010x}, \
                     IDX {meaning})"
                ),
            ));
        }
        Ok(())
    }

    /// For a raw file, checks up front that it holds all the data its header promises, so
    /// that `split_len` already reports truncation. (A `.gz` file is only found truncated
    /// when reading reaches the cut.)
    fn check_raw_len(&self, expected: u64) -> Result<()> {
        match self.raw_len {
            Some(len) if len < expected => Err(self.malformed_at(
                len,
                format!("file is {len} bytes but its header describes {expected}"),
            )),
            _ => Ok(()),
        }
    }

    fn skip(&mut self, mut n: u64, what: &str) -> Result<()> {
        let mut scratch = [0u8; 64 * 1024];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.fill(&mut scratch[..k], what)?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Reads and discards whatever follows, up to the end of the stream.
    fn read_to_end(&mut self, what: &str) -> Result<()> {
        let mut scratch = [0u8; 64 * 1024];
        loop {
            match self.inner.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(n) => self.pos += n as u64,
                Err(e) => return Err(self.read_error(e, what)),
            }
        }
    }

    /// Reads `n` bytes, growing the buffer as data actually arrives, so that a header that
    /// lies about a `.gz` file's size cannot make us allocate gigabytes up front.
    fn read_vec(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        const CHUNK: usize = 1 << 20;
        let mut out = Vec::with_capacity(n.min(CHUNK));
        while out.len() < n {
            let start = out.len();
            out.resize(start + (n - start).min(CHUNK), 0);
            self.fill(&mut out[start..], what)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holding_inverts_shard_ranges() {
        for total in [1usize, 7, 100, 1001, 49_000] {
            for count in 1..=9usize {
                for index in 0..count {
                    for i in (Shard { index, count }).range(total) {
                        assert_eq!(
                            Shard::holding(i, total, count),
                            index,
                            "i={i} total={total} count={count}"
                        );
                    }
                }
            }
        }
    }
}
