//! The QEMU command line, built from typed parts that each render their own arguments.

use crate::{Accel, VmSpec};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

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
    /// The id of the memory backend object that holds guest RAM (None: anonymous RAM).
    pub memory: Option<&'static str>,
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
            // A bounded translation cache keeps QEMU's memory beyond guest RAM bounded, so the
            // cgroup limit can be tight (docs/architecture.md, "Confinement").
            Accel::Tcg => "tcg,thread=multi,tb-size=64",
        };
        let machine = match self.memory {
            Some(id) => format!("pc,memory-backend={id}"),
            None => "pc".into(),
        };
        vec![
            "-machine".into(),
            machine,
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

/// Guest RAM in the file handed in as `fd` (named by its `/proc/self/fd` link, which QEMU
/// reopens before it chroots): shared and writable when the VM owns the file, private and
/// copy-on-write over a read-only open when it is a snapshot's.
pub struct MemoryFile {
    pub fd: RawFd,
    pub mem_mib: u64,
    pub own: bool,
}

/// The memory backend's object id.
pub const MEMORY_ID: &str = "ram";

impl ToArgs for MemoryFile {
    fn to_args(&self) -> Vec<String> {
        let mode = if self.own {
            "share=on"
        } else {
            "share=off,readonly=on,rom=off"
        };
        vec![
            "-object".into(),
            format!(
                "memory-backend-file,id={MEMORY_ID},size={}M,mem-path=/proc/self/fd/{},{mode}",
                self.mem_mib, self.fd
            ),
        ]
    }
}

/// Wait for saved state instead of booting: hutch sends `migrate-incoming` over QMP (with the
/// capabilities the state was saved with) once QEMU is up; the state is fd set [`SET_STATE`].
pub struct IncomingState;

impl ToArgs for IncomingState {
    fn to_args(&self) -> Vec<String> {
        vec!["-incoming".into(), "defer".into()]
    }
}

/// Wait, stopped, for a live migration: hutch hands in the stream over QMP
/// (`crate::migrate::receive`) and lets the guest run once the disk is back from the export.
pub struct IncomingMigration;

impl ToArgs for IncomingMigration {
    fn to_args(&self) -> Vec<String> {
        vec!["-incoming".into(), "defer".into(), "-S".into()]
    }
}

/// Wait before the first instruction (a VM started only to be moved, never run here).
pub struct Held;

impl ToArgs for Held {
    fn to_args(&self) -> Vec<String> {
        vec!["-S".into()]
    }
}

/// Direct kernel boot. The kernel and initrd are handed in as descriptors and named by their
/// `/proc/self/fd` links (QEMU opens them by path, with no fd-passing form).
pub struct DirectBoot {
    pub kernel: RawFd,
    pub initrd: RawFd,
    pub append: String,
}

impl ToArgs for DirectBoot {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-kernel".into(),
            format!("/proc/self/fd/{}", self.kernel),
            "-initrd".into(),
            format!("/proc/self/fd/{}", self.initrd),
            "-append".into(),
            self.append.clone(),
        ]
    }
}

/// A descriptor handed to QEMU as fd set `set` (opened as `/dev/fdset/SET`); `opaque` is the
/// host path it was opened from (shown by `query-fdsets`, and it keeps the data dir visible in
/// QEMU's command line).
pub struct AddFd<'a> {
    pub fd: RawFd,
    pub set: u32,
    pub opaque: &'a Path,
}

impl ToArgs for AddFd<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-add-fd".into(),
            format!(
                "fd={},set={},opaque={}",
                self.fd,
                self.set,
                path(self.opaque)
            ),
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A block node `NAME` in format `format` over fd set `set` (`NAME-file` is its protocol node).
pub struct BlockNode<'a> {
    pub name: &'a str,
    pub set: u32,
    pub format: DiskFormat,
    pub read_only: bool,
    /// The node name of the backing image (qcow2 only).
    pub backing: Option<&'a str>,
}

