//! What the coordinator needs to know of an ONNX model at submit, without ONNX Runtime: its
//! `metadata_props` (the `mgd3.*` keys `scripts/export_onnx.py` writes) and the shapes of its
//! graph inputs. The file is scanned as protobuf, seeking past everything else (weights
//! included), so a multi-GB model costs a few reads.
//!
//! Protobuf fields used (onnx.proto): ModelProto.graph = 7, ModelProto.metadata_props = 14;
//! StringStringEntryProto.key = 1, .value = 2; GraphProto.input = 11; ValueInfoProto.name = 1,
//! .type = 2; TypeProto.tensor_type = 1; Tensor.shape = 2; TensorShapeProto.dim = 1;
//! Dimension.dim_value = 1, .dim_param = 2.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The metadata and input shapes of one model file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelMeta {
    /// The model's `metadata_props`, key → value (`mgd3.kind`, `mgd3.num_classes`, …).
    pub metadata: BTreeMap<String, String>,
    /// Graph inputs by name: each dimension's static size, `None` for a symbolic one.
    pub inputs: BTreeMap<String, Vec<Option<i64>>>,
}

impl ModelMeta {
    /// A metadata value parsed, when present and well-formed.
    pub fn get<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.metadata.get(key).and_then(|v| v.trim().parse().ok())
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an ONNX model: {what}"))
}

fn varint(r: &mut impl Read) -> std::io::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8];
        r.read_exact(&mut byte)?;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(bad("a varint longer than 10 bytes"))
}

/// Visits the fields of a message of `len` bytes from the reader's position: `visit(field,
/// wire type, length, reader)` for length-delimited fields must consume exactly `length` bytes or
/// return false to have them skipped; other wire types are skipped.
fn fields<R: Read + Seek>(
    r: &mut R,
    len: u64,
    mut visit: impl FnMut(u64, &mut R, u64) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let end = r.stream_position()? + len;
    while r.stream_position()? < end {
        let tag = varint(r)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                varint(r)?;
            }
            1 => {
                r.seek(SeekFrom::Current(8))?;
            }
            5 => {
                r.seek(SeekFrom::Current(4))?;
            }
            2 => {
                let n = varint(r)?;
                let at = r.stream_position()?;
                if at + n > end {
                    return Err(bad("a field runs past its message"));
                }
                if !visit(field, r, n)? {
                    r.seek(SeekFrom::Start(at + n))?;
                }
            }
            _ => return Err(bad("an unknown wire type")),
        }
    }
    Ok(())
}

fn bytes(r: &mut impl Read, n: u64) -> std::io::Result<Vec<u8>> {
    if n > 1 << 20 {
        return Err(bad("a metadata or shape field over 1 MiB"));
    }
    let mut buffer = vec![0u8; n as usize];
    r.read_exact(&mut buffer)?;
    Ok(buffer)
}

/// Parses a small message held in memory.
fn in_memory(
    message: Vec<u8>,
    visit: impl FnMut(u64, &mut std::io::Cursor<Vec<u8>>, u64) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let len = message.len() as u64;
    fields(&mut std::io::Cursor::new(message), len, visit)
}

fn string(r: &mut impl Read, n: u64) -> std::io::Result<String> {
    String::from_utf8(bytes(r, n)?).map_err(|_| bad("a string that is not UTF-8"))
}

/// A ValueInfoProto: its name and its tensor shape.
fn value_info(message: Vec<u8>) -> std::io::Result<(String, Vec<Option<i64>>)> {
    let (mut name, mut dims) = (String::new(), Vec::new());
    in_memory(message, |field, r, n| match field {
        1 => {
            name = string(r, n)?;
            Ok(true)
        }
        2 => {
            let type_proto = bytes(r, n)?;
            in_memory(type_proto, |field, r, n| {
                if field != 1 {
                    return Ok(false);
                }
                in_memory(bytes(r, n)?, |field, r, n| {
                    if field != 2 {
                        return Ok(false);
                    }
                    in_memory(bytes(r, n)?, |field, r, n| {
                        if field != 1 {
                            return Ok(false);
                        }
                        let mut size = None;
                        let dim = bytes(r, n)?;
                        let mut cursor = std::io::Cursor::new(dim);
                        let len = cursor.get_ref().len() as u64;
                        while cursor.position() < len {
                            let tag = varint(&mut cursor)?;
                            match (tag >> 3, tag & 7) {
                                (1, 0) => size = Some(varint(&mut cursor)? as i64),
                                (_, 0) => {
                                    varint(&mut cursor)?;
                                }
                                (_, 2) => {
                                    let n = varint(&mut cursor)?;
                                    cursor.seek(SeekFrom::Current(n as i64))?;
                                }
                                _ => return Err(bad("an unexpected dimension encoding")),
                            }
                        }
                        dims.push(size);
                        Ok(true)
                    })?;
                    Ok(true)
                })?;
                Ok(true)
            })?;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok((name, dims))
}

/// Reads the metadata and graph-input shapes of the ONNX model at `path`.
///
/// # Errors
/// I/O errors, and `InvalidData` for a file that is not an ONNX model.
pub fn read_model_meta(path: &Path) -> std::io::Result<ModelMeta> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut meta = ModelMeta::default();
    fields(&mut r, len, |field, r, n| match field {
        14 => {
            let (mut key, mut value) = (String::new(), String::new());
            in_memory(bytes(r, n)?, |field, r, n| {
                match field {
                    1 => key = string(r, n)?,
                    2 => value = string(r, n)?,
                    _ => return Ok(false),
                }
                Ok(true)
            })?;
            meta.metadata.insert(key, value);
            Ok(true)
        }
        7 => {
            fields(r, n, |field, r, n| {
                if field != 11 {
                    return Ok(false);
                }
                let (name, dims) = value_info(bytes(r, n)?)?;
                meta.inputs.insert(name, dims);
                Ok(true)
            })?;
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
    }

    #[test]
    fn reads_the_mgd3_metadata_and_input_shapes_of_the_fixtures() {
        let dit = read_model_meta(&fixture("tiny_dit.onnx")).unwrap();
        assert_eq!(dit.metadata.get("mgd3.kind").map(String::as_str), Some("dit"));
        assert_eq!(dit.get::<i64>("mgd3.num_classes"), Some(10));
        let x = &dit.inputs["x"];
        assert_eq!((x.len(), x[0], x[1]), (4, None, Some(4)), "{x:?}");
        let encoder = read_model_meta(&fixture("tiny_vae_encoder.onnx")).unwrap();
        assert_eq!(encoder.get::<i64>("mgd3.image_size"), Some(16));
        let error = read_model_meta(&fixture("../../../README.md")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    }
}
