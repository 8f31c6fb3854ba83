//! Tenants: which VM or image a caller means by a name, per-account quotas, and host admission
//! control. Front doors resolve names here once and then act on the resolved record's key.
//!
//! Namespaces: an account's VMs are keyed `account/name` and its private images `~account/REF`
//! (see `hutch_core::vm_key`, `hutch_core::image_key`); the admin's VMs have bare names and the
//! admin's images are the shared library every account may use. A name an account gives is
//! always looked up inside its own namespace (images: then the shared library), so it can neither
//! reach another account's VM or image nor learn that one exists.

use super::Service;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::records::ACCOUNTS;
use hutch_core::{Account, Image, Quota, Vm};
use std::collections::HashMap;

/// Host admission limits (the admin's configuration).
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// Guest memory of starting and running VMs may add up to this many times the host's RAM.
    pub mem_overcommit: f64,
    /// A VM's writable disk is sparse: a create needs `disk_gib / disk_overcommit` free...
    pub disk_overcommit: f64,
    /// ...plus this much, always left free for the host.
    pub disk_reserve_mib: u64,
    /// Quota of accounts the admin gave none.
    pub default_quota: Quota,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            mem_overcommit: 1.0,
            disk_overcommit: 4.0,
            disk_reserve_mib: 1024,
            default_quota: Quota::default(),
        }
    }
}

/// What a VM about to be created or started asks for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disk_gib: u64,
    /// A new VM (counts against the VM count and disk), or a start of an existing one.
    pub new: bool,
}

impl Ask {
    /// What `vm` asks for: as a new VM, or as a start of an existing one.
    pub fn of(vm: &Vm, new: bool) -> Ask {
        Ask {
            vcpus: vm.vcpus,
            mem_mib: vm.mem_mib,
            disk_gib: vm.disk_gib,
            new,
        }
    }
}

impl Service {
    /// The VM `name` means for `caller` (see the module doc); another account's VM answers
    /// exactly as a missing one does.
    pub async fn vm_for(&self, caller: &Caller, name: &str) -> Result<Vm, ApiError> {
        let missing = || ApiError::vm(name);
        let key = caller.vm_key(name).ok_or_else(missing)?;
        match self.records.vm(&key).await? {
            Some(vm) if caller.sees(vm.owner.as_deref()) => Ok(vm),
            Some(_) => Err(missing()),
            // The admin's VMs made over SSH before namespaces carried the admin's account.
            None if caller.admin && !name.contains('/') => self
                .records
                .vm(&hutch_core::vm_key(Some(&caller.account), name))
                .await?
                .ok_or_else(missing),
            None => Err(missing()),
        }
    }

    /// The VMs `caller` may see, oldest first.
    /// Warm pool VMs waiting for a claim are not listed (`hutch pool ls` counts them).
    /// In a cluster, the VMs of a down node are shown `lost`.
    pub async fn vms_of(&self, caller: &Caller) -> Result<Vec<Vm>, ApiError> {
        let mut vms: Vec<Vm> = self
            .list()
            .await?
            .into_iter()
            .filter(|v| caller.sees(v.owner.as_deref()) && v.pool.is_none())
            .collect();
        self.mark_lost(&mut vms).await;
        Ok(vms)
    }

