//! What the coordinator needs to know of an ONNX model at submit, without ONNX Runtime: its
//! `metadata_props` (the `mgd3.*` keys `scripts/export_onnx.py` writes) and the names, element
//! types and shapes of its graph inputs and outputs, which is all [`crate::contract`] checks
//! ([`read_model_meta`]). The file is scanned as protobuf, seeking past everything else (weights
//! included), so a multi-GB model costs a few reads.
//!
//! It also finds every external-data file a model loads ([`model_files`]): the `location` of each
//! tensor stored outside the `.onnx` (initializers, sparse initializers, tensors in node
//! attributes, in subgraphs too), whatever the files are called (`model.onnx.data` as
//! `scripts/export_onnx.py` writes, `model.onnx_data` as HF optimum and `torch.onnx` do, one
//! file per tensor, subfolders).
//!
//! Protobuf fields used (onnx.proto): ModelProto.graph = 7, ModelProto.metadata_props = 14;
//! StringStringEntryProto.key = 1, .value = 2; GraphProto.input = 11, .output = 12;
//! ValueInfoProto.name = 1, .type = 2; TypeProto.tensor_type = 1; Tensor.elem_type = 1, .shape = 2; TensorShapeProto.dim = 1;
//! Dimension.dim_value = 1, .dim_param = 2; GraphProto.node = 1, .initializer = 5,
//! .sparse_initializer = 15; NodeProto.attribute = 5; AttributeProto.t = 5, .g = 6,
//! .tensors = 10, .graphs = 11; SparseTensorProto.values = 1, .indices = 2;
//! TensorProto.external_data = 13.
//!
//! And it finds the class embedding the DiT's labels index ([`LabelTable`]: a `Gather` on input
//! `y`), so the declared `mgd3.num_classes` is held against the weights, the operators of
//! domains ONNX Runtime does not have (`ModelIo::foreign_ops`), the default-domain op types
//! (`ModelIo::default_ops`) and the names nodes read that nothing defines
//! (`ModelIo::unresolved`): NodeProto.input = 1, .output = 2, .op_type = 4, .attribute = 5,
//! .domain = 7; TensorProto.dims = 1, .name = 8; SparseTensorProto.values = 1;
//! ModelProto.functions = 25, FunctionProto.domain = 10. Only the main graph's nodes are read
//! (a subgraph may read its outer scope's names).

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::contract::{Element, LabelTable, ModelIo, TensorDecl};

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
    visit: impl FnMut(u64, &mut R, u64) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    fields_and_varints(r, len, |_, _| {}, visit)
}

/// [`fields`], also handing each varint field (number, value) to `varint_field`.
fn fields_and_varints<R: Read + Seek>(
    r: &mut R,
    len: u64,
    mut varint_field: impl FnMut(u64, u64),
    mut visit: impl FnMut(u64, &mut R, u64) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let end = r.stream_position()? + len;
    while r.stream_position()? < end {
        let tag = varint(r)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                let value = varint(r)?;
                varint_field(field, value);
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
                    return Err(bad("a field runs past the end of the file or its message, as in a copy cut short"));
                }
                if !visit(field, r, n)? {
                    r.seek(SeekFrom::Start(at + n))?;
                }
            }
            _ => return Err(bad("its bytes are not protobuf, the format of ONNX files")),
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

