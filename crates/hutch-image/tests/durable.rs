//! Cached root filesystems are trusted only when complete: an EROFS image cut short (a crash
//! before its data reached the disk) is detected from its own superblock.

use std::process::Command;

#[test]
fn truncated_erofs_is_detected() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("big"), vec![7u8; 300_000]).unwrap();
    std::fs::write(tree.join("small"), b"hi").unwrap();
    let img = d.path().join("img.erofs");
    let o = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&img)
        .arg(&tree)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(hutch_image::erofs_complete(&img));
    let len = std::fs::metadata(&img).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(len - 4096).unwrap();
    assert!(
        !hutch_image::erofs_complete(&img),
        "a cut-short image is not trusted"
    );
    std::fs::write(&img, vec![0u8; 8192]).unwrap();
    assert!(!hutch_image::erofs_complete(&img), "no superblock");
    assert!(!hutch_image::erofs_complete(&d.path().join("missing")));
}
