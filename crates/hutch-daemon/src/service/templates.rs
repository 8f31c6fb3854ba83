//! Templates for a caller (docs/templates.md): a template boots its image once, runs its start
//! command, waits for its ready command to succeed and snapshots the VM; `hutch new --template`
//! then starts VMs from that snapshot (from a warm pool VM when one is ready, see pools.rs).
//! Builds run in the background; the record says where a build is (`building`, `ready`,
//! `failed` with the reason).

use super::Service;
use crate::agent::ExecEvent;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::records::{SNAPSHOTS, TEMPLATES};
use hutch_core::api::CreateVm;
use hutch_core::snapshot::Snapshot;
use hutch_core::template::{CreateTemplate, Template, TemplateStatus, MAX_CMD};
use hutch_core::{image_env, names, Vm};
use hutch_proto::ExecRequest;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a template's ready command may take to first succeed.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Each run of the ready command.
const READY_RUN: Duration = Duration::from_secs(30);

impl Service {
    /// `caller`'s template `name`.
    pub async fn template_for(&self, caller: &Caller, name: &str) -> Result<Template, ApiError> {
        let missing = || ApiError::NotFound {
            kind: "template",
            name: name.into(),
        };
        let key = caller.vm_key(name).ok_or_else(missing)?;
        match self.records.get::<Template>(TEMPLATES, &key).await? {
            Some(t) if caller.sees(t.owner.as_deref()) => Ok(t),
            _ => Err(missing()),
        }
    }

    /// The templates `caller` may see, by name.
    pub async fn templates_of(&self, caller: &Caller) -> Result<Vec<Template>, ApiError> {
        let mut v: Vec<Template> = self
            .records
            .list::<Template>(TEMPLATES)
            .await?
            .into_iter()
            .filter(|t| caller.sees(t.owner.as_deref()))
            .collect();
        v.sort_by_key(|t| t.key());
        Ok(v)
    }

    /// Records template `req.name` and starts its build in the background; the record is
    /// returned `building`.
    pub async fn create_template(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateTemplate,
    ) -> Result<Template, ApiError> {
        names::validate_name(&req.name).map_err(ApiError::Invalid)?;
        for (what, c) in [("start_cmd", &req.start_cmd), ("ready_cmd", &req.ready_cmd)] {
            if let Some(c) = c {
                if c.trim().is_empty() || c.len() > MAX_CMD || c.contains('\0') {
                    return Err(ApiError::Invalid(format!(
                        "{what} must be 1 to {MAX_CMD} bytes of shell, without NUL"
                    )));
                }
            }
        }
        // The VM it boots is checked as a create would check it.
        self.validate_create(&self.builder_request(&req, "check"))?;
        self.image_for(caller, &req.image).await?;
        let t = Template {
            name: req.name.clone(),
            owner: caller.owner(),
            image: req.image,
            vcpus: req.vcpus,
            mem_mib: req.mem_mib,
            disk_gib: req.disk_gib,
            start_cmd: req.start_cmd,
            ready_cmd: req.ready_cmd,
            status: TemplateStatus::Building,
            error: None,
            snapshot: None,
            created_at: hutch_core::now(),
            built_at: None,
            build_ms: None,
            builds: 1,
        };
        if !self.records.create(TEMPLATES, &t.key(), &t).await? {
            return Err(ApiError::Conflict(format!(
                "template {:?} already exists",
                t.name
            )));
        }
        self.spawn_build(caller.clone(), t.clone());
        Ok(t)
    }