    async fn lookup_image(
        &self,
        owner: Option<&str>,
        reference: &str,
    ) -> Result<Option<Image>, ApiError> {
        let n =
            hutch_image::normalize_ref(reference).map_err(|e| ApiError::Invalid(e.to_string()))?;
        if let Some(i) = self
            .records
            .image(&hutch_core::image_key(owner, &n))
            .await?
        {
            return Ok(Some(i));
        }
        if let Ok(r) = hutch_image::registry::Reference::parse(reference) {
            let k = hutch_core::image_key(owner, &r.canonical());
            if let Some(i) = self.records.image(&k).await? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// The image `reference` means for `caller`: its own private image of that name, else the
    /// shared library's. `~account/REF` names a private image explicitly (any for the admin,
    /// only its own for an account).
    pub async fn image_for(&self, caller: &Caller, reference: &str) -> Result<Image, ApiError> {
        let missing = |n: &str| ApiError::NotFound {
            kind: "image",
            name: n.to_string(),
        };
        if let Some(rest) = reference.strip_prefix('~') {
            let (acct, r) = rest
                .split_once('/')
                .ok_or_else(|| ApiError::Invalid(format!("{reference:?}: use ~ACCOUNT/IMAGE")))?;
            if !caller.admin && acct != caller.account {
                return Err(missing(reference));
            }
            return self
                .lookup_image(Some(acct), r)
                .await?
                .ok_or_else(|| missing(reference));
        }
        if let Some(owner) = caller.owner() {
            if let Some(i) = self.lookup_image(Some(&owner), reference).await? {
                return Ok(i);
            }
        }
        self.lookup_image(None, reference)
            .await?
            .ok_or_else(|| missing(reference))
    }

    /// The images `caller` may use: its own and the shared library.
    pub async fn images_of(&self, caller: &Caller) -> Result<Vec<Image>, ApiError> {
        let mut v: Vec<Image> = self
            .records
            .images()
            .await?
            .into_iter()
            .filter(|i| i.owner.is_none() || caller.sees(i.owner.as_deref()))
            .collect();
        v.sort_by_key(Image::key);
        Ok(v)
    }

    /// Records a pulled, imported or committed image in `owner`'s namespace (None: the shared
    /// library). Never touches another namespace.
    pub async fn store_image(
        &self,
        owner: Option<String>,
        mut img: Image,
    ) -> Result<Image, ApiError> {
        img.owner = owner;
        self.records.put_image(&img).await?;
        Ok(img)
    }

    /// Deletes an image unless a VM the caller sees was made from it (VMs carry their image's
    /// digest, layers and config, so a re-pull that moves the tag never breaks them; a delete is
    /// refused all the same, as people expect). Accounts may delete only their own private
    /// images.
    pub async fn delete_image(&self, caller: &Caller, reference: &str) -> Result<(), ApiError> {
        let img = self.image_for(caller, reference).await?;
        if !caller.admin && img.owner.as_deref() != Some(caller.account.as_str()) {
            return Err(ApiError::Forbidden(format!(
                "{} is in the shared library; only the admin may delete it",
                img.name
            )));
        }
        let users: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .filter(|v| v.image_digest == img.digest && caller.sees(v.owner.as_deref()))
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError::Conflict(format!(
                "image {} is used by: {}",
                img.name,
                users.join(", ")
            )));
        }
        self.records.delete_image(&img.key()).await?;
        // The root filesystem goes only when no image and no VM (of any account) uses it.
        let still_used = self
            .records
            .images()
            .await?
            .iter()
            .any(|i| i.digest == img.digest)
            || self
                .list()
                .await?
                .iter()
                .any(|v| v.image_digest == img.digest);
        if !still_used {
            self.images.remove_rootfs(&img.digest)?;
        }
        Ok(())
    }

    /// The image a VM was made from: as the VM records it, else (records from before VMs kept
    /// their image) the image of its name with the same digest, else any with that digest.
    pub(crate) async fn image_of(&self, vm: &Vm) -> Result<Option<Image>, ApiError> {
        if let Some(i) = vm.recorded_image() {
            return Ok(Some(i));
        }
        if let Some(i) = self.records.image(&vm.image).await? {
            if i.digest == vm.image_digest {
                return Ok(Some(i));
            }
        }
        let all = self.records.images().await?;
        Ok(all.into_iter().find(|i| i.digest == vm.image_digest))
    }

    /// The quota of `account`: the admin's setting for it, else the default.
    pub async fn quota_of(&self, account: &str) -> Result<Quota, ApiError> {
        Ok(self
            .records
            .get::<Account>(ACCOUNTS, account)
            .await?
            .and_then(|a| a.quota)
            .unwrap_or(self.admission.default_quota))
    }

