//! GGUF reader: memory-mapped, zero-copy tensor access, defensive against hostile files.
//!
//! Every length, count and offset read from the file is checked against the bytes that remain before it is used,
//! so a truncated or malicious file produces a [`GgufError`] naming the file and the key or tensor, never a panic
//! or an out-of-bounds read.

use crate::error::{ErrorKind, GgufError};
use crate::types::GgmlType;
use crate::value::{tid, Array, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays, so a hostile file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 8;

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (fastest-varying), `dims[1]` the number of rows, ...
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Exact byte size (I2_S includes its 32-byte tail).
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Row length (`dims[0]`).
    pub fn row_len(&self) -> usize {
        self.dims[0] as usize
    }
    /// Number of rows: the product of all dims but the first.
    pub fn n_rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }
}

enum Storage {
    /// The map, and the file it maps (for reads that must not touch the map: [`GgufFile::read_unmapped`]).
    Mmap(memmap2::Mmap, std::fs::File),
    /// A copy of the file in anonymous memory ([`GgufFile::open_resident`]). Its pages are never released: dropping
    /// them would make live borrows read zeros, where a file mapping reads the same bytes back.
    Resident(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m, _) | Storage::Resident(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// Drops the resident pages of `bytes` (a slice of `map`) from this process; later reads fault them back in.
fn release_mapped_pages(map: &memmap2::Mmap, bytes: &[u8]) {
    let (base, start) = (map.as_ptr() as usize, bytes.as_ptr() as usize);
    if start < base || start + bytes.len() > base + map.len() {
        return;
    }
    // Whole pages inside the slice only: a page shared with a neighbouring tensor stays.
    const PAGE: usize = 4096;
    let (off, end) = ((start - base).next_multiple_of(PAGE), (start - base + bytes.len()) / PAGE * PAGE);
    if end > off {
        // SAFETY: the mapping is a shared, read-only mapping of a file that this process never writes. MADV_DONTNEED
        // on such a mapping only unmaps clean page-cache pages; the next access faults the same file bytes back in,
        // so every live borrow keeps reading identical contents. Failure only means the pages stay resident.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, end - off) };
    }
}

pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    pub version: u32,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// The whole file's bytes, so tensors can be shared as windows of one mapping.
impl AsRef<[u8]> for GgufFile {
    fn as_ref(&self) -> &[u8] {
        self.storage.bytes()
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, kind: ErrorKind, msg: impl Into<String>) -> GgufError {
        GgufError::new(self.path, kind, msg)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.err(
                ErrorKind::Truncated,
                format!(
                    "file truncated while reading {} at byte {} (need {n} bytes, {} left)",
                    what(),
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count of items, each at least `min_item_bytes` long: refuse counts the rest of the file cannot hold.
    fn count(&mut self, min_item_bytes: usize, what: &dyn Fn() -> String) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let limit = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > limit {
            return Err(self.err(
                ErrorKind::TooLarge,
                format!("{} claims {n} items but only {} bytes remain in the file", what(), self.remaining()),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let n = self.count(1, &|| format!("length of {}", what()))?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            self.err(
                ErrorKind::BadUtf8,
                format!("{} is not valid UTF-8 (at byte {} of the string)", what(), e.utf8_error().valid_up_to()),
            )
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        let w = || format!("value of key '{key}'");
        Ok(match ty {
            tid::U8 => Value::U8(self.array::<1>(&w)?[0]),
            tid::I8 => Value::I8(self.array::<1>(&w)?[0] as i8),
            tid::U16 => Value::U16(u16::from_le_bytes(self.array(&w)?)),
            tid::I16 => Value::I16(i16::from_le_bytes(self.array(&w)?)),
            tid::U32 => Value::U32(self.u32(&w)?),
            tid::I32 => Value::I32(i32::from_le_bytes(self.array(&w)?)),
            tid::F32 => Value::F32(f32::from_le_bytes(self.array(&w)?)),
            tid::BOOL => {
                let b = self.array::<1>(&w)?[0];
                if b > 1 {
                    return Err(
                        self.err(ErrorKind::BadValue, format!("key '{key}': bool byte is {b}, expected 0 or 1"))
                    );
                }
                Value::Bool(b == 1)
            }
            tid::STRING => Value::String(self.string(&w)?),
            tid::U64 => Value::U64(self.u64(&w)?),
            tid::I64 => Value::I64(i64::from_le_bytes(self.array(&w)?)),
            tid::F64 => Value::F64(f64::from_le_bytes(self.array(&w)?)),
            tid::ARRAY => Value::Array(self.array_value(key, depth)?),
            other => {
                return Err(self.err(
                    ErrorKind::BadValue,
                    format!("key '{key}': unknown metadata value type {other} (expected 0..=12)"),
                ))
            }
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(
                self.err(ErrorKind::TooLarge, format!("key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"))
            );
        }
        let ety = self.u32(&|| format!("array element type of key '{key}'"))?;
        let min = match ety {
            tid::U8 | tid::I8 | tid::BOOL => 1,
            tid::U16 | tid::I16 => 2,
            tid::U32 | tid::I32 | tid::F32 => 4,
            tid::U64 | tid::I64 | tid::F64 | tid::STRING => 8,
            tid::ARRAY => 12,
            other => {
                return Err(self.err(
                    ErrorKind::BadValue,
                    format!("key '{key}': unknown array element type {other} (expected 0..=12)"),
                ))
            }
        };
        let n = self.count(min, &|| format!("array of key '{key}'"))?;
        macro_rules! prim {
            ($variant:ident, $t:ty) => {{
                let bytes = self.take(n * std::mem::size_of::<$t>(), &|| format!("array of key '{key}'"))?;
                Array::$variant(
                    bytes
                        .chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                        .collect(),
                )
            }};
        }
        Ok(match ety {
            tid::U8 => Array::U8(self.take(n, &|| format!("array of key '{key}'"))?.to_vec()),
            tid::I8 => prim!(I8, i8),
            tid::U16 => prim!(U16, u16),
            tid::I16 => prim!(I16, i16),
            tid::U32 => prim!(U32, u32),
            tid::I32 => prim!(I32, i32),
            tid::F32 => prim!(F32, f32),
            tid::U64 => prim!(U64, u64),
            tid::I64 => prim!(I64, i64),
            tid::F64 => prim!(F64, f64),
            tid::BOOL => {
                let bytes = self.take(n, &|| format!("array of key '{key}'"))?;
                if let Some(i) = bytes.iter().position(|&b| b > 1) {
                    return Err(self.err(
                        ErrorKind::BadValue,
                        format!("key '{key}': bool element {i} is {}, expected 0 or 1", bytes[i]),
                    ));
                }
                Array::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            tid::STRING => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("element {i} of key '{key}'"))?);
                }
                Array::String(v)
            }
            tid::ARRAY => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
            _ => unreachable!("element type checked above"),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| GgufError::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; ternlm never writes model files while they are
        // mapped. A file truncated by another process underneath us could fault; that is the usual mmap contract.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        Self::parse(path.to_path_buf(), Storage::Mmap(map, file))
    }

    /// Reads `path` into anonymous memory and parses it (llama.cpp's `--no-mmap`). On Linux the memory is advised
    /// for transparent huge pages, which the page cache behind a file mapping does not get: 2 MB pages spare the
    /// weight stream most TLB misses (a 2-thread streaming read of a 2B4T file: 19.7–21.0 GB/s mapped, 21.2–21.6
    /// resident, on this project's 2-core EPYC). The whole file stays resident: `release_pages` is a no-op here.
    pub fn open_resident(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        use std::io::Read;
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| GgufError::io(path, e))?;
        let len = file.metadata().map_err(|e| GgufError::io(path, e))?.len();
        let len = usize::try_from(len).map_err(|_| {
            GgufError::io(path, std::io::Error::new(std::io::ErrorKind::OutOfMemory, "file larger than memory"))
        })?;
        if len == 0 {
            return Self::from_bytes(path, Vec::new()); // the parser names what is missing
        }
        let mut anon = memmap2::MmapMut::map_anon(len).map_err(|e| GgufError::io(path, e))?;
        #[cfg(target_os = "linux")]
        let _ = anon.advise(memmap2::Advice::HugePage); // a hint: without THP the copy still works
        file.read_exact(&mut anon[..]).map_err(|e| GgufError::io(path, e))?;
        let map = anon.make_read_only().map_err(|e| GgufError::io(path, e))?;
        Self::parse(path.to_path_buf(), Storage::Resident(map))
    }

    /// Parses an in-memory file; `path` is only used in error messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(path.as_ref().to_path_buf(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self, GgufError> {
        let buf = storage.bytes();
        let mut c = Cursor { buf, pos: 0, path: &path };
        let magic = c.array::<4>(&|| "magic".into())?;
        if &magic != GGUF_MAGIC {
            return Err(
                c.err(ErrorKind::BadMagic, format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""))
            );
        }
        let version = c.u32(&|| "version".into())?;
        match version {
            2 | 3 => {}
            1 => return Err(c.err(ErrorKind::UnsupportedVersion, "GGUF version 1 is not supported (expected 2 or 3)")),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(c.err(ErrorKind::UnsupportedVersion, "big-endian GGUF files are not supported"))
            }
            v => {
                return Err(c.err(
                    ErrorKind::UnsupportedVersion,
                    format!("GGUF version {v} is not supported (expected 2 or 3)"),
                ))
            }
        }
        // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes; a KV at least 8+4+1.
        let n_tensors = c.count(24, &|| "tensor count".into())?;
        let n_kv = c.count(13, &|| "metadata count".into())?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let ty = c.u32(&|| format!("type of key '{key}'"))?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.err(ErrorKind::BadValue, format!("duplicate metadata key '{key}'")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(c.err(
                        ErrorKind::BadValue,
                        format!("key 'general.alignment' is {}, expected a power of two up to 1 MiB", v.summary()),
                    ))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor {i}"))?;
            let n_dims = c.u32(&|| format!("n_dims of tensor '{name}'"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.err(
                    ErrorKind::BadTensor,
                    format!("tensor '{name}': n_dims is {n_dims}, expected 1..={MAX_DIMS}"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for d in 0..n_dims {
                dims.push(c.u64(&|| format!("dim {d} of tensor '{name}'"))?);
            }
            let type_id = c.u32(&|| format!("type of tensor '{name}'"))?;
            let offset = c.u64(&|| format!("offset of tensor '{name}'"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                let what = match type_id {
                    37 => "I8_S is bitnet.cpp's activation type and never valid in a file".to_string(),
                    38 | 39 | 42 => format!(
                        "bitnet.cpp's {} LUT layout is tied to the tile sizes of the build that wrote it and is not \
                         supported; re-quantize the model to I2_S",
                        if type_id == 38 { "TL1" } else { "TL2" }
                    ),
                    _ => format!("unknown ggml type id {type_id}"),
                };
                c.err(ErrorKind::UnknownType, format!("tensor '{name}': {what}"))
            })?;
            if dims.contains(&0) {
                return Err(c.err(ErrorKind::BadTensor, format!("tensor '{name}': a dimension is 0 in {dims:?}")));
            }
            let n_elements =
                dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|&n| n <= i64::MAX as u64)).ok_or_else(
                    || c.err(ErrorKind::TooLarge, format!("tensor '{name}': element count of {dims:?} overflows")),
                )?;
            let size = ty.tensor_bytes(dims[0], n_elements).ok_or_else(|| {
                c.err(
                    ErrorKind::BadTensor,
                    format!(
                        "tensor '{name}': row length {} is not a multiple of {ty}'s block size {} (or its size overflows)",
                        dims[0],
                        ty.block_size()
                    ),
                )
            })?;
            if offset % alignment != 0 {
                return Err(c.err(
                    ErrorKind::BadTensor,
                    format!("tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.err(ErrorKind::BadTensor, format!("duplicate tensor name '{name}'")));
            }
            tensors.push(TensorInfo { name, dims, ty, offset, size });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        if n_tensors > 0 && data_offset > file_len {
            return Err(c.err(
                ErrorKind::Truncated,
                format!("file ends at byte {file_len}, before the tensor data section at {data_offset}"),
            ));
        }
        let data_len = file_len.saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.size);
            if end.is_none_or(|e| e > data_len) {
                return Err(c.err(
                    ErrorKind::Truncated,
                    format!(
                        "tensor '{}': data at offset {} with size {} runs past the end of the data section ({data_len} bytes)",
                        t.name, t.offset, t.size
                    ),
                ));
            }
        }

        Ok(GgufFile { path, storage, version, alignment, data_offset, metadata, meta_index, tensors, tensor_index })
    }

    /// Tells the OS that this process no longer needs `bytes` (a slice of this file's data, e.g. a tensor that was
    /// re-quantized into an owned copy): its whole pages leave the resident set and are read from the file again
    /// if touched. No effect for files held in memory, or for slices that are not part of this file.
    pub fn release_pages(&self, bytes: &[u8]) {
        if let Storage::Mmap(m, _) = &self.storage {
            release_mapped_pages(m, bytes);
        }
    }

    /// Copies `bytes` (a slice of this file's data) into `out` by reading the file (page cache) instead of the
    /// mapping, so pages handed back with [`GgufFile::release_pages`] stay out of the resident set: on recent
    /// kernels one touched byte maps a whole large folio back (up to megabytes). Falls back to copying the slice
    /// for in-memory files, slices from elsewhere, or a failed read.
    pub fn read_unmapped(&self, bytes: &[u8], out: &mut [u8]) {
        assert_eq!(bytes.len(), out.len(), "read_unmapped: output length");
        #[cfg(unix)]
        if let Storage::Mmap(m, file) = &self.storage {
            use std::os::unix::fs::FileExt;
            let (base, start) = (m.as_ptr() as usize, bytes.as_ptr() as usize);
            if start >= base
                && start + bytes.len() <= base + m.len()
                && file.read_exact_at(out, (start - base) as u64).is_ok()
            {
                return;
            }
        }
        out.copy_from_slice(bytes);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Zero-copy bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.storage.bytes()[start..start + info.size as usize]
    }

    fn err(&self, kind: ErrorKind, msg: String) -> GgufError {
        GgufError::new(&self.path, kind, msg)
    }

    // Typed metadata accessors that name the file and key in their errors.

    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| self.err(ErrorKind::MissingKey, format!("missing metadata key '{key}'")))
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    self.err(
                        ErrorKind::BadValue,
                        format!("key '{key}' is {}, expected a non-negative integer", v.summary()),
                    )
                })
            })
            .transpose()
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    self.err(ErrorKind::BadValue, format!("key '{key}' is {}, expected a number", v.summary()))
                })
            })
            .transpose()
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    self.err(ErrorKind::BadValue, format!("key '{key}' is {}, expected a bool", v.summary()))
                })
            })
            .transpose()
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    self.err(ErrorKind::BadValue, format!("key '{key}' is {}, expected a string", v.summary()))
                })
            })
            .transpose()
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_array().ok_or_else(|| {
                    self.err(ErrorKind::BadValue, format!("key '{key}' is {}, expected an array", v.summary()))
                })
            })
            .transpose()
    }

    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_u64(key)?.ok_or_else(|| self.err(ErrorKind::MissingKey, format!("missing metadata key '{key}'")))
    }

    /// An error about this file (for callers that validate metadata semantics).
    pub fn error(&self, msg: impl Into<String>) -> GgufError {
        self.err(ErrorKind::BadValue, msg.into())
    }
}
