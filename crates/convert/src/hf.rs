//! A Hugging Face model directory, read without copying: `config.json`, and every `*.safetensors` shard
//! memory-mapped (single file, or the shards named by `model.safetensors.index.json`). Tensors are looked up by
//! name and decoded one at a time, so a converter never holds more than one tensor in memory.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor of a checkpoint: where its bytes are and what they are.
#[derive(Clone, Debug)]
pub struct HfTensor {
    pub name: String,
    pub dtype: Dtype,
    /// Row-major, slowest dimension first (PyTorch order).
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

impl HfTensor {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: Value,
    shards: Vec<(PathBuf, Mmap)>,
    /// Sorted by name, so listings and errors are deterministic.
    pub tensors: BTreeMap<String, HfTensor>,
}

impl HfCheckpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<HfCheckpoint> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            bail!(
                "{}: not a directory (expected a Hugging Face model folder with config.json and *.safetensors)",
                dir.display()
            );
        }
        let config = read_json(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index.get("weight_map").and_then(|m| m.as_object()).with_context(|| {
                format!(
                    "{}: field 'weight_map' is missing or not an object of tensor name → shard file",
                    index_path.display()
                )
            })?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .with_context(|| format!("{}: weight_map['{tensor}'] is not a file name", index_path.display()))?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    bail!("{}: weight_map['{tensor}'] = '{file}' is not a plain file name", index_path.display());
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            for n in &names {
                if !dir.join(n).is_file() {
                    bail!("{}: shard '{n}' named by {} is missing", dir.display(), index_path.display());
                }
            }
            names
        } else {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .with_context(|| format!("{}: cannot list directory", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            names.sort();
            if names.is_empty() {
                bail!("{}: no *.safetensors files (and no model.safetensors.index.json)", dir.display());
            }
            names
        };
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let f = File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the file is opened read-only and mapped privately; ternlm never writes to it. If another
            // process truncates it meanwhile, reads may fault — the same contract as every mmap-based loader.
            let map = unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            let base = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                let n: usize = info.shape.iter().product();
                let need = n.checked_mul(info.dtype.bitsize() / 8);
                if need != Some(end - start) {
                    bail!(
                        "{}: tensor '{tname}': {:?} {:?} does not match its {} data bytes",
                        path.display(),
                        info.dtype,
                        info.shape,
                        end - start
                    );
                }
                let t = HfTensor {
                    name: tname.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: i,
                    start: base + start,
                    end: base + end,
                };
                if tensors.insert(tname.clone(), t).is_some() {
                    bail!("{}: tensor '{tname}' appears in more than one shard", dir.display());
                }
            }
            shards.push((path, map));
        }
        Ok(HfCheckpoint { dir, config, shards, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&HfTensor> {
        self.tensors.get(name)
    }

    pub fn bytes(&self, t: &HfTensor) -> &[u8] {
        &self.shards[t.shard].1[t.start..t.end]
    }

    pub fn shard_path(&self, t: &HfTensor) -> &Path {
        &self.shards[t.shard].0
    }

    /// The tensor as f32 (from F32, F16, BF16 or F64); other dtypes are an error naming the tensor.
    pub fn f32(&self, t: &HfTensor) -> Result<Vec<f32>> {
        let b = self.bytes(t);
        Ok(match t.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            other => bail!(
                "{}: tensor '{}' has dtype {other:?}, expected F32, F16 or BF16",
                self.shard_path(t).display(),
                t.name
            ),
        })
    }

    /// Rows `r0..r1` (each `cols` values) of a 2-D float tensor as f32.
    pub fn f32_rows(&self, t: &HfTensor, r0: usize, r1: usize, cols: usize) -> Result<Vec<f32>> {
        let es = t.dtype.bitsize() / 8;
        let part = HfTensor { start: t.start + r0 * cols * es, end: t.start + r1 * cols * es, ..t.clone() };
        if part.end > t.end {
            bail!("rows {r0}..{r1} are outside tensor '{}'", t.name);
        }
        self.f32(&part)
    }

    /// Drops a converted tensor's pages from this process (they stay in the page cache), so converting a model
    /// does not leave the whole checkpoint resident.
    pub fn release(&self, t: &HfTensor) {
        self.release_rows(t, 0, t.end - t.start, 1);
    }

    /// [`HfCheckpoint::release`] for rows `r0..r1` (of `cols` values) of a tensor already converted.
    pub fn release_rows(&self, t: &HfTensor, r0: usize, r1: usize, cols: usize) {
        let es = (t.dtype.bitsize() / 8).max(1);
        let (start, end) = (t.start + r0 * cols * es, (t.start + r1 * cols * es).min(t.end));
        if start >= end {
            return;
        }
        let map = &self.shards[t.shard].1;
        // SAFETY: MADV_DONTNEED on a read-only file mapping only discards clean pages; a later access re-reads
        // the same bytes from the file, so no live slice can observe different contents.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }

    /// A config.json field, as an error naming the file and field when missing or not a count.
    pub fn cfg_usize(&self, key: &str) -> Result<usize> {
        self.cfg_opt_usize(key)?.with_context(|| format!("{}: config.json has no field '{key}'", self.dir.display()))
    }

    pub fn cfg_opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= 1 << 24 => Ok(Some(n as usize)),
                _ => bail!("{}: config.json field '{key}' is {v}, expected a positive integer", self.dir.display()),
            },
        }
    }

    pub fn cfg_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).with_context(|| {
                format!("{}: config.json field '{key}' is {v}, expected a number", self.dir.display())
            }),
        }
    }

    /// Total bytes of all shards (for progress and the dry-run summary).
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|(_, m)| m.len() as u64).sum()
    }
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// Reads an optional JSON file of the model directory.
pub fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}