/// A StringStringEntryProto: its key and value.
fn string_entry(message: Vec<u8>) -> std::io::Result<(String, String)> {
    let (mut key, mut value) = (String::new(), String::new());
    in_memory(message, |field, r, n| {
        match field {
            1 => key = string(r, n)?,
            2 => value = string(r, n)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok((key, value))
}

/// One field of a small message held in memory: a varint's value, or a length-delimited
/// field's bytes (fixed-size fields are skipped).
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Visits the varint and length-delimited fields of a message held in memory.
fn each_field(message: &[u8], mut visit: impl FnMut(u64, Field<'_>) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut cursor = std::io::Cursor::new(message);
    let len = message.len() as u64;
    while cursor.position() < len {
        let tag = varint(&mut cursor)?;
        let field = tag >> 3;
        match tag & 7 {
            0 => visit(field, Field::Varint(varint(&mut cursor)?))?,
            1 => drop(cursor.seek(SeekFrom::Current(8))?),
            5 => drop(cursor.seek(SeekFrom::Current(4))?),
            2 => {
                let n = varint(&mut cursor)?;
                let start = cursor.position();
                let end = start
                    .checked_add(n)
                    .filter(|end| *end <= len)
                    .ok_or_else(|| bad("a field longer than its message"))?;
                visit(field, Field::Bytes(&message[start as usize..end as usize]))?;
                cursor.set_position(end);
            }
            _ => return Err(bad("an unknown wire type")),
        }
    }
    Ok(())
}

/// A ValueInfoProto: its name, element type and shape (`-1` for a symbolic or absent
/// dimension), as ONNX Runtime would report the input or output.
fn value_info(message: &[u8]) -> std::io::Result<TensorDecl> {
    let mut decl = TensorDecl { name: String::new(), element: Element::NotATensor, dims: Vec::new() };
    each_field(message, |field, value| {
        match (field, value) {
            (1, Field::Bytes(name)) => {
                decl.name = String::from_utf8(name.to_vec()).map_err(|_| bad("a name that is not UTF-8"))?;
            }
            // TypeProto.tensor_type; the other kinds (sequence, map, optional) stay NotATensor.
            (2, Field::Bytes(type_proto)) => each_field(type_proto, |field, value| {
                let (1, Field::Bytes(tensor)) = (field, value) else { return Ok(()) };
                decl.element = Element::from_onnx(0);
                each_field(tensor, |field, value| {
                    match (field, value) {
                        (1, Field::Varint(code)) => decl.element = Element::from_onnx(code as i32),
                        (2, Field::Bytes(shape)) => each_field(shape, |field, value| {
                            let (1, Field::Bytes(dim)) = (field, value) else { return Ok(()) };
                            let mut size = -1;
                            each_field(dim, |field, value| {
                                if let (1, Field::Varint(v)) = (field, value) {
                                    size = v as i64;
                                }
                                Ok(())
                            })?;
                            decl.dims.push(size);
                            Ok(())
                        })?,
                        _ => {}
                    }
                    Ok(())
                })
            })?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(decl)
}

/// What a file is, by its first bytes, when it is an archive or a compressed file rather than a
/// model: said instead of "not protobuf", with what to do.
fn archive_kind(magic: &[u8]) -> Option<&'static str> {
    match magic {
        [b'P', b'K', 3, 4, ..] => Some("a zip archive, as torch.save writes PyTorch checkpoints"),
        [0x1f, 0x8b, ..] => Some("gzip-compressed: decompress it first (gunzip)"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd-compressed: decompress it first (zstd -d)"),
        [0xfd, b'7', b'z', b'X', b'Z', 0] => Some("xz-compressed: decompress it first (xz -d)"),
        [b'B', b'Z', b'h', ..] => Some("bzip2-compressed: decompress it first (bunzip2)"),
        _ => None,
    }
}

/// Reads what the mgd3 contract checks of the ONNX model at `path`: its metadata and its graph
/// inputs and outputs ([`ModelIo`], the view [`crate::contract`] checks), without the weights.
///
/// # Errors
/// I/O errors (`IsADirectory` for a folder), and `InvalidData` for a file that is not an ONNX
/// model: one that is not protobuf, or has no graph (an empty file, or protobuf of another
/// kind); see [`is_not_a_model`].
pub fn read_model_meta(path: &Path) -> std::io::Result<ModelIo> {
    let file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    if metadata.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "a folder, not an ONNX model file: give the `.onnx` file in it",
        ));
    }
    let len = metadata.len();
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 6];
    let read = r.read(&mut magic)?;
    if let Some(what) = archive_kind(&magic[..read]) {
        return Err(bad(what));
    }
    r.rewind()?;
    let mut meta = ModelIo { path: path.to_owned(), ..ModelIo::default() };
    let mut graph = false;
    let mut ir_version = None;
    let mut wiring = Wiring::default();
    fields_and_varints(
        &mut r,
        len,
        // ModelProto.ir_version
        |field, value| {
            if field == 1 {
                ir_version = Some(value);
            }
        },
        |field, r, n| match field {
            // ModelProto.opset_import: OperatorSetIdProto { domain = 1, version = 2 }
            8 => {
                let (mut domain, mut version) = (String::new(), 0);
                each_field(&bytes(r, n)?, |field, value| {
                    match (field, value) {
                        (1, Field::Bytes(name)) => domain = String::from_utf8_lossy(name).into_owned(),
                        (2, Field::Varint(v)) => version = v,
                        _ => {}
                    }
                    Ok(())
                })?;
                meta.opsets.insert(domain, version);
                Ok(true)
            }
            14 => {
                let (key, value) = string_entry(bytes(r, n)?)?;
                meta.metadata.insert(key, value);
                Ok(true)
            }
            // ModelProto.functions: FunctionProto.domain = 10 (its nodes are not kept).
            25 => {
                fields(r, n, |field, r, n| {
                    if field != 10 {
                        return Ok(false);
                    }
                    wiring.function_domains.insert(string(r, n)?);
                    Ok(true)
                })?;
                Ok(true)
            }
            7 => {
                graph = true;
                fields(r, n, |field, r, n| {
                    match field {
                        11 => meta.inputs.push(value_info(&bytes(r, n)?)?),
                        12 => meta.outputs.push(value_info(&bytes(r, n)?)?),
                        1 => node(r, n, &mut wiring)?,
                        5 => {
                            let (name, dims) = tensor_shape(r, n)?;
                            wiring.constants.insert(name, dims);
                        }
                        // SparseTensorProto: its name is its `values` tensor's (field 1).
                        15 => fields(r, n, |field, r, n| {
                            if field != 1 {
                                return Ok(false);
                            }
                            wiring.sparse.insert(tensor_shape(r, n)?.0);
                            Ok(true)
                        })?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(true)
            }
            _ => Ok(false),
        },
    )
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad("it ends inside a field, as a copy cut short does")
        } else {
            e
        }
    })?;
    if !graph {
        return Err(bad(if len == 0 { "the file is empty" } else { "it has no graph" }));
    }
    meta.ir_version = ir_version;
    meta.label_tables = Some(wiring.label_tables());
    for (domain, op) in &wiring.domain_ops {
        if !crate::contract::ORT_DOMAINS.contains(&domain.as_str()) && !wiring.function_domains.contains(domain) {
            meta.foreign_ops.entry(domain.clone()).or_default().insert(op.clone());
        }
    }
    meta.unresolved = wiring.unresolved(&meta);
    meta.default_ops = std::mem::take(&mut wiring.default_ops);
    Ok(meta)
}

/// Ops a label passes through unchanged on its way to its embedding (and a table on its way to
/// the `Gather`): what [`Wiring::label_tables`] follows.
const PASS_THROUGH: [&str; 7] = ["Cast", "CastLike", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"];

/// Just enough of a graph's nodes and constants to find its class embedding tables: the
/// `Gather`s and pass-through nodes (op, inputs, outputs) and every initializer's and
/// `Constant`'s shape by name (never their data).
#[derive(Default)]
struct Wiring {
    nodes: Vec<(String, Vec<String>, Vec<String>)>,
    constants: std::collections::HashMap<String, Vec<u64>>,
    /// (domain, op type) of every node outside the default domain.
    domain_ops: std::collections::BTreeSet<(String, String)>,
    /// The domains of the functions the model defines.
    function_domains: std::collections::BTreeSet<String>,
    /// The op type of every node in the default domain (`""` or `ai.onnx`).
    default_ops: std::collections::BTreeSet<String>,
    /// Every name a node reads (but the empty name of an omitted optional input), in order.
    reads: Vec<String>,
    /// Every name a node writes.
    writes: std::collections::HashSet<String>,
    /// The sparse initializers' names.
    sparse: std::collections::HashSet<String>,
}

impl Wiring {
    /// The names a node reads, then the graph outputs, that nothing defines (graph input,
    /// initializer, sparse initializer, node output), each once, in the order met. Node order is
    /// not held against the data flow: ONNX Runtime sorts the nodes itself.
    fn unresolved(&self, meta: &ModelIo) -> Vec<String> {
        let defined = |name: &str| {
            self.writes.contains(name)
                || self.constants.contains_key(name)
                || self.sparse.contains(name)
                || meta.inputs.iter().any(|d| d.name == name)
        };
        let mut seen = std::collections::HashSet::new();
        self.reads
            .iter()
            .map(String::as_str)
            .chain(meta.outputs.iter().map(|d| d.name.as_str()))
            .filter(|name| !defined(name) && seen.insert(*name))
            .map(str::to_owned)
            .collect()
    }

    /// The tables `Gather` nodes index with the graph input `y`, in node order, each once.
    fn label_tables(&self) -> Vec<LabelTable> {
        // Everything `y` reaches through pass-through ops (to a fixpoint: node order is not
        // trusted to be topological).
        let mut labels: std::collections::HashSet<&str> = std::collections::HashSet::from(["y"]);
        loop {
            let before = labels.len();
            for (op, inputs, outputs) in &self.nodes {
                if PASS_THROUGH.contains(&op.as_str()) && inputs.first().is_some_and(|i| labels.contains(i.as_str())) {
                    labels.extend(outputs.iter().map(String::as_str));
                }
            }
            if labels.len() == before {
                break;
            }
        }
        let mut tables: Vec<LabelTable> = Vec::new();
        for (op, inputs, _) in &self.nodes {
            let (Some(data), Some(indices)) = (inputs.first(), inputs.get(1)) else { continue };
            if op != "Gather" || !labels.contains(indices.as_str()) {
                continue;
            }
            // Back from the data through casts (an fp16 table cast up, say) to its constant.
            let mut name = data.as_str();
            for _ in 0..self.nodes.len() {
                if self.constants.contains_key(name) {
                    break;
                }
                let Some((_, inputs, _)) = self
                    .nodes
                    .iter()
                    .find(|(op, _, outputs)| PASS_THROUGH.contains(&op.as_str()) && outputs.iter().any(|o| o == name))
                else {
                    break;
                };
                let Some(input) = inputs.first() else { break };
                name = input;
            }
            if let Some(&rows) = self.constants.get(name).and_then(|dims| dims.first())
                && !tables.iter().any(|t| t.name == name)
            {
                tables.push(LabelTable { name: name.to_owned(), rows });
            }
        }
        tables
    }
}

/// A NodeProto (input = 1, output = 2, op_type = 4, attribute = 5, domain = 7): kept in `wiring`
/// when it is a `Gather` or passes a tensor through; a `Constant`'s tensor is kept as a
/// constant; its op type (with its domain when outside the default domain) and the names it
/// reads and writes are noted.
fn node<R: Read + Seek>(r: &mut R, n: u64, wiring: &mut Wiring) -> std::io::Result<()> {
    let (mut op, mut inputs, mut outputs) = (String::new(), Vec::new(), Vec::new());
    let (mut constant, mut domain) = (None, String::new());
    fields(r, n, |field, r, n| {
        match field {
            1 => inputs.push(string(r, n)?),
            2 => outputs.push(string(r, n)?),
            4 => op = string(r, n)?,
            7 => domain = string(r, n)?,
            // AttributeProto.t = 5 (`value`, the only tensor attribute of `Constant`); writers
            // put op_type before the attributes, as protobuf orders fields by number.
            5 if op == "Constant" => fields(r, n, |field, r, n| {
                if field != 5 {
                    return Ok(false);
                }
                constant = Some(tensor_shape(r, n)?.1);
                Ok(true)
            })?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if domain.is_empty() || domain == "ai.onnx" {
        wiring.default_ops.insert(op.clone());
    } else {
        wiring.domain_ops.insert((domain, op.clone()));
    }
    wiring.reads.extend(inputs.iter().filter(|i| !i.is_empty()).cloned());
    wiring.writes.extend(outputs.iter().filter(|o| !o.is_empty()).cloned());
    match (op.as_str(), constant, outputs.first()) {
        ("Constant", Some(dims), Some(output)) => {
            wiring.constants.insert(output.clone(), dims);
        }
        (op, _, _) if op == "Gather" || PASS_THROUGH.contains(&op) => {
            wiring.nodes.push((op.to_owned(), inputs, outputs))
        }
        _ => {}
    }
    Ok(())
}

/// A TensorProto's name (8) and dims (1, packed or not), seeking past its data.
fn tensor_shape<R: Read + Seek>(r: &mut R, n: u64) -> std::io::Result<(String, Vec<u64>)> {
    let mut dims = Vec::new();
    let mut packed = Vec::new();
    let mut name = String::new();
    fields_and_varints(
        r,
        n,
        |field, value| {
            if field == 1 {
                dims.push(value);
            }
        },
        |field, r, n| {
            match field {
                8 => name = string(r, n)?,
                1 => each_varint(&bytes(r, n)?, &mut packed)?,
                _ => return Ok(false),
            }
            Ok(true)
        },
    )?;
    dims.extend(packed);
    Ok((name, dims))
}

/// The varints of a packed repeated field.
fn each_varint(message: &[u8], out: &mut Vec<u64>) -> std::io::Result<()> {
    let mut cursor = std::io::Cursor::new(message);
    while cursor.position() < message.len() as u64 {
        out.push(varint(&mut cursor)?);
    }
    Ok(())
}

impl ModelFilesError {
    /// The model the error is about (for an unreadable file, that file).
    pub fn model(&self) -> &Path {
        match self {
            ModelFilesError::Io { path, .. } => path,
            ModelFilesError::OutsideFolder { model, .. }
            | ModelFilesError::Truncated { model, .. }
            | ModelFilesError::NotAFile { model, .. }
            | ModelFilesError::Missing { model, .. } => model,
        }
    }
}

/// Where `path` points when it is a symbolic link to nothing (its target moved or never copied
/// to this node): a "does not exist" that names the link's target says which file is missing.
pub fn dangling_link(path: &Path) -> Option<std::path::PathBuf> {
    let link = std::fs::symlink_metadata(path).ok()?;
    (link.file_type().is_symlink() && !path.exists()).then(|| std::fs::read_link(path).ok()).flatten()
}

/// Appends `v` as a protobuf varint.
fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends a length-delimited protobuf field.
fn put_bytes(field: u64, body: &[u8], out: &mut Vec<u8>) {
    put_varint(field << 3 | 2, out);
    put_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

/// The ONNX model `bytes` (a whole `.onnx` file in memory) with metadata `key` set to `value`:
/// its other top-level fields kept as they are, entries of `key` replaced by one at the end. For
/// relabelling a model without the `onnx` package (tests make models that disagree this way).
///
/// # Errors
/// `InvalidData` when `bytes` are not protobuf.
pub fn with_metadata(bytes: &[u8], key: &str, value: &str) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len() + key.len() + value.len() + 8);
    let mut cursor = std::io::Cursor::new(bytes);
    while (cursor.position() as usize) < bytes.len() {
        let start = cursor.position() as usize;
        let tag = varint(&mut cursor)?;
        match tag & 7 {
            0 => drop(varint(&mut cursor)?),
            1 => cursor.set_position(cursor.position() + 8),
            5 => cursor.set_position(cursor.position() + 4),
            2 => {
                let n = varint(&mut cursor)?;
                let body_start = cursor.position() as usize;
                let end = body_start.checked_add(n as usize).filter(|end| *end <= bytes.len());
                let end = end.ok_or_else(|| bad("a field longer than the file"))?;
                cursor.set_position(end as u64);
                if tag >> 3 == 14 && string_entry(bytes[body_start..end].to_vec())?.0 == key {
                    continue;
                }
            }
            _ => return Err(bad("its bytes are not protobuf, the format of ONNX files")),
        }
        let end = (cursor.position() as usize).min(bytes.len());
        out.extend_from_slice(&bytes[start..end]);
    }
    let mut entry = Vec::new();
    put_bytes(1, key.as_bytes(), &mut entry);
    put_bytes(2, value.as_bytes(), &mut entry);
    put_bytes(14, &entry, &mut out);
    Ok(out)
}

/// Whether an error of [`read_model_meta`] says the file is there but is no ONNX model (not
/// protobuf, no graph, cut short, a folder: its message reads after "`path` is "), rather than
/// that it cannot be read (missing, no permission): the first is the wrong file, the second may
/// be a path only the workers see.
pub fn is_not_a_model(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::IsADirectory)
}

/// What to do about a file that [`is_not_a_model`], to follow its error ("`…` is {error}{advice}"):
/// for a file, where the model files come from; a folder's error says it itself.
pub fn not_a_model_advice(error: &std::io::Error) -> &'static str {
    match error.kind() {
        // A compressed file's own error says what to do.
        std::io::ErrorKind::InvalidData if error.to_string().contains("decompress it first") => "",
        std::io::ErrorKind::InvalidData => {
            "; give the `.onnx` file scripts/export_onnx.py wrote, exporting a PyTorch or safetensors checkpoint first"
        }
        _ => "",
    }
}

/// Why the files of a model cannot be listed, or cannot all be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelFilesError {
    /// A file of the model cannot be read.
    #[error("cannot read `{path}`")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An external-data location that ONNX Runtime refuses to load: absolute, or leading out of
    /// the model's folder.
    #[error(
        "model `{model}` keeps weights in `{location}`, outside its own folder (directly, or through a link); ONNX \
         Runtime loads external data only from the model's folder: copy the file there instead of linking it, or re-save the model with its weights beside it \
         (onnx.save_model(..., save_as_external_data=True, location=\"<name>.onnx.data\"))"
    )]
    OutsideFolder {
        /// The model file.
        model: std::path::PathBuf,
        /// The location as the model writes it.
        location: String,
    },
    /// An external-data file is shorter than the tensors the model keeps in it need.
    #[error(
        "model `{model}` keeps weights in `{location}` up to byte {needed}, but the file has {size} bytes: it was cut \
         short (an interrupted copy or download); copy it again"
    )]
    Truncated {
        /// The model file.
        model: std::path::PathBuf,
        /// The location as the model writes it.
        location: String,
        /// Its size.
        size: u64,
        /// The end of the last tensor in it.
        needed: u64,
    },
    /// An external-data location names something other than a regular file.
    #[error(
        "model `{model}` keeps weights in `{location}`, which is not a regular file (a folder, a FIFO or a device)"
    )]
    NotAFile {
        /// The model file.
        model: std::path::PathBuf,
        /// The location as the model writes it.
        location: String,
    },
    /// An external-data file the model names does not exist beside it.
    #[error(
        "model `{model}` keeps weights in `{location}`, which is not there (looked for `{path}`): copy every file \
         the model was saved with into its folder"
    )]
    Missing {
        /// The model file.
        model: std::path::PathBuf,
        /// The location as the model writes it.
        location: String,
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
}

