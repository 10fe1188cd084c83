//! Streaming, shown by memory: packing, recompressing and extracting a 1 GiB layer keeps
//! the process's peak RSS far below the layer's size. This file holds a single test so
//! that nothing else in the process moves the high-water mark.

use std::fs;
use std::io::{BufReader, BufWriter};

use ferry::digest::Digest;
use ferry::layer::{
    decompress, extract_layer, pack_entries, recompress, Compression, Epoch, ExtractMode,
    LayerCompression, LayerEntry, LayerOptions,
};

const GIB: u64 = 1 << 30;
const LIMIT_KIB: u64 = 200 * 1024;

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_1_gib_layer_streams_in_bounded_memory() {
    let t = tempfile::tempdir().unwrap();
    // Sparse: costs no disk, but every byte is read and hashed like real content.
    let big = t.path().join("big.bin");
    fs::File::create(&big).unwrap().set_len(GIB).unwrap();
    let entries = vec![
        LayerEntry::dir("/data"),
        LayerEntry::host_file("/data/big.bin", &big),
        LayerEntry::bytes("/data/small", "x"),
    ];

    let zpath = t.path().join("layer.zst");
    let out = BufWriter::new(fs::File::create(&zpath).unwrap());
    let opts =
        LayerOptions { source_date_epoch: Epoch::Clamp(0), compression: LayerCompression::Zstd };
    let (packed, out) = pack_entries(entries, &opts, out).unwrap();
    drop(out);
    assert!(packed.size > GIB, "the whole file went through the tar");
    assert_eq!(packed.blob_size, fs::metadata(&zpath).unwrap().len());
    let after_pack = peak_rss_kib();
    assert!(after_pack < LIMIT_KIB, "peak RSS {after_pack} KiB while packing 1 GiB");

    // Derive the gzip blob from the zstd one, streaming, with the diffID checked.
    let gpath = t.path().join("layer.gz");
    let (gz, out) = recompress(
        BufReader::new(fs::File::open(&zpath).unwrap()),
        Compression::Zstd,
        LayerCompression::Gzip,
        &packed.diff_id,
        BufWriter::new(fs::File::create(&gpath).unwrap()),
    )
    .unwrap();
    drop(out);
    assert_eq!(gz.diff_id, packed.diff_id);
    assert_eq!(gz.blob_digest, Digest::of(&fs::read(&gpath).unwrap()));

    // And extract it again.
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let (_, tar) = decompress(BufReader::new(fs::File::open(&gpath).unwrap())).unwrap();
    extract_layer(tar, &dest, ExtractMode::Apply).unwrap();
    assert_eq!(fs::metadata(dest.join("data/big.bin")).unwrap().len(), GIB);

    let peak = peak_rss_kib();
    eprintln!("peak RSS: {peak} KiB after packing, recompressing and extracting 1 GiB");
    assert!(peak < LIMIT_KIB, "peak RSS {peak} KiB for a 1 GiB layer");
}
