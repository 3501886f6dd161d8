//! `npy:DIR`: NumPy arrays `x_train.npy` (u8 images), `y_train.npy` (integer labels), and
//! `x_test.npy` / `y_test.npy`. Headers are parsed by `ndarray-npy`; pixels are read by
//! byte range, so a worker reads only its shard's records.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ndarray_npy::npy::header::{Header, Layout};

use super::{check_dir, Dataset, Split};
use crate::{Error, Result};

/// Axis order of a 4-D `x_*.npy` array. A 3-D array `N×H×W` is one channel either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NpyLayout {
    /// `layout=nhwc`: `N×H×W×C`, as Keras and most image pipelines store images (default).
    #[default]
    Nhwc,
    /// `layout=nchw`: `N×C×H×W`, as PyTorch tensors are laid out.
    Nchw,
}

impl NpyLayout {
    pub(super) fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        match (key, value) {
            ("layout", "nhwc") => *self = NpyLayout::Nhwc,
            ("layout", "nchw") => *self = NpyLayout::Nchw,
            ("layout", _) => return Err("expected nhwc or nchw".into()),
            _ => return Err("unknown option for npy: (expected layout)".into()),
        }
        Ok(())
    }
}

impl fmt::Display for NpyLayout {
    /// The option string: empty for the default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NpyLayout::Nhwc => Ok(()),
            NpyLayout::Nchw => f.write_str("layout=nchw"),
        }
    }
}

/// An integer element type of a labels array.
#[derive(Debug, Clone, Copy)]
struct IntType {
    bytes: usize,
    signed: bool,
    big_endian: bool,
}

/// One split's two arrays, headers checked against each other and the files' sizes.
pub(super) struct Arrays {
    x_path: PathBuf,
    y_path: PathBuf,
    len: usize,
    channels: usize,
    height: usize,
    width: usize,
    layout: NpyLayout,
    x_data: u64,
    y_data: u64,
    y_type: IntType,
}

pub(super) fn split_len(dir: &Path, layout: NpyLayout, split: Split) -> Result<usize> {
    Ok(Arrays::open(dir, layout, split)?.len())
}