impl ToArgs for BlockNode<'_> {
    fn to_args(&self) -> Vec<String> {
        let ro = if self.read_only { ",read-only=on" } else { "" };
        let backing = self
            .backing
            .map(|b| format!(",backing={b}"))
            .unwrap_or_default();
        vec![
            "-blockdev".into(),
            format!(
                "driver=file,node-name={}-file,filename=/dev/fdset/{}{ro}",
                self.name, self.set
            ),
            "-blockdev".into(),
            format!(
                "driver={},node-name={},file={}-file{ro}{backing}",
                self.format.as_str(),
                self.name,
                self.name
            ),
        ]
    }
}

/// A virtio-blk device on block node `node`.
pub struct VirtioDisk<'a> {
    pub node: &'a str,
    /// Seen by the guest in /sys/block/vdX/serial; the agent finds its disks by it.
    pub serial: &'a str,
}

impl ToArgs for VirtioDisk<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-device".into(),
            format!(
                "virtio-blk-pci,drive={},serial={}",
                self.node,
                escape(self.serial)
            ),
        ]
    }
}

/// The guest console (ttyS0) appended to the file in fd set `set`.
pub struct ConsoleFile {
    pub set: u32,
}

impl ToArgs for ConsoleFile {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("file,id=console,path=/dev/fdset/{},append=on", self.set),
            "-serial".into(),
            "chardev:console".into(),
        ]
    }
}

/// A virtio-serial port backed by a unix socket hutchd listens on and hands in as `fd`.
pub struct AgentPort<'a> {
    pub fd: RawFd,
    pub name: &'a str,
}

impl ToArgs for AgentPort<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!("socket,id=agent,fd={},server=on,wait=off", self.fd),
            "-device".into(),
            format!(
                "virtserialport,bus=vser0.0,chardev=agent,name={}",
                escape(self.name)
            ),
        ]
    }
}

/// QMP on a listening unix socket handed in as `fd`.
pub struct Qmp {
    pub fd: RawFd,
}

impl ToArgs for Qmp {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", self.fd),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]
    }
}

/// QEMU's seccomp filter: obsolete calls, set*id, fork/exec/namespaces and scheduler changes
/// are refused for the life of the process.
pub struct Sandbox;

/// The `-sandbox` value every VM gets.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

impl ToArgs for Sandbox {
    fn to_args(&self) -> Vec<String> {
        vec!["-sandbox".into(), SANDBOX.into()]
    }
}

/// Chroot into the (empty) directory handed in as `fd` once initialised, before the guest runs.
pub struct Chroot {
    pub fd: RawFd,
}

impl ToArgs for Chroot {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-run-with".into(),
            format!("chroot=/proc/self/fd/{}", self.fd),
        ]
    }
}

/// A virtio-net NIC on the TAP handed in as `fd` (no vhost: the TAP's file is all QEMU has).
pub struct NetDevice<'a> {
    pub fd: RawFd,
    pub mac: &'a str,
}

impl ToArgs for NetDevice<'_> {
    fn to_args(&self) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!("tap,id=net0,fd={},vhost=off", self.fd),
            "-device".into(),
            // No option ROM: the guest boots from the kernel hutch hands QEMU, never the network.
            format!(
                "virtio-net-pci,netdev=net0,mac={},romfile=",
                escape(self.mac)
            ),
        ]
    }
}

/// The descriptors hutchd opened for one QEMU, by what they are.
#[derive(Debug, Clone)]
pub struct Fds {
    pub kernel: RawFd,
    pub initrd: RawFd,
    pub image: RawFd,
    pub data: RawFd,
    /// The data disk's backing chain, top first: descriptor, format, path.
    pub backing: Vec<(RawFd, DiskFormat, PathBuf)>,
    /// Guest RAM's file and whether the VM owns it (None: anonymous RAM).
    pub memory: Option<(RawFd, bool)>,
    /// Saved state to start from.
    pub incoming: Option<RawFd>,
    pub console: RawFd,
    pub qmp: RawFd,
    pub agent: RawFd,
    /// The empty directory to chroot into (None: not confined).
    pub jail: Option<RawFd>,
    /// The VM's TAP (None: no NIC).
    pub tap: Option<RawFd>,
}

