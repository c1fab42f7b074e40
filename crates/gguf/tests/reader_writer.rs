//! GGUF reader/writer: round trips, byte-identical rewrites of files written by llama.cpp / bitnet.cpp tools, and
//! one test per class of malformed input (each must be a clear error naming the file and the key or tensor).

use std::path::PathBuf;
use ternlm_gguf::{Array, ErrorKind, GgmlType, GgufFile, GgufWriter, Value};

fn shared() -> PathBuf {
    std::env::var_os("TERNLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn sample_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()))
        .set("u8", Value::U8(7))
        .set("i8", Value::I8(-7))
        .set("u16", Value::U16(65535))
        .set("i16", Value::I16(-300))
        .set("u32", Value::U32(1 << 31))
        .set("i32", Value::I32(-5))
        .set("f32", Value::F32(1.5))
        .set("bool", Value::Bool(true))
        .set("u64", Value::U64(u64::MAX))
        .set("i64", Value::I64(i64::MIN))
        .set("f64", Value::F64(-2.25))
        .set("strings", Value::Array(Array::String(vec!["a".into(), "ü".into(), "".into()])))
        .set(
            "nested",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![]),
            ])),
        );
    let f32s: Vec<u8> = (0..64).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.add_tensor("a.weight", GgmlType::F32, &[8, 8], f32s).unwrap();
    w.add_tensor("q.weight", GgmlType::Q8_0, &[32, 2], vec![0u8; 68]).unwrap();
    let mut i2s = vec![0x55u8; 128 * 4 / 4];
    i2s.extend_from_slice(&{
        let mut t = [0u8; 32];
        t[..4].copy_from_slice(&0.5f32.to_le_bytes());
        t
    });
    w.add_tensor("t.weight", GgmlType::I2_S, &[128, 4], i2s).unwrap();
    w.to_bytes()
}

#[test]
fn round_trip_every_value_type_and_tensor() {
    let bytes = sample_file();
    let f = GgufFile::from_bytes("sample.gguf", bytes.clone()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("u8"), Some(&Value::U8(7)));
    assert_eq!(f.get("i64"), Some(&Value::I64(i64::MIN)));
    assert_eq!(f.get("u64").unwrap().as_u64(), Some(u64::MAX));
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
    match f.get("nested").unwrap() {
        Value::Array(Array::Array(v)) => {
            assert_eq!(v[0], Array::I32(vec![1, 2]));
            assert_eq!(v[1], Array::String(vec!["x".into()]));
            assert!(v[2].is_empty());
        }
        other => panic!("nested: {other:?}"),
    }
    let a = f.tensor_info("a.weight").unwrap();
    assert_eq!(f32::from_le_bytes(f.tensor_data(a)[4 * 9..4 * 10].try_into().unwrap()), 9.0);
    let t = f.tensor_info("t.weight").unwrap();
    assert_eq!(t.size, 128 * 4 / 4 + 32, "I2_S size is M*K/4 + 32");
    assert_eq!(f.tensor_data(t).len(), 160);
    for t in f.tensors() {
        assert_eq!((f.data_offset + t.offset) % 32, 0, "{} aligned", t.name);
    }
    // Re-writing what was read gives the same bytes.
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        w.set(k.clone(), v.clone());
    }
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), t.ty, &t.dims, f.tensor_data(t)).unwrap();
    }
    assert_eq!(w.to_bytes(), bytes);
}

