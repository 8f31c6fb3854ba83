//! hutch-agent: PID 1 inside every hutch VM.
//!
//! As init it mounts the kernel filesystems, loads the kernel modules listed by the host in
//! `/hutch/modules.load`, mounts the image (read-only, found by virtio-blk serial `hutch-image`)
//! under a writable overlay whose upper layer lives on the VM's own disk (`hutch-data`), switches
//! root into it, sets the hostname and makes `/tmp`, `/run` and `/dev/shm` (see `scratch`).
//! Then it serves the host over the virtio-serial port `org.hutch.agent` (see `serve`); after a
//! restore from a memory snapshot the host says so and the guest catches up (see `restore`).
//! Directory watches stream inotify events to the host (see `watch`).
//! It never returns: if init fails it prints why on the console and powers the VM off.

mod creds;
mod exec;
mod export;
mod init;
mod net;
mod restore;
mod scratch;
mod serve;
mod sys;
mod watch;

fn main() {
    if std::process::id() != 1 {
        eprintln!("hutch-agent: must run as PID 1 inside a hutch VM");
        std::process::exit(2);
    }
    let cfg = match init::init() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("hutch-agent: init failed: {e}");
            sys::power_off();
        }
    };
    serve::serve(cfg);
}