/// One external-data file of a model: its location as the model writes it, and the end of the
/// last tensor kept in it (offset + length, in bytes; 0 when no tensor says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalData {
    /// The location, relative to the model's folder.
    pub location: String,
    /// The file must hold at least this many bytes.
    pub end: u64,
}

/// Whether an external-data location, as a model writes it, can lead out of the model's folder
/// (absolute, `..`, empty): ONNX Runtime refuses those.
pub fn leaves_the_folder(location: &str) -> bool {
    let relative = Path::new(location);
    location.is_empty()
        || relative.is_absolute()
        || relative.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
}

/// A TensorProto: records its external-data `location` and where its bytes end, if any.
fn tensor<R: Read + Seek>(r: &mut R, n: u64, found: &mut Vec<ExternalData>) -> std::io::Result<()> {
    let (mut location, mut offset, mut length) = (None, 0u64, 0u64);
    fields(r, n, |field, r, n| {
        if field != 13 {
            return Ok(false);
        }
        let (key, value) = string_entry(bytes(r, n)?)?;
        match key.as_str() {
            "location" => location = Some(value),
            "offset" => offset = value.trim().parse().unwrap_or(0),
            "length" => length = value.trim().parse().unwrap_or(0),
            _ => {}
        }
        Ok(true)
    })?;
    if let Some(location) = location {
        let end = offset.saturating_add(length);
        match found.iter_mut().find(|f| f.location == location) {
            Some(file) => file.end = file.end.max(end),
            None => found.push(ExternalData { location, end }),
        }
    }
    Ok(())
}