/// `open_resident` (the file copied into anonymous memory) reads what `open` maps: the same metadata and tensor
/// bytes; releasing pages there changes nothing; an empty or truncated file is the same clear error.
#[test]
fn resident_copy_equals_the_mapping() {
    let bytes = sample_file();
    let dir = std::env::temp_dir();
    let path = dir.join(format!("ternlm-resident-{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let (mapped, resident) = (GgufFile::open(&path).unwrap(), GgufFile::open_resident(&path).unwrap());
    assert_eq!(mapped.metadata(), resident.metadata());
    let names = |f: &GgufFile| f.tensors().iter().map(|t| (t.name.clone(), t.offset, t.size)).collect::<Vec<_>>();
    assert_eq!(names(&mapped), names(&resident));
    for t in resident.tensors() {
        let data = resident.tensor_data(t);
        assert_eq!(data, mapped.tensor_data(t), "{}", t.name);
        resident.release_pages(data);
        let mut copy = vec![0u8; data.len()];
        resident.read_unmapped(data, &mut copy);
        assert_eq!(copy, mapped.tensor_data(t), "{} after release", t.name);
        assert_eq!(resident.tensor_data(t), mapped.tensor_data(t), "{} after release", t.name);
    }
    for cut in [0, 3, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let (a, b) = (GgufFile::open(&path).err(), GgufFile::open_resident(&path).err());
        let (a, b) = (a.map(|e| e.to_string()), b.map(|e| e.to_string()));
        assert!(b.is_some(), "truncated to {cut}: resident open accepted it");
        if cut > 0 {
            assert_eq!(a, b, "truncated to {cut}");
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Files written by llama.cpp's and bitnet.cpp's own tools come back byte for byte from our reader + writer.
#[test]
fn rewrites_reference_files_byte_identically() {
    let dirs = [shared().join("fixtures/tokenizer/llama-cpp-vectors"), shared().join("fixtures/models")];
    let mut n = 0;
    for dir in dirs {
        for e in std::fs::read_dir(&dir).expect("fixtures dir") {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "gguf") {
                continue;
            }
            let orig = std::fs::read(&p).unwrap();
            let f = GgufFile::open(&p).unwrap_or_else(|e| panic!("{e}"));
            let mut w = GgufWriter::new();
            for (k, v) in f.metadata() {
                w.set(k.clone(), v.clone());
            }
            for t in f.tensors() {
                w.add_tensor(t.name.clone(), t.ty, &t.dims, f.tensor_data(t)).unwrap();
            }
            let out = w.to_bytes();
            // Writers differ only in trailing padding after the last tensor; everything before must be identical.
            let len = out.len().min(orig.len());
            assert_eq!(&out[..len], &orig[..len], "{}", p.display());
            assert!(orig[len..].iter().all(|&b| b == 0), "{}: only zero padding may follow", p.display());
            n += 1;
        }
    }
    assert!(n >= 10, "expected the shared GGUF fixtures, found {n}");
}

fn expect_err(bytes: Vec<u8>, kind: ErrorKind, needle: &str) {
    match GgufFile::from_bytes("bad.gguf", bytes) {
        Ok(_) => panic!("expected {kind:?} error containing {needle:?}, got Ok"),
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(e.kind, kind, "{msg}");
            assert!(msg.starts_with("bad.gguf: "), "error must name the file: {msg}");
            assert!(msg.contains(needle), "error {msg:?} should mention {needle:?}");
        }
    }
}

/// Byte offset of the first occurrence of `pat` in `hay`.
fn find(hay: &[u8], pat: &[u8]) -> usize {
    hay.windows(pat.len()).position(|w| w == pat).expect("pattern present")
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample_file();
    let data_start = GgufFile::from_bytes("x", bytes.clone()).unwrap().data_offset as usize;
    for cut in 0..bytes.len() {
        let r = GgufFile::from_bytes("cut.gguf", bytes[..cut].to_vec());
        if cut < data_start {
            let e = r.expect_err("a header cut short must fail");
            assert!(matches!(e.kind, ErrorKind::Truncated | ErrorKind::TooLarge), "cut {cut}: {e}");
        } else {
            // Cut inside tensor data: the tensor whose data runs past the end is named.
            let e = r.expect_err("tensor data cut short must fail");
            assert_eq!(e.kind, ErrorKind::Truncated, "cut {cut}: {e}");
            assert!(e.msg.contains("tensor '"), "{e}");
        }
    }
}

#[test]
fn bad_magic() {
    let mut b = sample_file();
    b[0] = b'X';
    expect_err(b, ErrorKind::BadMagic, "not a GGUF file");
}

#[test]
fn unsupported_versions() {
    let mut b = sample_file();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    expect_err(b.clone(), ErrorKind::UnsupportedVersion, "version 1");
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    expect_err(b.clone(), ErrorKind::UnsupportedVersion, "big-endian");
    b[4..8].copy_from_slice(&99u32.to_le_bytes());
    expect_err(b, ErrorKind::UnsupportedVersion, "99");
}

#[test]
fn absurd_counts() {
    let mut b = sample_file();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(b, ErrorKind::TooLarge, "tensor count");
    let mut b = sample_file();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(b, ErrorKind::TooLarge, "metadata count");
    // A string length larger than the file.
    let mut b = sample_file();
    let p = find(&b, b"general.architecture");
    b[p - 8..p].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    expect_err(b, ErrorKind::TooLarge, "key of metadata entry 0");
    // An array claiming more elements than bytes remain.
    let mut b = sample_file();
    let p = find(&b, b"strings") + 7 + 4;
    b[p..p + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    expect_err(b, ErrorKind::TooLarge, "array of key 'strings'");
}

#[test]
fn overflowing_and_bad_dims() {
    let b = sample_file();
    let p = find(&b, b"a.weight") + 8;
    let mut x = b.clone();
    x[p..p + 4].copy_from_slice(&2u32.to_le_bytes());
    x[p + 4..p + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    x[p + 12..p + 20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(x, ErrorKind::TooLarge, "tensor 'a.weight'");
    let mut x = b.clone();
    x[p..p + 4].copy_from_slice(&9u32.to_le_bytes());
    expect_err(x, ErrorKind::BadTensor, "n_dims is 9");
    let mut x = b.clone();
    x[p + 4..p + 12].copy_from_slice(&0u64.to_le_bytes());
    expect_err(x, ErrorKind::BadTensor, "dimension is 0");
    // Q8_0 rows must be a multiple of 32 weights.
    let q = find(&b, b"q.weight") + 8;
    let mut x = b.clone();
    x[q + 4..q + 12].copy_from_slice(&33u64.to_le_bytes());
    expect_err(x, ErrorKind::BadTensor, "block size 32");
}

#[test]
fn offsets_past_the_end_and_misaligned() {
    let b = sample_file();
    let p = find(&b, b"t.weight") + 8 + 4 + 16 + 4;
    let mut x = b.clone();
    x[p..p + 8].copy_from_slice(&(1u64 << 32).to_le_bytes());
    expect_err(x, ErrorKind::Truncated, "tensor 't.weight'");
    let mut x = b.clone();
    x[p..p + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    expect_err(x, ErrorKind::Truncated, "tensor 't.weight'");
    let mut x = b;
    x[p..p + 8].copy_from_slice(&3u64.to_le_bytes());
    expect_err(x, ErrorKind::BadTensor, "not a multiple of the alignment");
}

#[test]
fn unknown_type_ids() {
    let b = sample_file();
    let p = find(&b, b"a.weight") + 8 + 4 + 16;
    let mut x = b.clone();
    x[p..p + 4].copy_from_slice(&1234u32.to_le_bytes());
    expect_err(x, ErrorKind::UnknownType, "tensor 'a.weight': unknown ggml type id 1234");
    let mut x = b.clone();
    x[p..p + 4].copy_from_slice(&39u32.to_le_bytes());
    expect_err(x, ErrorKind::UnknownType, "TL2 LUT layout");
    let k = find(&b, b"u8") + 2;
    let mut x = b;
    x[k..k + 4].copy_from_slice(&77u32.to_le_bytes());
    expect_err(x, ErrorKind::BadValue, "key 'u8': unknown metadata value type 77");
}

#[test]
fn non_utf8_strings() {
    let b = sample_file();
    let p = find(&b, "ü".as_bytes());
    let mut x = b.clone();
    x[p] = 0xFF;
    expect_err(x, ErrorKind::BadUtf8, "element 1 of key 'strings'");
    let p = find(&b, b"a.weight");
    let mut x = b;
    x[p] = 0xC3;
    x[p + 1] = 0x28;
    expect_err(x, ErrorKind::BadUtf8, "name of tensor 0");
}

#[test]
fn bad_alignment_bool_and_duplicates() {
    let mut w = GgufWriter::new();
    w.set("general.alignment", Value::U32(3));
    expect_err(w.to_bytes(), ErrorKind::BadValue, "general.alignment");
    let mut b = sample_file();
    let p = find(&b, b"bool") + 4 + 4;
    b[p] = 2;
    expect_err(b, ErrorKind::BadValue, "key 'bool'");
    let b = sample_file();
    let p = find(&b, b"i8");
    let mut x = b;
    x[p..p + 2].copy_from_slice(b"u8");
    expect_err(x, ErrorKind::BadValue, "duplicate metadata key 'u8'");
}

#[test]
fn deeply_nested_arrays_are_refused() {
    let mut a = Array::I32(vec![1]);
    for _ in 0..20 {
        a = Array::Array(vec![a]);
    }
    let mut w = GgufWriter::new();
    w.set("deep", Value::Array(a));
    expect_err(w.to_bytes(), ErrorKind::TooLarge, "nested deeper");
}

#[test]
fn writer_checks_sizes() {
    let mut w = GgufWriter::new();
    let Err(e) = w.add_tensor("x", GgmlType::Q4_0, &[32, 2], vec![0u8; 35]) else { panic!("size not checked") };
    assert!(e.to_string().contains("needs 36 bytes"), "{e}");
    assert!(w.add_tensor("y", GgmlType::Q4_0, &[31], vec![0u8; 18]).is_err());
}

#[test]
fn missing_file_names_the_path() {
    let e = GgufFile::open("/nonexistent/model.gguf").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn type_table_sizes() {
    use GgmlType::*;
    let expect = [
        (F32, 1, 4),
        (F16, 1, 2),
        (BF16, 1, 2),
        (Q8_0, 32, 34),
        (Q4_0, 32, 18),
        (Q4_1, 32, 20),
        (Q5_0, 32, 22),
        (Q5_1, 32, 24),
        (Q4_K, 256, 144),
        (Q5_K, 256, 176),
        (Q6_K, 256, 210),
        (TQ1_0, 256, 54),
        (TQ2_0, 256, 66),
    ];
    for (t, bs, bb) in expect {
        assert_eq!((t.block_size(), t.block_bytes()), (bs, bb), "{t}");
        assert_eq!(GgmlType::from_id(t.id()), Some(t));
        assert_eq!(GgmlType::from_name(t.name()), Some(t));
    }
    assert_eq!(I2_S.id(), 36);
    assert_eq!(I2_S.tensor_bytes(2560, 2560 * 6912), Some(2560 * 6912 / 4 + 32));
    assert_eq!(GgmlType::from_id(39), None, "TL2 is not a type ternlm can size");
}

#[test]
fn streamed_tensors_equal_in_memory_ones() {
    let a: Vec<u8> = (0..4 * 40).map(|i| i as u8).collect();
    let b: Vec<u8> = (0..2 * 7).map(|i| (i * 3) as u8).collect();
    let mut whole = GgufWriter::new();
    whole.set("k", Value::U32(7));
    whole.add_tensor("a", GgmlType::F32, &[40], a.as_slice()).unwrap();
    whole.add_tensor("b", GgmlType::F16, &[7], b.as_slice()).unwrap();
    let want = whole.to_bytes();
    assert_eq!(whole.file_size(), want.len() as u64);

    let mut decl = GgufWriter::new();
    decl.set("k", Value::U32(7));
    decl.declare_tensor("a", GgmlType::F32, &[40]).unwrap();
    decl.declare_tensor("b", GgmlType::F16, &[7]).unwrap();
    let mut s = decl.stream(Vec::new()).unwrap();
    s.write_part("a", &a[..100]).unwrap();
    s.write_part("a", &a[100..]).unwrap();
    s.write_tensor("b", &b).unwrap();
    assert_eq!(s.finish().unwrap(), want);

    // Out of order, too long, and unfinished streams are errors, not corrupt files.
    let mut s = decl.stream(Vec::new()).unwrap();
    assert!(s.write_tensor("b", &b).is_err());
    let mut s = decl.stream(Vec::new()).unwrap();
    assert!(s.write_part("a", &[0u8; 161]).is_err());
    let mut s = decl.stream(Vec::new()).unwrap();
    s.write_tensor("a", &a).unwrap();
    assert!(s.finish().is_err());
    // A declared tensor has no bytes for the one-shot writer.
    assert!(decl.write(&mut Vec::new()).is_err());
}