    /// Admits a create (`ask.new`) or start of `vm`: refuses it when it would take its owner
    /// past its quota or the host past its memory or disk, else reserves what it asks for until
    /// the returned [`Reservation`] is dropped, which the caller does once the VM's record counts
    /// (created, or `starting`). The check and the reservation happen under a short lock with no
    /// I/O in it, so concurrent requests cannot both pass on the same headroom, and their store
    /// transactions still commit together.
    pub async fn admit(&self, vm: &Vm, new: bool) -> Result<Reservation, ApiError> {
        let ask = Ask::of(vm, new);
        let quota = match vm.owner.as_deref() {
            Some(acct) => Some(self.quota_of(acct).await?),
            None => None,
        };
        let free = if new {
            disk_mib(&self.cfg().data_dir).1
        } else {
            u64::MAX
        };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // What the records count, plus what is admitted but not in them yet.
        let (mut mine, mut active) = self.records.fold_vms(|it| {
            let (mut mine, mut active) = ([0u64; 4], 0u64);
            for v in it {
                if v.owner.is_some() && v.owner == vm.owner {
                    mine[0] += 1;
                    mine[1] += u64::from(v.vcpus);
                    mine[2] += v.mem_mib;
                    mine[3] += v.disk_gib;
                }
                // The host's memory: this node's VMs only.
                if v.state.uses_memory() && self.records.is_local(v) {
                    active += v.mem_mib;
                }
            }
            (mine, active)
        });
        for (_, (owner, a)) in pending.iter() {
            if a.new && owner.is_some() && *owner == vm.owner {
                mine[0] += 1;
                mine[1] += u64::from(a.vcpus);
                mine[2] += a.mem_mib;
                mine[3] += a.disk_gib;
            }
            active += a.mem_mib;
        }
        if let (Some(acct), Some(q)) = (vm.owner.as_deref(), quota) {
            let add = u64::from(ask.new);
            let used = [
                mine[0] + add,
                mine[1] + u64::from(ask.vcpus) * add,
                mine[2] + ask.mem_mib * add,
                mine[3] + ask.disk_gib * add,
            ];
            let over = [
                ("VMs", used[0], u64::from(q.vms)),
                ("vCPUs", used[1], u64::from(q.vcpus)),
                ("MiB of memory", used[2], q.mem_mib),
                ("GiB of disk", used[3], q.disk_gib),
            ]
            .into_iter()
            .find(|(_, u, max)| u > max);
            if let Some((what, u, max)) = over {
                return Err(ApiError::Quota(format!(
                    "account {acct} would have {u} {what}; its quota is {max}"
                )));
            }
        }
        let limit = (self.node.host_mem_mib() as f64 * self.admission.mem_overcommit) as u64;
        if active + ask.mem_mib > limit {
            return Err(ApiError::Capacity(format!(
                "the host cannot take {} MiB more guest memory ({active} MiB of {limit} MiB in use)",
                ask.mem_mib
            )));
        }
        if new {
            let reserved: u64 = pending
                .values()
                .filter(|(_, a)| a.new)
                .map(|(_, a)| a.disk_gib)
                .sum();
            let need = ((ask.disk_gib + reserved) as f64 * 1024.0 / self.admission.disk_overcommit)
                as u64
                + self.admission.disk_reserve_mib;
            if free < need {
                return Err(ApiError::Capacity(format!(
                    "the host has {free} MiB of disk free; a {} GiB VM needs {need} MiB",
                    ask.disk_gib
                )));
            }
        }
        pending.insert(vm.id.clone(), (vm.owner.clone(), ask));
        Ok(Reservation {
            pending: self.pending.clone(),
            id: vm.id.clone(),
        })
    }
}

/// Admitted resources not yet in the records, by VM id.
pub type Pending = std::sync::Arc<std::sync::Mutex<HashMap<String, (Option<String>, Ask)>>>;

/// What an admitted create or start holds until its record counts (see [`Service::admit`]).
pub struct Reservation {
    pending: Pending,
    id: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// (total, free for unprivileged use) MiB of the filesystem holding `dir`; (0, 0) if it cannot
/// be read.
pub fn disk_mib(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes only into the zeroed struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let f = st.f_frsize as u64;
    (
        (st.f_blocks as u64).saturating_mul(f) >> 20,
        (st.f_bavail as u64).saturating_mul(f) >> 20,
    )
}