    /// Builds `caller`'s template `name` again (its image changed, say); VMs made from the old
    /// build run on, and its warm pool is refilled from the new one.
    pub async fn rebuild_template(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<Template, ApiError> {
        let t = self.template_for(caller, name).await?;
        let t = self
            .records
            .update::<Template, ApiError, _>(TEMPLATES, &t.key(), |t| {
                if t.status == TemplateStatus::Building {
                    return Err(ApiError::Conflict(format!(
                        "template {} is already building",
                        t.name
                    )));
                }
                t.status = TemplateStatus::Building;
                t.error = None;
                t.builds += 1;
                Ok(())
            })
            .await?;
        self.spawn_build(caller.clone(), t.clone());
        Ok(t)
    }

    /// Removes `caller`'s template `name`, its warm pool and the pool's idle VMs; VMs made
    /// from it run on.
    pub async fn delete_template(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> Result<(), ApiError> {
        let t = self.template_for(caller, name).await?;
        self.remove_pool(&t.key()).await?;
        self.records.delete(TEMPLATES, &t.key()).await?;
        if let Some(s) = &t.snapshot {
            self.records.delete(SNAPSHOTS, s).await?;
        }
        self.collect_snapshots().await
    }

    fn builder_request(&self, t: &CreateTemplate, name: &str) -> CreateVm {
        CreateVm {
            name: Some(name.to_string()),
            image: t.image.clone(),
            vcpus: t.vcpus,
            mem_mib: t.mem_mib,
            disk_gib: t.disk_gib,
            ..Default::default()
        }
    }

    fn spawn_build(self: &Arc<Self>, caller: Caller, t: Template) {
        let me = self.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let key = t.key();
            let outcome = me.build_template(&caller, &t).await;
            let old = t.snapshot.clone();
            let r = me
                .records
                .update::<Template, ApiError, _>(TEMPLATES, &key, |cur| {
                    match &outcome {
                        Ok(snap) => {
                            cur.status = TemplateStatus::Ready;
                            cur.error = None;
                            cur.snapshot = Some(snap.key());
                            cur.built_at = Some(hutch_core::now());
                            cur.build_ms = Some(t0.elapsed().as_millis() as u64);
                        }
                        Err(e) => {
                            cur.status = TemplateStatus::Failed;
                            cur.error = Some(hutch_core::clean_text(&e.to_string()));
                        }
                    }
                    Ok(())
                })
                .await;
            match (&outcome, r) {
                (Ok(snap), Ok(_)) => {
                    tracing::info!(template = %key, ms = t0.elapsed().as_millis() as u64, "template built");
                    // The old build goes; the pool's idle VMs of it make way for new ones.
                    if let Some(old) = old.filter(|o| *o != snap.key()) {
                        let _ = me.records.delete(SNAPSHOTS, &old).await;
                        let _ = me.drain_pool(&key).await;
                        let _ = me.collect_snapshots().await;
                    }
                    me.pools_changed();
                }
                (Ok(snap), Err(e)) => {
                    // The template went away meanwhile: so does its snapshot.
                    tracing::info!(template = %key, error = %e, "template removed during its build");
                    let _ = me.records.delete(SNAPSHOTS, &snap.key()).await;
                    let _ = me.collect_snapshots().await;
                }
                (Err(e), _) => {
                    tracing::warn!(template = %key, error = %e, "template build failed")
                }
            }
        });
    }

    /// Boots the template's VM, runs its start command, waits for its ready command, and
    /// snapshots it; the VM is removed whatever happens.
    async fn build_template(
        self: &Arc<Self>,
        caller: &Caller,
        t: &Template,
    ) -> Result<Snapshot, ApiError> {
        let req = CreateTemplate {
            name: t.name.clone(),
            image: t.image.clone(),
            vcpus: t.vcpus,
            mem_mib: t.mem_mib,
            disk_gib: t.disk_gib,
            start_cmd: None,
            ready_cmd: None,
        };
        let builder = format!("build-{}", &names::random_id()[..8]);
        let vm = self
            .create(caller, self.builder_request(&req, &builder))
            .await?;
        let r = self.prepare_and_snapshot(&vm, t).await;
        let shown = hutch_core::render::display_name(&vm, caller.owner().as_deref());
        if let Err(e) = self.delete(caller, &shown).await {
            tracing::warn!(vm = %vm.name, error = %e, "removing a template's build VM");
        }
        r
    }

