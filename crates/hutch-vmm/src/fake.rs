//! [`FakeVmm`]: a [`Vmm`] without processes, for unit tests of what sits above the VMM seam and
//! for the control-plane benchmark. "Processes" are numbers in a set: `launch` adds one (after
//! an optional delay), `kill`/`quit` remove it, [`FakeVmm::crash`] removes it the way a QEMU
//! dying would. Disks are empty files. Built for tests and with the `fakes` feature.

use crate::{VmExit, VmHandle, VmProcess, VmSpec, Vmm, VmmError};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct FakeVmm {
    next: AtomicU32,
    /// Bumped whenever a process ends, for `wait`.
    ends: Arc<tokio::sync::watch::Sender<u64>>,
    alive: Arc<Mutex<HashSet<u32>>>,
    ended: Arc<Mutex<HashMap<u32, VmExit>>>,
    /// How long a process takes to go away after `quit`.
    pub quit_delay: Duration,
    /// How long a launch takes.
    pub launch_delay: Duration,
    /// Make every launch fail (a QEMU that does not start).
    pub fail_launches: AtomicBool,
}

impl Default for FakeVmm {
    fn default() -> Self {
        FakeVmm {
            // Far above real pids, so nothing mistakes them for processes.
            next: AtomicU32::new(4_000_000),
            ends: Arc::new(tokio::sync::watch::channel(0).0),
            alive: Arc::default(),
            ended: Arc::default(),
            quit_delay: Duration::ZERO,
            launch_delay: Duration::ZERO,
            fail_launches: AtomicBool::new(false),
        }
    }
}

impl FakeVmm {
    /// A fake VMM whose launches take `delay`, and whose processes take as long to go away
    /// after `quit` (a guest powering off).
    pub fn slow(delay: Duration) -> FakeVmm {
        FakeVmm {
            launch_delay: delay,
            quit_delay: delay,
            ..Default::default()
        }
    }

    /// The process of `pid` dies (as `kill -9` of a QEMU would).
    pub fn crash(&self, pid: u32) {
        self.end(pid, VmExit::Crashed("QEMU was killed by signal 9".into()));
    }

    /// How many VM processes run.
    pub fn running(&self) -> usize {
        self.alive.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn end(&self, pid: u32, how: VmExit) {
        end(&self.alive, &self.ended, pid, how);
        self.ends.send_modify(|n| *n += 1);
    }
}

impl Vmm for FakeVmm {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn launch(&self, spec: &VmSpec) -> Result<VmProcess, VmmError> {
        if self.fail_launches.load(Ordering::Relaxed) {
            return Err(VmmError::Launch("the fake VMM was told to fail".into()));
        }
        if !self.launch_delay.is_zero() {
            std::thread::sleep(self.launch_delay);
        }
        let pid = self.next.fetch_add(1, Ordering::Relaxed);
        self.alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid);
        Ok(VmProcess {
            handle: spec.handle(pid),
            confinement: None,
        })
    }

    fn is_alive(&self, vm: &VmHandle) -> bool {
        self.alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&vm.pid)
    }

    fn wait<'a>(
        &'a self,
        vm: &'a VmHandle,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        let mut rx = self.ends.subscribe();
        Box::pin(async move {
            while self.is_alive(vm) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    fn exit(&self, vm: &VmHandle) -> VmExit {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vm.pid)
            .unwrap_or(VmExit::Unknown)
    }

    fn quit(&self, vm: &VmHandle) -> Result<(), VmmError> {
        if self.quit_delay.is_zero() {
            self.end(vm.pid, VmExit::Clean);
        } else {
            let (alive, ended, ends, pid, d) = (
                self.alive.clone(),
                self.ended.clone(),
                self.ends.clone(),
                vm.pid,
                self.quit_delay,
            );
            std::thread::spawn(move || {
                std::thread::sleep(d);
                end(&alive, &ended, pid, VmExit::Clean);
                ends.send_modify(|n| *n += 1);
            });
        }
        Ok(())
    }

    fn save(
        &self,
        vm: &VmHandle,
        state: &Path,
        _ignore_shared: bool,
    ) -> Result<crate::Saved, VmmError> {
        self.save_fake(vm, state)
    }

    fn kill(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.end(
            vm.pid,
            VmExit::Crashed("QEMU was killed by signal 9".into()),
        );
        Ok(())
    }

    fn create_disk(
        &self,
        disk: &Path,
        _base: &crate::Layer,
        from: Option<&Path>,
    ) -> Result<(), VmmError> {
        let r = match from {
            Some(src) => std::fs::copy(src, disk).map(|_| ()),
            None => std::fs::File::create(disk).map(|_| ()),
        };
        r.map_err(|source| VmmError::Io {
            context: format!("making {}", disk.display()),
            source,
        })
    }
}

impl FakeVmm {
    /// Writes a small stand-in for the device state (the fake has no guest).
    fn save_fake(&self, vm: &VmHandle, state: &Path) -> Result<crate::Saved, VmmError> {
        if !self.is_alive(vm) {
            return Err(VmmError::Qmp("the VM is not running".into()));
        }
        std::fs::write(state, format!("fake state of {}\n", vm.id)).map_err(|source| {
            VmmError::Io {
                context: format!("writing {}", state.display()),
                source,
            }
        })?;
        Ok(crate::Saved { bytes: 0, ms: 0 })
    }
}

fn end(alive: &Mutex<HashSet<u32>>, ended: &Mutex<HashMap<u32, VmExit>>, pid: u32, how: VmExit) {
    if alive.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid) {
        ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, how);
    }
}