/// A GraphProto: the external-data locations of its initializers and node attributes, and of
/// its subgraphs'.
fn graph<R: Read + Seek>(r: &mut R, n: u64, found: &mut Vec<ExternalData>) -> std::io::Result<()> {
    fields(r, n, |field, r, n| match field {
        5 => tensor(r, n, found).map(|()| true),
        15 => fields(r, n, |field, r, n| match field {
            1 | 2 => tensor(r, n, found).map(|()| true),
            _ => Ok(false),
        })
        .map(|()| true),
        1 => fields(r, n, |field, r, n| {
            if field != 5 {
                return Ok(false);
            }
            fields(r, n, |field, r, n| match field {
                5 | 10 => tensor(r, n, found).map(|()| true),
                6 | 11 => graph(r, n, found).map(|()| true),
                _ => Ok(false),
            })
            .map(|()| true)
        })
        .map(|()| true),
        _ => Ok(false),
    })
}

/// The external-data locations the ONNX model at `path` names, in order of first use, each once
/// (empty for a model that keeps its weights inside).
///
/// # Errors
/// I/O errors, and `InvalidData` for a file that is not an ONNX model.
pub fn external_data_locations(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(external_data(path)?.into_iter().map(|f| f.location).collect())
}

/// The external-data files the ONNX model at `path` names, in order of first use, each once,
/// with the size each must have.
///
/// # Errors
/// I/O errors, and `InvalidData` for a file that is not an ONNX model.
pub fn external_data(path: &Path) -> std::io::Result<Vec<ExternalData>> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut found = Vec::new();
    fields(&mut r, len, |field, r, n| match field {
        7 => graph(r, n, &mut found).map(|()| true),
        _ => Ok(false),
    })?;
    Ok(found)
}

/// Every file ONNX Runtime reads to load the model at `path`: the model, then each external-data
/// file its tensors name, in order of first use (beside the file a link points to, for a model
/// given as a link: it is loaded where it lies). A file that does not parse as ONNX is listed
/// alone (loading it fails later, with ONNX Runtime's own message).
///
/// # Errors
/// [`ModelFilesError::Io`] when the model cannot be read, [`ModelFilesError::OutsideFolder`] for
/// an absolute location or one leading out of the model's folder (also through a link, as ONNX
/// Runtime resolves it: the file must lie in the folder of the model file once its own links are
/// resolved), [`ModelFilesError::Missing`] for a named file that is not there,
/// [`ModelFilesError::NotAFile`] for a folder, [`ModelFilesError::Truncated`] for a file shorter
/// than its tensors.
pub fn model_files(path: &Path) -> Result<Vec<std::path::PathBuf>, ModelFilesError> {
    match files_beside(path) {
        // A link to a model whose data files lie beside the file, not the link: loaded where it
        // lies ([`load_path`]).
        Err(ModelFilesError::Missing { .. }) if load_path(path) != path => {
            files_beside(&load_path(path)).map(|mut files| {
                files[0] = path.to_owned();
                files
            })
        }
        other => other,
    }
}

