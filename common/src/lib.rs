//! ccq-common: everything about networks and data that both the coordinator and the
//! workers need, with no networking in it.
//!
//! Layers, bottom up (see ARCHITECTURE.md):
//! - [`model`]: the typed float graph IR that the importer produces;
//! - [`onnx`]: ONNX protobuf decoding and lowering into the IR (BatchNorm folded away);
//! - [`float`]: the f32 reference engine (reports float accuracy; never used in training);
//! - [`kernels`]: integer kernels, each fast one beside a plain reference;
//! - [`quant`]: post-training quantization of a float graph into a [`qnet::QNetwork`]
//!   (`rounding`: its error-feedback rounding of a layer's codes);
//! - [`qnet`]: the integer-only network and its engine, with the weight codes exposed as
//!   one flat vector of decision variables ([`actclip`]: its searched activation clips);
//! - [`data`]: CIFAR-10 / MNIST readers and deterministic sharding;
//! - [`export`]: writing an integer network out as QDQ ONNX or plain arrays.

pub mod actclip;
pub mod blocks;
pub mod data;
pub mod error;
pub mod export;
pub mod fitness;
pub mod float;
pub mod kernels;
pub mod model;
pub mod onnx;
pub mod qnet;
pub mod quant;
mod rounding;
#[cfg(test)]
mod testutil;

pub use error::{Error, Result};