    async fn prepare_and_snapshot(
        self: &Arc<Self>,
        vm: &Vm,
        t: &Template,
    ) -> Result<Snapshot, ApiError> {
        if let Some(cmd) = &t.start_cmd {
            self.run_in(vm, cmd, true, None).await?;
        }
        if let Some(cmd) = &t.ready_cmd {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let (code, out) = self.run_in(vm, cmd, false, Some(READY_RUN)).await?;
                if code == Some(0) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ApiError::Invalid(format!(
                        "the ready command did not succeed within {} s (last exit {}): {}",
                        READY_TIMEOUT.as_secs(),
                        code.map(|c| c.to_string())
                            .unwrap_or_else(|| "by signal".into()),
                        out.trim()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let vm = self.by_id(&vm.id, &vm.name).await?;
        let name = format!("template-{}-{}", t.name, &names::random_id()[..8]);
        self.snapshot_vm(&vm, &name, true).await
    }

    /// Runs `sh -c cmd` in `vm` with the image's environment: detached (returns once it
    /// started), or to its end (its exit code and the end of its output).
    pub(crate) async fn run_in(
        &self,
        vm: &Vm,
        cmd: &str,
        detach: bool,
        limit: Option<Duration>,
    ) -> Result<(Option<i32>, String), ApiError> {
        let vm = self.by_id(&vm.id, &vm.name).await?;
        let client = self.node.client(&vm)?;
        let icfg = vm.image_config.clone().unwrap_or_default();
        let mut s = client.exec(ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            env: image_env(&icfg, &vm.name),
            cwd: Some(icfg.working_dir.clone()).filter(|w| !w.is_empty()),
            user: Some(icfg.user.clone()).filter(|u| !u.is_empty()),
            stdin: false,
            timeout_ms: limit.map(|d| d.as_millis() as u64),
            detach,
            tty: None,
        })?;
        let mut out = Vec::new();
        loop {
            match s.next().await? {
                Some(ExecEvent::Started { .. }) if detach => return Ok((None, String::new())),
                Some(ExecEvent::Stdout(b) | ExecEvent::Stderr(b)) => {
                    out.extend_from_slice(&b);
                    if out.len() > 4096 {
                        out.drain(..out.len() - 4096);
                    }
                }
                Some(ExecEvent::Exited { code, .. }) => {
                    let text = String::from_utf8_lossy(&out).to_string();
                    if detach {
                        return Err(ApiError::Invalid(format!(
                            "the start command could not start (exit {}): {}",
                            code.unwrap_or(-1),
                            text.trim()
                        )));
                    }
                    return Ok((code, text));
                }
                Some(ExecEvent::Started { .. }) => {}
                None => return Err(ApiError::Internal("the command's stream ended".into())),
            }
        }
    }

    /// Makes a VM of `caller`'s from template `name`: a warm pool VM when one is ready (claimed
    /// and given `req`'s name), else a restore of the template's snapshot.
    pub(crate) async fn create_from_template(
        self: &Arc<Self>,
        caller: &Caller,
        req: &CreateVm,
        name: &str,
    ) -> Result<Vm, ApiError> {
        let t = self.template_for(caller, name).await?;
        let snap_key = match (t.status, &t.snapshot) {
            (_, Some(s)) => s.clone(),
            (TemplateStatus::Building, None) => {
                return Err(ApiError::Conflict(format!(
                    "template {name} is still building"
                )))
            }
            (_, None) => {
                return Err(ApiError::Conflict(format!(
                    "template {name} failed to build: {}",
                    t.error.as_deref().unwrap_or("no reason recorded")
                )))
            }
        };
        let timers = super::timers::timers_of(req)?;
        if let Some(n) = &req.name {
            names::validate_name(n).map_err(ApiError::Invalid)?;
        }
        let snap = self
            .records
            .get::<Snapshot>(SNAPSHOTS, &snap_key)
            .await?
            .ok_or_else(|| ApiError::Conflict(format!("template {name} has no build")))?;
        if let Some(vm) = self.claim(&t, &snap, req.name.as_deref(), &timers).await? {
            return Ok(vm);
        }
        self.restore_copy(caller, &snap, req.name.clone(), timers, None)
            .await
    }
}
