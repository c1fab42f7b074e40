//! GGUF v3 writer, little endian, with llama.cpp's layout: header, KVs, tensor infos, padding, aligned data.

use crate::error::{ErrorKind, GgufError};
use crate::types::GgmlType;
use crate::value::{Array, Value};
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    nbytes: u64,
    /// `None`: declared with [`GgufWriter::declare_tensor`], its bytes come later through a [`GgufStream`].
    data: Option<Cow<'a, [u8]>>,
}

/// Builds a GGUF file in memory-order; tensor data is borrowed where possible and written once. For files larger
/// than memory, declare the tensors and stream their bytes one by one with [`GgufWriter::stream`].
pub struct GgufWriter<'a> {
    alignment: u64,
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor<'a>>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        GgufWriter { alignment: crate::DEFAULT_ALIGNMENT, kvs: Vec::new(), tensors: Vec::new() }
    }

    /// Sets a key, replacing an earlier value of the same key. `general.alignment` also sets the data alignment.
    pub fn set(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        let key = key.into();
        if key == "general.alignment" {
            if let Some(a) = value.as_u64().filter(|a| a.is_power_of_two()) {
                self.alignment = a;
            }
        }
        match self.kvs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.kvs.push((key, value)),
        }
        self
    }

    /// Adds a tensor; `dims` are in ggml order (row length first). The data size is checked against the type.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let data = data.into();
        let expected = self.check_tensor(&name, ty, dims)?;
        if expected != data.len() as u64 {
            return Err(GgufError::new(
                Path::new(HERE),
                ErrorKind::BadTensor,
                format!("tensor '{name}': {ty} {dims:?} needs {expected} bytes, got {}", data.len()),
            ));
        }
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ty, nbytes: expected, data: Some(data) });
        Ok(self)
    }

    /// Declares a tensor whose bytes will be supplied later, in declaration order, to [`GgufWriter::stream`].
    pub fn declare_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let nbytes = self.check_tensor(&name, ty, dims)?;
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ty, nbytes, data: None });
        Ok(self)
    }

    fn check_tensor(&self, name: &str, ty: GgmlType, dims: &[u64]) -> Result<u64, GgufError> {
        let here = Path::new(HERE);
        let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let expected = n
            .and_then(|n| ty.tensor_bytes(dims.first().copied().unwrap_or(0), n))
            .filter(|_| !dims.is_empty() && dims.len() <= crate::MAX_DIMS)
            .ok_or_else(|| {
                GgufError::new(
                    here,
                    ErrorKind::BadTensor,
                    format!("tensor '{name}': dims {dims:?} are not valid for {ty}"),
                )
            })?;
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::new(here, ErrorKind::BadTensor, format!("duplicate tensor name '{name}'")));
        }
        Ok(expected)
    }

    /// Total file size this writer will produce.
    pub fn file_size(&self) -> u64 {
        let head = self.header().len() as u64;
        let data_end =
            self.tensors.iter().fold(0u64, |off, t| off.div_ceil(self.alignment) * self.alignment + t.nbytes);
        head.div_ceil(self.alignment) * self.alignment + data_end
    }

    pub fn write_to_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        let f = std::fs::File::create(path).map_err(|e| GgufError::io(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        self.write(&mut w).map_err(|e| GgufError::io(path, e))?;
        w.flush().map_err(|e| GgufError::io(path, e))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write(&mut v).expect("writing to a Vec cannot fail");
        v
    }

    /// Writes the whole file; every tensor must have been added with its data (not only declared).
    pub fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut s = self.stream(w)?;
        for t in &self.tensors {
            let data = t.data.as_deref().ok_or_else(|| {
                std::io::Error::other(format!("tensor '{}' was declared but has no data; use stream()", t.name))
            })?;
            s.write_tensor(&t.name, data)?;
        }
        s.finish()?;
        Ok(())
    }

    /// Writes the header and returns a sink that takes each tensor's bytes, in order, so a converter holds one
    /// tensor in memory at a time. Tensors added with data must still be passed to the sink.
    pub fn stream<W: Write>(&self, mut w: W) -> std::io::Result<GgufStream<W>> {
        let head = self.header();
        w.write_all(&head)?;
        let pad = padding(head.len() as u64, self.alignment);
        w.write_all(&vec![0u8; pad])?;
        let plan = self.tensors.iter().map(|t| (t.name.clone(), t.nbytes)).collect();
        Ok(GgufStream { w, alignment: self.alignment, plan, next: 0, written: 0 })
    }

    fn header(&self) -> Vec<u8> {
        let mut head = Vec::new();
        head.extend_from_slice(crate::GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            write_str(&mut head, k);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            write_value(&mut head, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.nbytes).div_ceil(self.alignment) * self.alignment;
        }
        head
    }
}

const HERE: &str = "<gguf writer>";

fn padding(pos: u64, alignment: u64) -> usize {
    (pos.div_ceil(alignment) * alignment - pos) as usize
}

/// The data section of a GGUF being written: takes each declared tensor's bytes in declaration order.
pub struct GgufStream<W: Write> {
    w: W,
    alignment: u64,
    plan: Vec<(String, u64)>,
    next: usize,
    /// Bytes of the current (next) tensor written so far.
    written: u64,
}

impl<W: Write> GgufStream<W> {
    /// Writes the next tensor; its name and size must be the declared ones.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        if self.written != 0 {
            return Err(std::io::Error::other(format!("tensor '{name}' started while another was half written")));
        }
        self.write_part(name, data)?;
        match self.written {
            0 => Ok(()),
            _ => Err(std::io::Error::other(format!("tensor '{name}': {} bytes given, more declared", data.len()))),
        }
    }

    /// Writes part of the next tensor (parts in order, any sizes); the tensor is complete when its declared size
    /// is reached. Lets a converter encode a large tensor a slice of rows at a time.
    pub fn write_part(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let Some((want, nbytes)) = self.plan.get(self.next) else {
            return Err(std::io::Error::other(format!("tensor '{name}' was not declared (all tensors written)")));
        };
        if want != name || self.written + data.len() as u64 > *nbytes {
            return Err(std::io::Error::other(format!(
                "expected tensor '{want}' ({nbytes} bytes, {} written) next, got {} bytes of '{name}'",
                self.written,
                data.len()
            )));
        }
        self.w.write_all(data)?;
        self.written += data.len() as u64;
        if self.written == *nbytes {
            self.next += 1;
            self.written = 0;
            if self.next < self.plan.len() {
                self.w.write_all(&vec![0u8; padding(*nbytes, self.alignment)])?;
            }
        }
        Ok(())
    }

    /// Checks every declared tensor was written, flushes and returns the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.next != self.plan.len() {
            return Err(std::io::Error::other(format!(
                "{} of {} tensors written; next would be '{}'",
                self.next,
                self.plan.len(),
                self.plan[self.next].0
            )));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => write_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn write_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.elem_type_id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        Array::String(v) => v.iter().for_each(|s| write_str(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| write_array(out, inner)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}
