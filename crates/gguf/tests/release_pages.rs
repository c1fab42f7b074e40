//! `GgufFile::release_pages` drops a tensor's pages from the resident set and the bytes read afterwards are the
//! same; `GgufFile::read_unmapped` reads them without mapping them back. Its own test binary (one test), so no
//! other test maps files while the resident set is measured.

use ternlm_gguf::{GgmlType, GgufFile, GgufWriter};

/// File-backed resident memory of this process (`RssFile` in /proc/self/status), in bytes.
fn rss_file() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("RssFile:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[test]
fn released_pages_leave_the_resident_set_and_read_back_unchanged() {
    let n = 16 << 20; // 16 MiB of f32s
    let data: Vec<u8> = (0..n as u32 / 4).flat_map(|i| (i.wrapping_mul(2654435761)).to_le_bytes()).collect();
    let path = std::env::temp_dir().join(format!("ternlm-release-{}.gguf", std::process::id()));
    let mut w = GgufWriter::new();
    w.add_tensor("big.weight", GgmlType::F32, &[1024, (n / 4096) as u64], data.as_slice()).unwrap();
    w.write_to_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let info = f.tensors()[0].clone();
    let bytes = f.tensor_data(&info);
    assert_eq!(bytes, data.as_slice());
    let before = rss_file();
    f.release_pages(bytes);
    let after = rss_file();
    // Reading released rows through the file (as embedding lookups of a re-quantized tied head do) gives their
    // bytes and maps nothing back: 64 scattered 4 KiB rows.
    let mut row = vec![0u8; 4096];
    for r in 0..64 {
        let at = r * (n / 64);
        f.read_unmapped(&bytes[at..at + 4096], &mut row);
        assert_eq!(row, data[at..at + 4096]);
    }
    let after_reads = rss_file();
    // The contents are the file's, whether resident or faulted back in.
    assert_eq!(f.tensor_data(&info), data.as_slice());
    let _ = std::fs::remove_file(&path);
    match (before, after) {
        (Some(b), Some(a)) => {
            assert!(b >= a + (12 << 20), "resident file pages {b} -> {a}: nothing released");
            let r = after_reads.unwrap();
            assert!(r < a + (1 << 20), "reading 64 rows through the file mapped {} bytes back", r.saturating_sub(a));
        }
        _ => eprintln!("LOUD SKIP: /proc/self/status has no RssFile here; only the contents were checked"),
    }
    // A slice that is not part of the file is ignored, and read_unmapped copies it.
    f.release_pages(&data);
    f.read_unmapped(&data[..4096], &mut row);
    assert_eq!(row, data[..4096]);
}