impl Arrays {
    pub(super) fn open(dir: &Path, layout: NpyLayout, split: Split) -> Result<Arrays> {
        check_dir(dir)?;
        let x_path = dir.join(format!("x_{split}.npy"));
        let y_path = dir.join(format!("y_{split}.npy"));
        let (x, x_data) = read_header(&x_path)?;
        let (y, y_data) = read_header(&y_path)?;
        let malformed = |path: &Path, reason: String| Error::MalformedData {
            path: path.to_path_buf(),
            offset: 0,
            reason,
        };

        let x_type = element_type(&x);
        if !matches!(x_type.as_deref(), Some("|u1" | "<u1" | ">u1" | "=u1")) {
            return Err(malformed(
                &x_path,
                format!(
                    "images must be uint8 (dtype '|u1'), not {}: convert with \
                     x.astype(np.uint8) after scaling to 0..255",
                    x.type_descriptor
                ),
            ));
        }
        for (h, path) in [(&x, &x_path), (&y, &y_path)] {
            if h.layout == Layout::Fortran {
                return Err(malformed(
                    path,
                    "the array is stored in Fortran order; save np.ascontiguousarray(a)".into(),
                ));
            }
        }
        let (len, channels, height, width) = match (x.shape.as_slice(), layout) {
            ([n, h, w], _) => (*n, 1, *h, *w),
            ([n, h, w, c], NpyLayout::Nhwc) => (*n, *c, *h, *w),
            ([n, c, h, w], NpyLayout::Nchw) => (*n, *c, *h, *w),
            (shape, _) => {
                return Err(malformed(
                    &x_path,
                    format!(
                        "images must be N×H×W or N×H×W×C (layout=nchw: N×C×H×W), not shape \
                         {shape:?}"
                    ),
                ))
            }
        };
        if [channels, height, width].contains(&0) {
            return Err(malformed(
                &x_path,
                format!("image shape {:?} has an empty axis", x.shape),
            ));
        }
        let image_len = channels
            .checked_mul(height)
            .and_then(|v| v.checked_mul(width))
            .ok_or_else(|| malformed(&x_path, format!("shape {:?} is too large", x.shape)))?;
        check_data_len(&x_path, x_data, len, image_len)?;

        let y_type = element_type(&y)
            .as_deref()
            .and_then(int_type)
            .ok_or_else(|| {
                malformed(
                    &y_path,
                    format!(
                        "labels must be integers (int8 to int64, uint8 to uint64), not {}",
                        y.type_descriptor
                    ),
                )
            })?;
        let y_len = match y.shape.as_slice() {
            [n] | [n, 1] => *n,
            shape => {
                return Err(malformed(
                    &y_path,
                    format!("labels must be a vector of N (or N×1), not shape {shape:?}"),
                ))
            }
        };
        if y_len != len {
            return Err(malformed(
                &y_path,
                format!(
                    "{y_len} labels for the {len} images of {}",
                    x_path.display()
                ),
            ));
        }
        check_data_len(&y_path, y_data, len, y_type.bytes)?;
        Ok(Arrays {
            x_path,
            y_path,
            len,
            channels,
            height,
            width,
            layout,
            x_data,
            y_data,
            y_type,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn labels_path(&self) -> &Path {
        &self.y_path
    }

    /// The largest label plus one, reading the labels file only (each label checked).
    pub(super) fn class_count(&self) -> Result<usize> {
        Ok(self
            .labels(0..self.len)?
            .iter()
            .map(|&l| l as usize + 1)
            .max()
            .unwrap_or(0))
    }

    /// The labels of `range`, each checked to be a byte.
    fn labels(&self, range: Range<usize>) -> Result<Vec<u8>> {
        let t = self.y_type;
        let bytes = read_range(&self.y_path, self.y_data, range.clone(), t.bytes)?;
        let mut labels = Vec::with_capacity(range.len());
        for (i, b) in bytes.chunks_exact(t.bytes).enumerate() {
            let value = int_value(b, t);
            let label = u8::try_from(value).map_err(|_| Error::MalformedData {
                path: self.y_path.clone(),
                offset: self.y_data + ((range.start + i) * t.bytes) as u64,
                reason: format!(
                    "label {value} of record {}: labels must lie in 0..=255",
                    range.start + i
                ),
            })?;
            labels.push(label);
        }
        Ok(labels)
    }

    /// Reads the records in `range` (checked against [`Arrays::len`] by the caller).
    pub(super) fn load(&self, range: Range<usize>) -> Result<Dataset> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let image_len = c * h * w;
        let mut raw = read_range(&self.x_path, self.x_data, range.clone(), image_len)?;
        if self.layout == NpyLayout::Nhwc && c > 1 {
            let mut chw = vec![0u8; raw.len()];
            for (src, dst) in raw
                .chunks_exact(image_len)
                .zip(chw.chunks_exact_mut(image_len))
            {
                for (p, px) in src.chunks_exact(c).enumerate() {
                    for (ch, &v) in px.iter().enumerate() {
                        dst[ch * h * w + p] = v;
                    }
                }
            }
            raw = chw;
        }
        let labels = self.labels(range.clone())?;
        let num_classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        Ok(Dataset {
            channels: c,
            height: h,
            width: w,
            num_classes,
            images: raw,
            labels,
            first_index: range.start,
        })
    }
}

/// The header of `path` and the byte offset where its data starts.
fn read_header(path: &Path) -> Result<(Header, u64)> {
    let mut r = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    let header = Header::from_reader(&mut r).map_err(|e| Error::MalformedData {
        path: path.to_path_buf(),
        offset: 0,
        reason: format!("not a NumPy .npy array: {e}"),
    })?;
    let data = r.stream_position().map_err(|e| Error::io(path, e))?;
    Ok((header, data))
}

/// The dtype string (`'<i8'`, `'|u1'`, ...); structured dtypes have none.
fn element_type(h: &Header) -> Option<String> {
    h.type_descriptor.as_string().cloned()
}

fn int_type(descr: &str) -> Option<IntType> {
    let mut chars = descr.chars();
    let order = chars.next()?;
    let kind = chars.next()?;
    let bytes: usize = chars.as_str().parse().ok()?;
    let big_endian = match order {
        '>' => true,
        '<' | '|' => false,
        '=' => cfg!(target_endian = "big"),
        _ => return None,
    };
    let signed = match kind {
        'i' => true,
        'u' => false,
        _ => return None,
    };
    matches!(bytes, 1 | 2 | 4 | 8).then_some(IntType {
        bytes,
        signed,
        big_endian,
    })
}

fn int_value(b: &[u8], t: IntType) -> i128 {
    let mut le = [0u8; 8];
    for (i, &v) in b.iter().enumerate() {
        le[if t.big_endian { b.len() - 1 - i } else { i }] = v;
    }
    let u = u64::from_le_bytes(le);
    if t.signed {
        // Sign-extend from the element's width.
        let shift = 64 - 8 * t.bytes as u32;
        i128::from(((u << shift) as i64) >> shift)
    } else {
        i128::from(u)
    }
}

/// The file must hold exactly `records × record_bytes` bytes after its header.
fn check_data_len(path: &Path, data: u64, records: usize, record_bytes: usize) -> Result<()> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let want = (records as u128) * (record_bytes as u128);
    let have = u128::from(size.saturating_sub(data));
    if have != want {
        return Err(Error::MalformedData {
            path: path.to_path_buf(),
            offset: size.min(data.saturating_add(want.min(u64::MAX as u128) as u64)),
            reason: format!(
                "the header's shape needs {want} bytes of data after byte {data}, the file \
                 holds {have} (truncated or not written by np.save)"
            ),
        });
    }
    Ok(())
}

fn read_range(path: &Path, data: u64, range: Range<usize>, record_bytes: usize) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let start = data + (range.start * record_bytes) as u64;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; range.len() * record_bytes];
    f.read_exact(&mut buf).map_err(|e| Error::MalformedData {
        path: path.to_path_buf(),
        offset: start,
        reason: format!("cannot read {} bytes of records: {e}", buf.len()),
    })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_types_decode_every_width_and_order() {
        let t = |d: &str| int_type(d).unwrap();
        assert_eq!(int_value(&[0xff], t("|u1")), 255);
        assert_eq!(int_value(&[0xff], t("|i1")), -1);
        assert_eq!(int_value(&[7, 0], t("<i2")), 7);
        assert_eq!(int_value(&[0, 7], t(">i2")), 7);
        assert_eq!(int_value(&[0xfe, 0xff, 0xff, 0xff], t("<i4")), -2);
        assert_eq!(int_value(&[9, 0, 0, 0, 0, 0, 0, 0], t("<i8")), 9);
        assert_eq!(int_value(&[0xff; 8], t("<u8")), u64::MAX as i128);
        for bad in ["<f4", "<i3", "|b1", "u1", "<i", "O"] {
            assert!(int_type(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn layout_option_parses_and_prints() {
        let mut l = NpyLayout::default();
        l.set("layout", "nchw").unwrap();
        assert_eq!(l, NpyLayout::Nchw);
        assert_eq!(l.to_string(), "layout=nchw");
        assert_eq!(NpyLayout::Nhwc.to_string(), "");
        assert!(l.set("layout", "chw").unwrap_err().contains("nhwc or nchw"));
        assert!(l
            .set("order", "nchw")
            .unwrap_err()
            .contains("unknown option"));
    }
}