/// The path to give ONNX Runtime for the model at `path`: `path` itself, or for a link whose
/// external-data files are not beside it but beside the file it points to, that file (ONNX
/// Runtime looks for them beside the path it is given). The Hugging Face cache's links, whose
/// data files are links beside them, load as given.
pub fn load_path(path: &Path) -> std::path::PathBuf {
    if !path.is_symlink() || !matches!(files_beside(path), Err(ModelFilesError::Missing { .. })) {
        return path.to_owned();
    }
    match std::fs::canonicalize(path) {
        Ok(real) if files_beside(&real).is_ok() => real,
        _ => path.to_owned(),
    }
}

/// [`model_files`] of the model at `path`, its data files looked for beside `path`.
fn files_beside(path: &Path) -> Result<Vec<std::path::PathBuf>, ModelFilesError> {
    let locations = match external_data(path) {
        Ok(locations) => locations,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData || e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Vec::new()
        }
        Err(source) => return Err(ModelFilesError::Io { path: path.to_owned(), source }),
    };
    let folder = path.parent().unwrap_or(Path::new(""));
    let mut files = vec![path.to_owned()];
    let allowed = || {
        std::fs::canonicalize(path)
            .map(|real| real.parent().map(Path::to_path_buf).unwrap_or_default())
            .map_err(|source| ModelFilesError::Io { path: path.to_owned(), source })
    };
    for ExternalData { location, end } in locations {
        let relative = Path::new(&location);
        if leaves_the_folder(&location) {
            return Err(ModelFilesError::OutsideFolder { model: path.to_owned(), location });
        }
        let file = folder.join(relative);
        let Ok(meta) = std::fs::metadata(&file) else {
            return Err(ModelFilesError::Missing { model: path.to_owned(), location, path: file });
        };
        if !meta.is_file() {
            return Err(ModelFilesError::NotAFile { model: path.to_owned(), location });
        }
        let real = std::fs::canonicalize(&file).map_err(|source| ModelFilesError::Io { path: file.clone(), source })?;
        if !real.starts_with(allowed()?) {
            return Err(ModelFilesError::OutsideFolder { model: path.to_owned(), location });
        }
        if meta.len() < end {
            return Err(ModelFilesError::Truncated { model: path.to_owned(), location, size: meta.len(), needed: end });
        }
        files.push(file);
    }
    Ok(files)
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
        let x = dit.input("x").unwrap();
        assert_eq!((x.element, &x.dims[..]), (Element::Float32, &[-1, 4, 8, 8][..]), "{x:?}");
        let y = dit.input("y").unwrap();
        assert_eq!((y.element, &y.dims[..]), (Element::Int64, &[-1][..]), "{y:?}");
        let out: Vec<&str> = dit.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(out, ["out"]);
        crate::contract::DitInfo::from_io(&dit).unwrap();
        assert_eq!(dit.ir_version, Some(10));
        assert_eq!(dit.opsets.iter().map(|(d, v)| (d.as_str(), *v)).collect::<Vec<_>>(), [("", 18)]);
        let encoder = read_model_meta(&fixture("tiny_vae_encoder.onnx")).unwrap();
        assert_eq!(encoder.get::<i64>("mgd3.image_size"), Some(16));
        // A later ir_version wins (protobuf's rule for a scalar), and each opset's domain is its own.
        let mut bytes = std::fs::read(fixture("tiny_dit.onnx")).unwrap();
        bytes.extend([0x08, 99]);
        let mut opset = Vec::new();
        put_bytes(1, b"com.microsoft", &mut opset);
        opset.extend([0x10, 1]);
        put_bytes(8, &opset, &mut bytes);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), bytes).unwrap();
        let newer = read_model_meta(&dir.path().join("m.onnx")).unwrap();
        assert_eq!(newer.ir_version, Some(99));
        assert_eq!(
            newer.opsets.iter().map(|(d, v)| (d.as_str(), *v)).collect::<Vec<_>>(),
            [("", 18), ("com.microsoft", 1)]
        );
        let error = read_model_meta(&fixture("../../../README.md")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    }

    /// Files that are there but are no ONNX model are told apart from files that cannot be read:
    /// text, an empty file, protobuf without a graph, a model cut short, a zip (a PyTorch
    /// checkpoint), a folder.
    #[test]
    fn files_that_are_no_onnx_model_are_told_apart_from_unreadable_ones() {
        let dir = tempfile::tempdir().unwrap();
        let dit = std::fs::read(fixture("tiny_dit.onnx")).unwrap();
        let cases: [(&str, Vec<u8>); 9] = [
            ("text", b"not a model\n".to_vec()),
            ("empty", Vec::new()),
            ("metadata only", ld(14, &[ld(1, b"mgd3.kind"), ld(2, b"dit")].concat())),
            ("cut short", dit[..dit.len() / 2].to_vec()),
            ("zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl".to_vec()),
            ("gzip", vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]),
            ("zstd", vec![0x28, 0xb5, 0x2f, 0xfd, 0x24, 0x10]),
            ("xz", b"\xfd7zXZ\x00\x00\x04".to_vec()),
            ("bzip2", b"BZh91AY&SY".to_vec()),
        ];
        for (name, bytes) in cases {
            let path = dir.path().join(format!("{name}.onnx"));
            std::fs::write(&path, bytes).unwrap();
            let error = read_model_meta(&path).unwrap_err();
            assert!(is_not_a_model(&error), "{name}: {error:?}");
            let said = match name {
                "zip" => "as torch.save writes",
                "gzip" => "gzip-compressed: decompress it first",
                "zstd" => "zstd -d",
                "xz" => "xz -d",
                "bzip2" => "bunzip2",
                "cut short" => "cut short",
                "text" => "not protobuf",
                "empty" => "empty",
                _ => "no graph",
            };
            assert!(error.to_string().contains(said), "{name}: {error}");
        }
        let error = read_model_meta(dir.path()).unwrap_err();
        assert!(is_not_a_model(&error) && error.to_string().contains("folder"), "{error:?}");
        let error = read_model_meta(&dir.path().join("absent.onnx")).unwrap_err();
        assert!(!is_not_a_model(&error), "{error:?}");
    }

    /// Protobuf by hand: a length-delimited field.
    fn ld(field: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(field, body, &mut out);
        out
    }

    /// The class embedding is found behind `y` in each fixture DiT's layout (one table; one per
    /// block in the diffusers export, same rows), and nowhere in a graph without one.
    #[test]
    fn the_class_embedding_the_labels_index_is_found_with_its_rows() {
        let tables = |name: &str| read_model_meta(&fixture(name)).unwrap().label_tables.unwrap();
        let one = vec![LabelTable { name: "y_embedder.embedding_table.weight".into(), rows: 11 }];
        assert_eq!(tables("tiny_dit.onnx"), one);
        assert_eq!(tables("tiny_dit_fp16.onnx"), one);
        assert_eq!(tables("tiny_dit_fused.onnx"), one);
        let diffusers = tables("tiny_dit_diffusers.onnx");
        assert_eq!((diffusers.len(), diffusers.iter().all(|t| t.rows == 11)), (2, true), "{diffusers:?}");
        assert_eq!(tables("bf16_dit.onnx"), vec![]);
        assert_eq!(tables("tiny_vae_encoder.onnx"), vec![]);
        // A DiT whose metadata was edited to more classes than its table holds is refused.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relabelled.onnx");
        let dit = std::fs::read(fixture("tiny_dit.onnx")).unwrap();
        std::fs::write(&path, with_metadata(&dit, "mgd3.num_classes", "1000").unwrap()).unwrap();
        let error = crate::contract::DitInfo::from_io(&read_model_meta(&path).unwrap()).unwrap_err();
        assert!(error.to_string().contains("11 rows: 10 classes and the null class"), "{error}");
    }

    /// Casts and reshapes between `y` and the `Gather` (nodes out of order), a table cast on its
    /// way from a `Constant` with packed dims, and a `Gather` on something else are all read as
    /// they should be.
    #[test]
    fn labels_and_tables_are_followed_through_casts_and_constants() {
        let node = |op: &str, inputs: &[&str], output: &str, attribute: Option<Vec<u8>>| {
            let mut body: Vec<u8> = inputs.iter().flat_map(|i| ld(1, i.as_bytes())).collect();
            body.extend(ld(2, output.as_bytes()));
            body.extend(ld(4, op.as_bytes()));
            if let Some(attribute) = attribute {
                body.extend(ld(5, &attribute));
            }
            ld(1, &body)
        };
        let mut packed = Vec::new();
        for d in [7u64, 3] {
            put_varint(d, &mut packed);
        }
        let constant =
            [ld(1, b"value"), ld(5, &[ld(1, &packed), ld(8, b"table16"), ld(9, &[0; 42])].concat())].concat();
        // An unpacked initializer (dims as separate varints) the timestep Gather reads.
        let initializer = ld(5, &[vec![1 << 3, 100, 1 << 3, 1], ld(8, b"steps")].concat());
        let graph = [
            node("Gather", &["table", "y64"], "embedding", None),
            node("Cast", &["y"], "y64", None),
            node("Cast", &["table16"], "table", None),
            node("Constant", &[], "table16", Some(constant)),
            node("Gather", &["steps", "t"], "step", None),
            initializer,
        ]
        .concat();
        let model = ld(7, &graph);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, model).unwrap();
        let tables = read_model_meta(&path).unwrap().label_tables.unwrap();
        assert_eq!(tables, vec![LabelTable { name: "table16".into(), rows: 7 }]);
    }

    /// Operators of a domain ONNX Runtime lacks are named, unless the model defines functions
    /// in that domain (as torch's dynamo exports do); ONNX Runtime's own domains are not.
    #[test]
    fn operators_of_domains_onnx_runtime_lacks_are_found() {
        let node = |op: &str, domain: &str| {
            ld(1, &[ld(1, b"x"), ld(2, b"y"), ld(4, op.as_bytes()), ld(7, domain.as_bytes())].concat())
        };
        let graph = [
            node("MyGather", "my.custom"),
            node("MyScatter", "my.custom"),
            node("Attention", "com.microsoft"),
            node("aten_linear", "pkg.onnxscript.torch_lib"),
        ]
        .concat();
        let function = ld(25, &[ld(1, b"aten_linear"), ld(10, b"pkg.onnxscript.torch_lib")].concat());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, [ld(7, &graph), function].concat()).unwrap();
        let foreign = read_model_meta(&path).unwrap().foreign_ops;
        assert_eq!(
            foreign.into_iter().map(|(d, ops)| (d, ops.into_iter().collect::<Vec<_>>())).collect::<Vec<_>>(),
            vec![("my.custom".to_owned(), vec!["MyGather".to_owned(), "MyScatter".to_owned()])]
        );
        assert!(read_model_meta(&fixture("tiny_dit_fused.onnx")).unwrap().foreign_ops.is_empty());
    }

    /// A graph as hand-written protobuf: `nodes` (op, domain, inputs, outputs), graph inputs,
    /// initializers, sparse initializers and outputs by name, and the default-domain opset.
    fn wired_model(
        nodes: &[(&str, &str, &[&str], &[&str])],
        inputs: &[&str],
        initializers: &[&str],
        sparse: &[&str],
        outputs: &[&str],
        opset: Option<u64>,
    ) -> Vec<u8> {
        let mut graph = Vec::new();
        for (op, domain, node_inputs, node_outputs) in nodes {
            let mut body: Vec<u8> = node_inputs.iter().flat_map(|i| ld(1, i.as_bytes())).collect();
            body.extend(node_outputs.iter().flat_map(|o| ld(2, o.as_bytes())));
            body.extend(ld(4, op.as_bytes()));
            if !domain.is_empty() {
                body.extend(ld(7, domain.as_bytes()));
            }
            graph.extend(ld(1, &body));
        }
        graph.extend(initializers.iter().flat_map(|n| ld(5, &[vec![1 << 3, 2], ld(8, n.as_bytes())].concat())));
        graph.extend(sparse.iter().flat_map(|n| ld(15, &ld(1, &ld(8, n.as_bytes())))));
        graph.extend(inputs.iter().flat_map(|n| ld(11, &ld(1, n.as_bytes()))));
        graph.extend(outputs.iter().flat_map(|n| ld(12, &ld(1, n.as_bytes()))));
        let mut model = ld(7, &graph);
        if let Some(version) = opset {
            let mut opset_id = ld(1, b"");
            opset_id.push(2 << 3);
            put_varint(version, &mut opset_id);
            model.extend(ld(8, &opset_id));
        }
        model
    }

    fn read(bytes: &[u8]) -> ModelIo {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, bytes).unwrap();
        read_model_meta(&path).unwrap()
    }

    /// Every name a node reads, and every graph output, must be defined somewhere (graph input,
    /// initializer, sparse initializer, node output, in any node order); an omitted optional
    /// input (`""`) is no read. What is not is named once, in the order met — ONNX Runtime
    /// refuses such a graph ("Node input 'nowhere' is not a graph input, initializer, or output of
    /// a previous node", measured with 1.31.1).
    #[test]
    fn names_a_graph_reads_that_nothing_defines_are_found() {
        let nodes: &[(&str, &str, &[&str], &[&str])] = &[
            ("Add", "", &["b", "w"], &["z"]),
            ("Clip", "", &["x", "", ""], &["a"]),
            ("Mul", "ai.onnx", &["a", "sp"], &["b"]),
            ("Add", "", &["b", "nowhere"], &["c"]),
            ("Sub", "", &["nowhere", "also_nowhere"], &["d"]),
        ];
        let io = read(&wired_model(nodes, &["x"], &["w"], &["sp"], &["z", "c", "d", "lost"], Some(17)));
        assert_eq!(io.unresolved, vec!["nowhere", "also_nowhere", "lost"]);
        assert_eq!(io.default_ops.iter().map(String::as_str).collect::<Vec<_>>(), vec!["Add", "Clip", "Mul", "Sub"]);
        let violation = io.unresolved_violation().unwrap().to_string();
        assert!(violation.contains("`nowhere`, `also_nowhere`, `lost` defined nowhere"), "{violation}");
        assert!(io.default_op_violation().is_none());
        // The fixtures, plain, fused, fp16 and diffusers, are wired whole and use only operators
        // ONNX defines at their opsets.
        for name in ["tiny_dit.onnx", "tiny_dit_fp16.onnx", "tiny_dit_fused.onnx", "tiny_dit_diffusers.onnx"] {
            let io = read_model_meta(&fixture(name)).unwrap();
            assert_eq!(io.graph_violations(), vec![], "{name}");
            assert!(io.default_ops.contains("MatMul"), "{name}: {:?}", io.default_ops);
        }
        for name in ["tiny_vae_encoder.onnx", "tiny_vae_decoder.onnx", "bf16_dit.onnx"] {
            assert_eq!(read_model_meta(&fixture(name)).unwrap().graph_violations(), vec![], "{name}");
        }
    }

    /// Default-domain operators are held against ONNX's schemas at the model's opset: no such
    /// operator, one first defined later (`Gelu` is opset 20), one deprecated there (`Upsample`
    /// from 10, `Scatter` from 11) — each of which ONNX Runtime 1.31.1 refused to load, measured —
    /// are named in one violation; none is checked without a default opset import (ONNX Runtime
    /// then loads with its newest) or past the table's newest opset.
    #[test]
    fn default_domain_operators_are_held_against_the_models_opset() {
        let nodes: &[(&str, &str, &[&str], &[&str])] = &[
            ("Relu", "", &["x"], &["a"]),
            ("Gelu", "", &["a"], &["b"]),
            ("Upsample", "", &["b", "s"], &["c"]),
            ("Scatter", "", &["c", "i", "c"], &["d"]),
            ("Foo", "ai.onnx", &["d"], &["e"]),
            ("Attention", "com.microsoft", &["e"], &["z"]),
        ];
        let model = |opset| read(&wired_model(nodes, &["x"], &["s", "i"], &[], &["z"], opset));
        let violation = model(Some(13)).default_op_violation().unwrap().to_string();
        assert!(violation.contains("(the model imports opset 13)"), "{violation}");
        assert!(
            violation.contains(
                "`Foo` (no such ONNX operator), `Gelu` (first defined in opset 20), \
                 `Scatter` (deprecated since opset 11), `Upsample` (deprecated since opset 10)"
            ),
            "{violation}"
        );
        assert!(!violation.contains("Relu") && !violation.contains("Attention"), "{violation}");
        assert!(!model(Some(9)).default_op_violation().unwrap().to_string().contains("Upsample"));
        assert!(model(None).default_op_violation().is_none());
        assert!(model(Some(crate::onnx_ops::ONNX_OPS_MAX_OPSET + 1)).default_op_violation().is_none());
        assert_eq!(model(Some(13)).graph_violations().len(), 1);
    }

    /// The generated table is sorted as the lookup needs, each history ascending.
    #[test]
    fn the_onnx_operator_table_is_sorted() {
        use crate::onnx_ops::ONNX_OPS;
        assert!(ONNX_OPS.len() > 150);
        assert!(ONNX_OPS.windows(2).all(|w| w[0].0.as_bytes() < w[1].0.as_bytes()));
        assert!(ONNX_OPS.iter().all(|(_, h)| !h.is_empty() && h.windows(2).all(|w| w[0].0 < w[1].0)));
    }

    #[test]
    fn metadata_is_set_and_replaced_in_place_of_the_old_entry() {
        let dit = std::fs::read(fixture("tiny_dit.onnx")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relabelled.onnx");
        let relabelled = with_metadata(&dit, "mgd3.num_classes", "1000").unwrap();
        std::fs::write(&path, with_metadata(&relabelled, "mgd3.note", "x").unwrap()).unwrap();
        let meta = read_model_meta(&path).unwrap();
        let original = read_model_meta(&fixture("tiny_dit.onnx")).unwrap();
        assert_eq!(meta.get::<i64>("mgd3.num_classes"), Some(1000));
        assert_eq!(meta.metadata.get("mgd3.note").map(String::as_str), Some("x"));
        assert_eq!(meta.metadata.len(), original.metadata.len() + 1);
        assert_eq!((&meta.inputs, &meta.outputs), (&original.inputs, &original.outputs));
        assert_eq!(with_metadata(b"not a model", "k", "v").unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }

    /// A TensorProto named `name` whose data lives in `location`.
    fn external_tensor(name: &str, location: &str) -> Vec<u8> {
        let entry = [ld(1, b"location"), ld(2, location.as_bytes())].concat();
        let offset = [ld(1, b"offset"), ld(2, b"0")].concat();
        [ld(8, name.as_bytes()), ld(13, &entry), ld(13, &offset), vec![14 << 3, 1]].concat()
    }

    /// A model whose graph has `initializers` and one node holding `attribute_tensor` in an
    /// attribute and `subgraph_tensor` in a subgraph's initializer.
    fn model(initializers: &[&str], attribute: Option<&str>, subgraph: Option<&str>) -> Vec<u8> {
        let mut graph: Vec<u8> = initializers.iter().flat_map(|l| ld(5, &external_tensor("w", l))).collect();
        let mut attributes = Vec::new();
        if let Some(location) = attribute {
            attributes.extend(ld(5, &[ld(1, b"value"), ld(5, &external_tensor("c", location))].concat()));
        }
        if let Some(location) = subgraph {
            let inner = ld(5, &external_tensor("s", location));
            attributes.extend(ld(5, &[ld(1, b"then_branch"), ld(6, &inner)].concat()));
        }
        if !attributes.is_empty() {
            // A NodeProto holding the attributes.
            graph.extend(ld(1, &attributes));
        }
        [ld(7, &graph), ld(14, &[ld(1, b"mgd3.kind"), ld(2, b"dit")].concat())].concat()
    }

    /// Every external-data file a model loads is found, whatever it is called and wherever the
    /// tensor sits; its fingerprint covers them all; a layout ONNX Runtime cannot load is an
    /// error naming the location.
    #[test]
    fn every_external_data_file_is_found_and_fingerprinted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::create_dir_all(dir.path().join("weights")).unwrap();
        for (file, bytes) in
            [("m.onnx_data", b"aaaa"), ("weights/b.bin", b"bbbb"), ("c.bin", b"cccc"), ("s.bin", b"ssss")]
        {
            std::fs::write(dir.path().join(file), bytes).unwrap();
        }
        std::fs::write(&path, model(&["m.onnx_data", "weights/b.bin", "m.onnx_data"], Some("c.bin"), Some("s.bin")))
            .unwrap();
        assert_eq!(read_model_meta(&path).unwrap().metadata["mgd3.kind"], "dit");
        assert_eq!(external_data_locations(&path).unwrap(), ["m.onnx_data", "weights/b.bin", "c.bin", "s.bin"]);
        let files = model_files(&path).unwrap();
        assert_eq!(files.len(), 5);
        // Each file's bytes move the fingerprint.
        let before = crate::fingerprint_file(&path).unwrap();
        for file in ["m.onnx_data", "weights/b.bin", "c.bin", "s.bin"] {
            std::fs::write(dir.path().join(file), b"zzzz").unwrap();
            let after = crate::fingerprint_file(&path).unwrap();
            assert_ne!(before, after, "{file} is not in the fingerprint");
        }
        // Layouts ONNX Runtime refuses, or files that are not there, are errors naming them.
        for (location, outside) in [("../x.bin", true), ("/abs/x.bin", true), ("gone.bin", false)] {
            std::fs::write(&path, model(&[location], None, None)).unwrap();
            let error = model_files(&path).unwrap_err();
            assert_eq!(matches!(error, ModelFilesError::OutsideFolder { .. }), outside, "{error}");
            assert!(error.to_string().contains(location), "{error}");
            assert!(crate::fingerprint_file(&path).is_err());
        }
    }

    /// A model saved as `<model>` + `<model>.data` keeps the fingerprint mgd3 always gave it (the
    /// two files' bytes in a row), so jobs submitted before keep their ids; a `.data` file the
    /// model does not name is no longer part of it.
    #[test]
    fn the_usual_layout_keeps_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let graph = model(&["m.onnx.data"], None, None);
        std::fs::write(&path, &graph).unwrap();
        std::fs::write(dir.path().join("m.onnx.data"), b"weights").unwrap();
        let old = crate::sha256_hex(&[graph.as_slice(), b"weights"].concat());
        assert_eq!(crate::fingerprint_file(&path).unwrap(), old);
        let inside = model(&[], None, None);
        std::fs::write(&path, &inside).unwrap();
        assert_eq!(crate::fingerprint_file(&path).unwrap(), crate::sha256_hex(&inside));
    }

    /// What ONNX Runtime refuses to load is refused here, and what it loads is accepted: a data
    /// file linked from outside the model's folder is refused, the Hugging Face cache layout
    /// (model and data both links into one `blobs/` folder) is accepted; a file shorter than its
    /// tensors, or a folder, is an error naming it.
    #[test]
    fn layouts_onnx_runtime_refuses_are_refused() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let with_length = |location: &str, length: u64| {
            let entries = [
                ld(13, &[ld(1, b"location"), ld(2, location.as_bytes())].concat()),
                ld(13, &[ld(1, b"offset"), ld(2, b"4")].concat()),
                ld(13, &[ld(1, b"length"), ld(2, length.to_string().as_bytes())].concat()),
            ]
            .concat();
            ld(7, &ld(5, &[ld(8, b"w"), entries, vec![14 << 3, 1]].concat()))
        };
        // Linked from outside the model's folder.
        let a = dir.path().join("a");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(dir.path().join("outside.bin"), [0u8; 16]).unwrap();
        symlink(dir.path().join("outside.bin"), a.join("w.bin")).unwrap();
        std::fs::write(a.join("m.onnx"), with_length("w.bin", 8)).unwrap();
        assert!(matches!(model_files(&a.join("m.onnx")), Err(ModelFilesError::OutsideFolder { .. })));
        // The Hugging Face cache: snapshots/<rev>/* are links into blobs/.
        let (blobs, snapshot) = (dir.path().join("hf/blobs"), dir.path().join("hf/snapshots/rev"));
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(blobs.join("model"), with_length("m.onnx_data", 8)).unwrap();
        std::fs::write(blobs.join("data"), [0u8; 16]).unwrap();
        symlink("../../blobs/model", snapshot.join("m.onnx")).unwrap();
        symlink("../../blobs/data", snapshot.join("m.onnx_data")).unwrap();
        assert_eq!(model_files(&snapshot.join("m.onnx")).unwrap().len(), 2);
        assert_eq!(load_path(&snapshot.join("m.onnx")), snapshot.join("m.onnx"), "loaded as given");
        // A link to a model whose data file lies beside the file, not the link (a 2.7 GB DiT
        // linked into a job's folder): loaded where it lies.
        let (store, linked) = (dir.path().join("store"), dir.path().join("linked"));
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(&linked).unwrap();
        std::fs::write(store.join("m.onnx"), with_length("m.onnx.data", 8)).unwrap();
        std::fs::write(store.join("m.onnx.data"), [0u8; 16]).unwrap();
        symlink(store.join("m.onnx"), linked.join("dit.onnx")).unwrap();
        assert_eq!(
            model_files(&linked.join("dit.onnx")).unwrap(),
            [linked.join("dit.onnx"), store.join("m.onnx.data")]
        );
        assert_eq!(load_path(&linked.join("dit.onnx")), store.join("m.onnx").canonicalize().unwrap());
        // Cut short: the tensor ends at byte 4 + 20.
        let b = dir.path().join("b");
        std::fs::create_dir_all(b.join("w.bin.d")).unwrap();
        std::fs::write(b.join("w.bin"), [0u8; 16]).unwrap();
        std::fs::write(b.join("m.onnx"), with_length("w.bin", 20)).unwrap();
        let error = model_files(&b.join("m.onnx")).unwrap_err();
        assert!(matches!(error, ModelFilesError::Truncated { size: 16, needed: 24, .. }), "{error}");
        std::fs::write(b.join("m.onnx"), with_length("w.bin.d", 1)).unwrap();
        let error = model_files(&b.join("m.onnx")).unwrap_err();
        assert!(matches!(error, ModelFilesError::NotAFile { .. }) && error.to_string().contains("a folder"), "{error}");
    }

    /// The shipped fixture with HF optimum's name and a second file in a subfolder.
    #[test]
    fn the_external_fixture_names_both_its_files() {
        let locations = external_data_locations(&fixture("external/tiny_vae_decoder.onnx")).unwrap();
        assert_eq!(locations, ["model.onnx_data", "weights/rest.bin"]);
        assert!(external_data_locations(&fixture("tiny_vae_decoder.onnx")).unwrap().is_empty());
    }
}
