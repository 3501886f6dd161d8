//! One ONNX node as the lowering sees it: a display name for messages, typed attribute
//! access with ONNX defaults, and error constructors that name the node and its op.

use super::proto::{AttributeProto, AttributeType, NodeProto, TensorProto};
use crate::{Error, Result};

pub(crate) struct OnnxNode<'a> {
    pub proto: &'a NodeProto,
    /// The node's ONNX name, or (names are optional) its first output's name.
    pub name: String,
}

impl<'a> OnnxNode<'a> {
    pub fn new(proto: &'a NodeProto, index: usize) -> Self {
        let name = if !proto.name.is_empty() {
            proto.name.clone()
        } else if let Some(out) = proto.output.first().filter(|o| !o.is_empty()) {
            out.clone()
        } else {
            format!("{}#{index}", proto.op_type)
        };
        OnnxNode { proto, name }
    }

    pub fn op(&self) -> &'a str {
        &self.proto.op_type
    }

    pub fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidModel {
            node: self.name.clone(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(&self, reason: impl Into<String>) -> Error {
        Error::UnsupportedOp {
            node: self.name.clone(),
            op: self.proto.op_type.clone(),
            reason: reason.into(),
        }
    }

    /// Name of input `index`, or `None` when it is absent or empty (an omitted optional
    /// input).
    pub fn input(&self, index: usize) -> Option<&'a str> {
        self.proto
            .input
            .get(index)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Name of input `index`, which the op requires.
    pub fn required_input(&self, index: usize) -> Result<&'a str> {
        self.input(index)
            .ok_or_else(|| self.invalid(format!("required input #{index} is missing")))
    }

    pub fn has_attr(&self, name: &str) -> bool {
        self.proto.attribute.iter().any(|a| a.name == name)
    }

    /// The attribute `name`, checking its declared type. Very old exporters leave the type
    /// unset, so UNDEFINED is accepted and the typed field is trusted.
    fn attr(&self, name: &str, ty: AttributeType) -> Result<Option<&'a AttributeProto>> {
        let Some(a) = self.proto.attribute.iter().find(|a| a.name == name) else {
            return Ok(None);
        };
        if a.r#type != ty as i32 && a.r#type != AttributeType::Undefined as i32 {
            let found = AttributeType::try_from(a.r#type)
                .map(|t| format!("{t:?}").to_uppercase())
                .unwrap_or_else(|_| format!("type {}", a.r#type));
            return Err(self.invalid(format!(
                "attribute '{name}' should be {}, found {found}",
                format!("{ty:?}").to_uppercase()
            )));
        }
        Ok(Some(a))
    }

    pub fn int(&self, name: &str, default: i64) -> Result<i64> {
        Ok(self
            .attr(name, AttributeType::Int)?
            .map_or(default, |a| a.i))
    }

    pub fn float(&self, name: &str, default: f32) -> Result<f32> {
        Ok(self
            .attr(name, AttributeType::Float)?
            .map_or(default, |a| a.f))
    }

    pub fn floats(&self, name: &str) -> Result<Option<&'a [f32]>> {
        Ok(self
            .attr(name, AttributeType::Floats)?
            .map(|a| a.floats.as_slice()))
    }

    pub fn ints(&self, name: &str) -> Result<Option<&'a [i64]>> {
        Ok(self
            .attr(name, AttributeType::Ints)?
            .map(|a| a.ints.as_slice()))
    }

    pub fn string(&self, name: &str, default: &str) -> Result<String> {
        match self.attr(name, AttributeType::String)? {
            None => Ok(default.to_string()),
            Some(a) => String::from_utf8(a.s.clone())
                .map_err(|_| self.invalid(format!("attribute '{name}' is not valid UTF-8"))),
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Option<&'a TensorProto>> {
        match self.attr(name, AttributeType::Tensor)? {
            None => Ok(None),
            Some(a) => {
                a.t.as_ref()
                    .map(Some)
                    .ok_or_else(|| self.invalid(format!("attribute '{name}' holds no tensor")))
            }
        }
    }

    /// A per-spatial-axis attribute such as `strides` or `dilations`: two values, each at
    /// least `min`, or `default` when absent.
    pub fn pair(&self, name: &str, default: [usize; 2], min: usize) -> Result<[usize; 2]> {
        let Some(values) = self.ints(name)? else {
            return Ok(default);
        };
        match *values {
            [a, b] => Ok([self.at_least(name, a, min)?, self.at_least(name, b, min)?]),
            _ => Err(self.invalid(format!(
                "attribute '{name}' = {values:?} should have 2 values (2-D op)"
            ))),
        }
    }

    /// The `pads` attribute of a 2-D window op as `[top, left, bottom, right]`.
    pub fn pads(&self) -> Result<[usize; 4]> {
        let Some(values) = self.ints("pads")? else {
            return Ok([0; 4]);
        };
        match *values {
            [t, l, b, r] => Ok([
                self.at_least("pads", t, 0)?,
                self.at_least("pads", l, 0)?,
                self.at_least("pads", b, 0)?,
                self.at_least("pads", r, 0)?,
            ]),
            _ => Err(self.invalid(format!(
                "attribute 'pads' = {values:?} should have 4 values (2-D op)"
            ))),
        }
    }

    fn at_least(&self, name: &str, value: i64, min: usize) -> Result<usize> {
        usize::try_from(value)
            .ok()
            .filter(|&v| v >= min)
            .ok_or_else(|| {
                self.invalid(format!(
                    "attribute '{name}' has value {value}, must be >= {min}"
                ))
            })
    }
}