impl Fds {
    /// Every descriptor QEMU must inherit.
    pub fn all(&self) -> Vec<RawFd> {
        let mut v = vec![
            self.kernel,
            self.initrd,
            self.image,
            self.data,
            self.console,
            self.qmp,
            self.agent,
        ];
        v.extend(self.backing.iter().map(|b| b.0));
        v.extend(self.memory.map(|m| m.0));
        v.extend(self.incoming);
        v.extend(self.jail);
        v.extend(self.tap);
        v
    }
}

const SET_IMAGE: u32 = 1;
const SET_DATA: u32 = 2;
const SET_CONSOLE: u32 = 4;
/// The saved state a restore starts from (`migrate-incoming file:/dev/fdset/5`).
pub const SET_STATE: u32 = 5;
/// Backing layer `i` (top first) is fd set `SET_BACKING + i`.
const SET_BACKING: u32 = 10;
/// The longest backing chain a VM's disk may have.
pub const MAX_LAYERS: usize = 32;

/// Builds the full argument list (without the program name) for `spec`, whose files and
/// sockets hutchd opened as `fds`.
pub fn build(spec: &VmSpec, fds: &Fds) -> Vec<String> {
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
    let mut append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 reboot=t hutch.hostname={}",
        spec.hostname
    );
    if !spec.cmdline_extra.is_empty() {
        append.push(' ');
        append.push_str(&spec.cmdline_extra);
    }
    // Block node names of the backing layers, top first.
    let names: Vec<String> = (0..fds.backing.len())
        .map(|i| {
            if i == 0 {
                "base".into()
            } else {
                format!("base{i}")
            }
        })
        .collect();
    let mut parts: Vec<Box<dyn ToArgs + '_>> = vec![
        Box::new(Sandbox),
        Box::new(Machine {
            accel: spec.accel,
            memory: fds.memory.map(|_| MEMORY_ID),
        }),
        Box::new(Sizing {
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
        }),
        Box::new(DirectBoot {
            kernel: fds.kernel,
            initrd: fds.initrd,
            append,
        }),
        Box::new(AddFd {
            fd: fds.image,
            set: SET_IMAGE,
            opaque: &spec.image_disk,
        }),
        Box::new(AddFd {
            fd: fds.data,
            set: SET_DATA,
            opaque: &spec.data_disk,
        }),
    ];
    for (i, (fd, _, p)) in fds.backing.iter().enumerate() {
        parts.push(Box::new(AddFd {
            fd: *fd,
            set: SET_BACKING + i as u32,
            opaque: p,
        }));
    }
    if let Some((fd, own)) = fds.memory {
        parts.push(Box::new(MemoryFile {
            fd,
            mem_mib: spec.mem_mib,
            own,
        }));
    }
    parts.push(Box::new(AddFd {
        fd: fds.console,
        set: SET_CONSOLE,
        opaque: &spec.console_log,
    }));
    parts.push(Box::new(BlockNode {
        name: "image",
        set: SET_IMAGE,
        format: DiskFormat::Raw,
        read_only: true,
        backing: None,
    }));
    parts.push(Box::new(VirtioDisk {
        node: "image",
        serial: "hutch-image",
    }));
    // Bottom up, so that each node's backing node is defined before it.
    for (i, (_, format, _)) in fds.backing.iter().enumerate().rev() {
        parts.push(Box::new(BlockNode {
            name: &names[i],
            set: SET_BACKING + i as u32,
            format: *format,
            read_only: true,
            backing: names.get(i + 1).map(String::as_str),
        }));
    }
    parts.push(Box::new(BlockNode {
        name: "data",
        set: SET_DATA,
        format: DiskFormat::Qcow2,
        read_only: false,
        backing: names.first().map(String::as_str),
    }));
    parts.push(Box::new(VirtioDisk {
        node: "data",
        serial: "hutch-data",
    }));
    parts.push(Box::new(ConsoleFile { set: SET_CONSOLE }));
    parts.push(Box::new(AgentPort {
        fd: fds.agent,
        name: AGENT_PORT_NAME,
    }));
    if let (Some(fd), Some(nic)) = (fds.tap, &spec.nic) {
        parts.push(Box::new(NetDevice { fd, mac: &nic.mac }));
    }
    parts.push(Box::new(Qmp { fd: fds.qmp }));
    if let (Some(fd), Some(i)) = (fds.incoming, &spec.incoming) {
        parts.push(Box::new(AddFd {
            fd,
            set: SET_STATE,
            opaque: &i.state,
        }));
        parts.push(Box::new(IncomingState));
    } else if spec.migration_in {
        parts.push(Box::new(IncomingMigration));
    } else if spec.hold {
        parts.push(Box::new(Held));
    }
    if let Some(fd) = fds.jail {
        parts.push(Box::new(Chroot { fd }));
    }
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
            jail_uid: None,
            nic: None,
            cmdline_extra: String::new(),
            memory: None,
            backing: vec![],
            incoming: None,
            migration_in: false,
            hold: false,
        }
    }

    fn fds(backing: bool, jail: bool) -> Fds {
        Fds {
            kernel: 10,
            initrd: 11,
            image: 12,
            data: 13,
            backing: if backing {
                vec![(14, DiskFormat::Raw, PathBuf::from("/t/base.ext4"))]
            } else {
                vec![]
            },
            memory: None,
            incoming: None,
            console: 15,
            qmp: 16,
            agent: 17,
            jail: jail.then_some(18),
            tap: None,
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
        let a = build(&spec(Accel::Tcg), &fds(true, true));
        assert_eq!(after(&a, "-accel"), ["tcg,thread=multi,tb-size=64"]);
        assert_eq!(after(&a, "-cpu"), ["qemu64"]);
        assert_eq!(after(&a, "-machine"), ["pc"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["512M"]);
        assert_eq!(after(&a, "-kernel"), ["/proc/self/fd/10"]);
        assert_eq!(after(&a, "-initrd"), ["/proc/self/fd/11"]);
        assert!(after(&a, "-append")[0].contains("hutch.hostname=demo"));
        // Files come in as fd sets; commas in the paths they name are escaped.
        assert_eq!(
            after(&a, "-add-fd"),
            [
                "fd=12,set=1,opaque=/img/a,,b.erofs",
                "fd=13,set=2,opaque=/vm/data.qcow2",
                "fd=14,set=10,opaque=/t/base.ext4",
                "fd=15,set=4,opaque=/vm/console.log",
            ]
        );
        assert_eq!(
            after(&a, "-blockdev"),
            [
                "driver=file,node-name=image-file,filename=/dev/fdset/1,read-only=on",
                "driver=raw,node-name=image,file=image-file,read-only=on",
                "driver=file,node-name=base-file,filename=/dev/fdset/10,read-only=on",
                "driver=raw,node-name=base,file=base-file,read-only=on",
                "driver=file,node-name=data-file,filename=/dev/fdset/2",
                "driver=qcow2,node-name=data,file=data-file,backing=base",
            ]
        );
        let devs = after(&a, "-device");
        assert!(devs.contains(&"virtio-blk-pci,drive=image,serial=hutch-image"));
        assert!(devs.contains(&"virtio-blk-pci,drive=data,serial=hutch-data"));
        assert!(devs.contains(&"virtserialport,bus=vser0.0,chardev=agent,name=org.hutch.agent"));
        assert_eq!(
            after(&a, "-chardev"),
            [
                "file,id=console,path=/dev/fdset/4,append=on",
                "socket,id=agent,fd=17,server=on,wait=off",
                "socket,id=qmp,fd=16,server=on,wait=off",
            ]
        );
        assert_eq!(after(&a, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(after(&a, "-name"), ["hutch-vm1,process=hutch-vm1"]);
        // Confinement: seccomp always, chroot when jailed; QEMU never daemonizes itself (its
        // fork and setsid would be refused by its own filter).
        assert_eq!(
            after(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(after(&a, "-run-with"), ["chroot=/proc/self/fd/18"]);
        assert!(!a.iter().any(|x| x == "-daemonize" || x == "-pidfile"));
        let mut want = vec![10, 11, 12, 13, 15, 16, 17, 14, 18];
        let mut got = fds(true, true).all();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn without_backing_or_jail() {
        let a = build(&spec(Accel::Tcg), &fds(false, false));
        assert_eq!(
            after(&a, "-blockdev")[3],
            "driver=qcow2,node-name=data,file=data-file"
        );
        assert_eq!(after(&a, "-add-fd").len(), 3);
        assert!(after(&a, "-run-with").is_empty());
        assert_eq!(after(&a, "-sandbox").len(), 1);
    }

    #[test]
    fn chain_memory_file_and_incoming_state() {
        let mut s = spec(Accel::Tcg);
        s.incoming = Some(crate::Incoming {
            state: "/s/state".into(),
            ignore_shared: true,
        });
        let mut f = fds(false, false);
        f.backing = vec![
            (20, DiskFormat::Qcow2, PathBuf::from("/snap/b/disk.qcow2")),
            (21, DiskFormat::Qcow2, PathBuf::from("/snap/a/disk.qcow2")),
            (22, DiskFormat::Raw, PathBuf::from("/t/base.ext4")),
        ];
        f.memory = Some((23, false));
        f.incoming = Some(24);
        let a = build(&s, &f);
        let nodes = after(&a, "-blockdev");
        // Defined bottom up, each over the next one down; the VM's own layer on top.
        assert_eq!(
            nodes[3..].iter().step_by(2).cloned().collect::<Vec<_>>(),
            [
                "driver=raw,node-name=base2,file=base2-file,read-only=on",
                "driver=qcow2,node-name=base1,file=base1-file,read-only=on,backing=base2",
                "driver=qcow2,node-name=base,file=base-file,read-only=on,backing=base1",
                "driver=qcow2,node-name=data,file=data-file,backing=base",
            ]
        );
        assert!(
            nodes.contains(&"driver=file,node-name=base2-file,filename=/dev/fdset/12,read-only=on")
        );
        assert_eq!(after(&a, "-machine"), ["pc,memory-backend=ram"]);
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-file,id=ram,size=512M,mem-path=/proc/self/fd/23,share=off,readonly=on,rom=off"]
        );
        assert_eq!(after(&a, "-incoming"), ["defer"]);
        assert!(after(&a, "-add-fd").contains(&"fd=24,set=5,opaque=/s/state"));
        for fd in [20, 21, 22, 23, 24] {
            assert!(f.all().contains(&fd));
        }
        f.memory = Some((23, true));
        let a = build(&spec(Accel::Tcg), &f);
        assert!(after(&a, "-object")[0].ends_with(",mem-path=/proc/self/fd/23,share=on"));
        assert!(after(&a, "-incoming").is_empty());
    }

    #[test]
    fn waits_stopped_for_a_migration() {
        let mut s = spec(Accel::Tcg);
        s.migration_in = true;
        let a = build(&s, &fds(false, false));
        assert_eq!(after(&a, "-incoming"), ["defer"]);
        assert!(a.iter().any(|x| x == "-S"), "{a:?}");
        let a = build(&spec(Accel::Tcg), &fds(false, false));
        assert!(!a.iter().any(|x| x == "-S" || x == "-incoming"), "{a:?}");
    }

    #[test]
    fn kvm_uses_host_cpu_without_arch_capabilities() {
        let a = build(&spec(Accel::Kvm), &fds(true, false));
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host,-arch-capabilities"]);
    }
}
