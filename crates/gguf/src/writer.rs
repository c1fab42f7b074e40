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
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF file in memory-order; tensor data is borrowed where possible and written once.
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
        let here = Path::new("<gguf writer>");
        let n: u64 = dims.iter().product();
        let expected = ty
            .tensor_bytes(dims.first().copied().unwrap_or(0), n)
            .filter(|_| !dims.is_empty() && dims.len() <= crate::MAX_DIMS)
            .ok_or_else(|| {
                GgufError::new(
                    here,
                    ErrorKind::BadTensor,
                    format!("tensor '{name}': dims {dims:?} are not valid for {ty}"),
                )
            })?;
        if expected != data.len() as u64 {
            return Err(GgufError::new(
                here,
                ErrorKind::BadTensor,
                format!("tensor '{name}': {ty} {dims:?} needs {expected} bytes, got {}", data.len()),
            ));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::new(here, ErrorKind::BadTensor, format!("duplicate tensor name '{name}'")));
        }
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ty, data });
        Ok(self)
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

    pub fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
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
            offset = (offset + t.data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        w.write_all(&head)?;
        let pad = |pos: u64| ((pos.div_ceil(self.alignment) * self.alignment) - pos) as usize;
        let zeros = vec![0u8; self.alignment as usize];
        w.write_all(&zeros[..pad(head.len() as u64)])?;
        for (i, t) in self.tensors.iter().enumerate() {
            w.write_all(&t.data)?;
            if i + 1 < self.tensors.len() {
                w.write_all(&zeros[..pad(t.data.len() as u64)])?;
            }
        }
        Ok(())
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
