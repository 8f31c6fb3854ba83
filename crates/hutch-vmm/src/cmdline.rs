//! The QEMU command line, built from typed parts that each render their own arguments.

use crate::{Accel, VmSpec};
use std::path::Path;

/// One part of a QEMU command line.
pub trait ToArgs {
    fn to_args(&self) -> Vec<String>;
}

/// Escapes a value for QEMU's `key=value,...` option syntax (commas are doubled).
pub fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

fn path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

pub struct Machine {
    pub accel: Accel,
}

impl ToArgs for Machine {
    fn to_args(&self) -> Vec<String> {
        // `microvm` hangs in TSC calibration under TCG and needs ACPI for virtio-mmio with the
        // Debian cloud kernel, so both accelerators use `pc` for now (docs/architecture.md).
        let cpu = match self.accel {
            Accel::Kvm => "host,-arch-capabilities",
            Accel::Tcg => "qemu64",
        };
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,thread=multi",
        };
        vec![
            "-machine".into(),
            "pc".into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
        ]
    }
}

pub struct Sizing {
    pub vcpus: u32,
    pub mem_mib: u64,
}

impl ToArgs for Sizing {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.mem_mib),
        ]
    }
}

pub struct DirectBoot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: String,
}

impl ToArgs for DirectBoot<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-kernel".into(),
            self.kernel.to_string_lossy().into(),
            "-initrd".into(),
            self.initrd.to_string_lossy().into(),
            "-append".into(),
            self.append.clone(),
        ]
    }
}

#[derive(Clone, Copy)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

pub struct VirtioDisk<'a> {
    pub id: &'a str,
    pub file: &'a Path,
    pub format: DiskFormat,
    pub read_only: bool,
    /// Seen by the guest in /sys/block/vdX/serial; the agent finds its disks by it.
    pub serial: &'a str,
}

impl ToArgs for VirtioDisk<'_> {
    fn to_args(&self) -> Vec<String> {
        let fmt = match self.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let ro = if self.read_only { ",readonly=on" } else { "" };
        vec![
            "-drive".into(),
            format!(
                "file={},format={fmt},if=none,id={},cache=writeback{ro}",
                path(self.file),
                self.id
            ),
            "-device".into(),
            format!(
                "virtio-blk-pci,drive={},serial={}",
                self.id,
                escape(self.serial)
            ),
        ]
    }
}

/// The guest console (ttyS0) appended to a file.
pub struct ConsoleFile<'a> {
    pub file: &'a Path,
}

impl ToArgs for ConsoleFile<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("file,id=console,path={},append=on", path(self.file)),
            "-serial".into(),
            "chardev:console".into(),
        ]
    }
}

/// A virtio-serial port backed by a unix socket on which QEMU listens.
pub struct AgentPort<'a> {
    pub socket: &'a Path,
    pub name: &'a str,
}

impl ToArgs for AgentPort<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path(self.socket)
            ),
            "-device".into(),
            format!(
                "virtserialport,bus=vser0.0,chardev=agent,name={}",
                escape(self.name)
            ),
        ]
    }
}

pub struct Qmp<'a> {
    pub socket: &'a Path,
}

impl ToArgs for Qmp<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(self.socket)),
        ]
    }
}

/// Detach from hutchd: QEMU forks into the background once initialised and writes its pid.
pub struct Daemonize<'a> {
    pub pidfile: &'a Path,
}

impl ToArgs for Daemonize<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-daemonize".into(),
            "-pidfile".into(),
            self.pidfile.to_string_lossy().into(),
        ]
    }
}

/// Builds the full argument list (without the program name) for `spec`.
pub fn build(spec: &VmSpec) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!(
            "hutch-{},process=hutch-{}",
            escape(&spec.id),
            escape(&spec.id)
        ),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
    ];
    let append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 reboot=t hutch.hostname={}",
        spec.hostname
    );
    let (agent_sock, qmp_sock, pidfile) = (spec.agent_socket(), spec.qmp_socket(), spec.pidfile());
    let parts: Vec<Box<dyn ToArgs + '_>> = vec![
        Box::new(Machine { accel: spec.accel }),
        Box::new(Sizing {
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
        }),
        Box::new(DirectBoot {
            kernel: &spec.kernel,
            initrd: &spec.initrd,
            append,
        }),
        Box::new(VirtioDisk {
            id: "image",
            file: &spec.image_disk,
            format: DiskFormat::Raw,
            read_only: true,
            serial: "hutch-image",
        }),
        Box::new(VirtioDisk {
            id: "data",
            file: &spec.data_disk,
            format: DiskFormat::Qcow2,
            read_only: false,
            serial: "hutch-data",
        }),
        Box::new(ConsoleFile {
            file: &spec.console_log,
        }),
        Box::new(AgentPort {
            socket: &agent_sock,
            name: AGENT_PORT_NAME,
        }),
        Box::new(Qmp { socket: &qmp_sock }),
        Box::new(Daemonize { pidfile: &pidfile }),
    ];
    for p in parts {
        args.extend(p.to_args());
    }
    args
}

/// The agent's port name (kept in sync with `hutch_proto::PORT_NAME` by a test in hutch-daemon).
pub const AGENT_PORT_NAME: &str = "org.hutch.agent";

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(accel: Accel) -> VmSpec {
        VmSpec {
            id: "vm1".into(),
            hostname: "demo".into(),
            vcpus: 2,
            mem_mib: 512,
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd".into(),
            image_disk: "/img/a,b.erofs".into(),
            data_disk: "/vm/data.qcow2".into(),
            runtime_dir: PathBuf::from("/run/vm1"),
            console_log: "/vm/console.log".into(),
            accel,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_command_line() {
        let a = build(&spec(Accel::Tcg));
        assert_eq!(after(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(after(&a, "-cpu"), ["qemu64"]);
        assert_eq!(after(&a, "-machine"), ["pc"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["512M"]);
        assert_eq!(after(&a, "-kernel"), ["/k/vmlinuz"]);
        assert!(after(&a, "-append")[0].contains("hutch.hostname=demo"));
        let drives = after(&a, "-drive");
        // Commas in paths are escaped for QEMU's option parser.
        assert_eq!(
            drives[0],
            "file=/img/a,,b.erofs,format=raw,if=none,id=image,cache=writeback,readonly=on"
        );
        assert!(drives[1].starts_with("file=/vm/data.qcow2,format=qcow2"));
        let devs = after(&a, "-device");
        assert!(devs.contains(&"virtio-blk-pci,drive=image,serial=hutch-image"));
        assert!(devs.contains(&"virtserialport,bus=vser0.0,chardev=agent,name=org.hutch.agent"));
        assert_eq!(
            after(&a, "-qmp"),
            ["unix:/run/vm1/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(after(&a, "-pidfile"), ["/run/vm1/qemu.pid"]);
        assert!(a.contains(&"-daemonize".to_string()));
        assert_eq!(after(&a, "-name"), ["hutch-vm1,process=hutch-vm1"]);
    }

    #[test]
    fn kvm_uses_host_cpu_without_arch_capabilities() {
        let a = build(&spec(Accel::Kvm));
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host,-arch-capabilities"]);
    }
}
