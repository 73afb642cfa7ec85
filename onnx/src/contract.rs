//! The mgd3 model contract as ONNX Runtime sees a loaded session: the rules themselves live in
//! [`mgd3_common::contract`] (the coordinator checks the same rules on the file at submit); this
//! module reads a session's inputs, outputs and metadata into that view.

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

pub use mgd3_common::contract::{
    ContractViolation, CudaOnly, DitInfo, Element, Graph, ModelIo, ModelSet, ModelSetMismatch, Precision, TensorDecl,
    VaeInfo,
};

use crate::error::{Error, Result};

/// The element type as ONNX numbers it: ONNX Runtime's C enum is `TensorProto.DataType`.
fn element(ty: TensorElementType) -> Element {
    Element::from_onnx(ort::sys::ONNXTensorElementDataType::from(ty) as i32)
}

fn declare(name: &str, ty: &ValueType) -> TensorDecl {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            TensorDecl { name: name.to_owned(), element: element(*ty), dims: shape.iter().copied().collect() }
        }
        _ => TensorDecl { name: name.to_owned(), element: Element::NotATensor, dims: vec![] },
    }
}

/// Reads the inputs, outputs and custom metadata of the session loaded from `path`.
///
/// # Errors
/// [`Error::Ort`] when ONNX Runtime cannot report the metadata.
pub fn read_io(path: &std::path::Path, session: &Session) -> Result<ModelIo> {
    let metadata = session
        .metadata()
        .and_then(|m| {
            let keys = m.custom_keys()?;
            Ok(keys.into_iter().filter_map(|k| m.custom(&k).map(|v| (k, v))).collect())
        })
        .map_err(Error::ort(format!("reading metadata of `{}`", path.display())))?;
    Ok(ModelIo {
        path: path.to_owned(),
        inputs: session.inputs().iter().map(|o| declare(o.name(), o.dtype())).collect(),
        outputs: session.outputs().iter().map(|o| declare(o.name(), o.dtype())).collect(),
        metadata,
        // Not reported by a session: the file reader fills them.
        ir_version: None,
        opsets: Default::default(),
        // Nor are initializers: the class embedding's rows are read from the file (a file the
        // reader cannot parse, ONNX Runtime just did, so it is left unchecked rather than failed).
        label_tables: mgd3_common::modelmeta::read_model_meta(path).ok().and_then(|file| file.label_tables),
        // A loaded session had every operator it uses.
        foreign_ops: Default::default(),
        default_ops: Default::default(),
        unresolved: Default::default(),
    })
}
