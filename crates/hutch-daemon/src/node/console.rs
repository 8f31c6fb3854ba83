//! VM console logs: where they are, their tail (raw for `hutch logs`, cleaned of control
//! characters for errors and `describe`), and keeping them bounded.

use super::Node;
use std::path::{Path, PathBuf};

impl Node {
    pub fn console_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    /// The last `max` bytes of the VM's console.
    /// The raw end of a VM's console (`hutch logs` shows it as the guest wrote it).
    pub fn console_tail(&self, id: &str, max: u64) -> String {
        read_tail(&self.console_path(id), max)
    }

    /// The end of a VM's console made safe to put in errors and `describe`.
    pub(crate) fn console_text(&self, id: &str, max: u64) -> String {
        hutch_core::clean_text(&read_tail(&self.console_path(id), max))
    }

    /// Keeps every console log under the configured size (QEMU appends with O_APPEND, so
    /// truncating in place is safe).
    pub async fn trim_consoles(&self) {
        let Ok(vms) = self.records.local_vms().await else {
            return;
        };
        for vm in vms {
            if let Err(e) = trim_log(&self.console_path(&vm.id), self.cfg.console_max_bytes) {
                tracing::warn!(vm = %vm.name, error = %e, "trimming console log");
            }
        }
    }
}

/// When `p` is over `max` bytes, keeps only its last `max / 2` bytes. The writer (QEMU) has the
/// file open with O_APPEND, so its next write lands at the new end.
pub fn trim_log(p: &Path, max: u64) -> std::io::Result<bool> {
    let size = match std::fs::metadata(p) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= max {
        return Ok(false);
    }
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(p)?;
    f.seek(SeekFrom::Start(size - max / 2))?;
    let mut keep = Vec::new();
    f.read_to_end(&mut keep)?;
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&keep)?;
    Ok(true)
}

fn read_tail(p: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut b = Vec::new();
    let _ = f.take(max).read_to_end(&mut b);
    String::from_utf8_lossy(&b).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_logs_stay_bounded_and_keep_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        assert!(!trim_log(&p, 100).unwrap(), "a missing log is fine");
        std::fs::write(&p, vec![b'a'; 80]).unwrap();
        assert!(!trim_log(&p, 100).unwrap());
        // An appending writer keeps writing at the end after a trim.
        let mut w = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        use std::io::Write;
        w.write_all(&[b'b'; 70]).unwrap();
        assert!(trim_log(&p, 100).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), vec![b'b'; 50]);
        w.write_all(b"end").unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 53);
        assert!(got.ends_with(b"bend"));
        assert_eq!(read_tail(&p, 4), "bend");
    }
}
