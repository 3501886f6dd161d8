//! Decoding the data of constant tensors (initializers and Constant node values).
//!
//! ONNX stores a tensor's elements either as little-endian bytes in `raw_data` or in the
//! typed repeated field of its data type. Both are read here, for the element types that
//! appear in eval-mode CNN exports: FLOAT and DOUBLE (weights, clip bounds) become f32,
//! INT64 and INT32 (shapes, slice bounds, pads) become i64. Every length is checked
//! against the declared dims, so a corrupt file gives an error rather than a panic.

use super::proto::{DataLocation, DataType, TensorProto};

/// A decoded constant tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    pub dims: Vec<usize>,
    pub data: TensorData,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TensorData {
    Float(Vec<f32>),
    Int(Vec<i64>),
}

impl Tensor {
    /// Decodes `t`; the error is a reason to be wrapped with the tensor's name and the
    /// node that uses it.
    pub fn decode(t: &TensorProto) -> Result<Tensor, String> {
        if t.data_location == DataLocation::External as i32 {
            return Err(
                "its data is stored in an external file, which ccq does not read; \
                        save the model with all tensors inside the .onnx file"
                    .into(),
            );
        }
        let dims = t
            .dims
            .iter()
            .map(|&d| {
                usize::try_from(d)
                    .map_err(|_| format!("negative dimension {d} in dims {:?}", t.dims))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let count = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("dims {:?} overflow the element count", t.dims))?;

        let data_type = DataType::try_from(t.data_type)
            .map_err(|_| format!("unknown data type {}", t.data_type))?;
        let data = match data_type {
            DataType::Float => TensorData::Float(typed_or_raw(t, count, &t.float_data, 4, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            })?),
            DataType::Double => {
                let values = typed_or_raw(t, count, &t.double_data, 8, |b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                })?;
                TensorData::Float(values.into_iter().map(|v| v as f32).collect())
            }
            DataType::Int64 => TensorData::Int(typed_or_raw(t, count, &t.int64_data, 8, |b| {
                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            })?),
            DataType::Int32 => {
                let values = typed_or_raw(t, count, &t.int32_data, 4, |b| {
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]])
                })?;
                TensorData::Int(values.into_iter().map(i64::from).collect())
            }
            other => {
                return Err(format!(
                    "data type {} is not supported (FLOAT, DOUBLE, INT32 and INT64 are)",
                    format!("{other:?}").to_uppercase()
                ))
            }
        };
        Ok(Tensor { dims, data })
    }

    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::Float(v) => v.len(),
            TensorData::Int(v) => v.len(),
        }
    }

    pub fn floats(&self) -> Result<&[f32], String> {
        match &self.data {
            TensorData::Float(v) => Ok(v),
            TensorData::Int(_) => {
                Err("expected a floating-point tensor, found an integer one".into())
            }
        }
    }

    pub fn ints(&self) -> Result<&[i64], String> {
        match &self.data {
            TensorData::Int(v) => Ok(v),
            TensorData::Float(_) => {
                Err("expected an integer tensor, found a floating-point one".into())
            }
        }
    }

    /// The single value of a scalar or one-element tensor.
    pub fn scalar_f32(&self) -> Result<f32, String> {
        match self.floats()? {
            [v] => Ok(*v),
            other => Err(format!(
                "expected a single value, found {} (dims {:?})",
                other.len(),
                self.dims
            )),
        }
    }
}

/// The elements from `raw_data` when present, else from the typed field, checking that
/// there are exactly `count` of them.
fn typed_or_raw<T: Copy>(
    t: &TensorProto,
    count: usize,
    typed: &[T],
    width: usize,
    from_le: impl Fn(&[u8]) -> T,
) -> Result<Vec<T>, String> {
    if !t.raw_data.is_empty() {
        // `count` comes from the file's dims, so its product with the width may overflow.
        if count.checked_mul(width) != Some(t.raw_data.len()) {
            return Err(format!(
                "raw_data has {} bytes, expected {count} elements of {width} bytes for dims {:?}",
                t.raw_data.len(),
                t.dims
            ));
        }
        return Ok(t.raw_data.chunks_exact(width).map(from_le).collect());
    }
    if typed.len() != count {
        return Err(format!(
            "has {} values, expected {count} for dims {:?}",
            typed.len(),
            t.dims
        ));
    }
    Ok(typed.to_vec())
}
