//! The REST router with a fake VMM below the service (no QEMU): the OpenAPI document and the
//! router agree on every path and method, and every sandbox and image route answers per owner
//! (the owner and the admin reach the object; another account gets exactly what a missing
//! object gets).

use crate::api;
use crate::auth::{Caller, Tokens};
use crate::node::{Node, NodeConfig, SocketConnector};
use crate::service::Service;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use hutch_core::{Image, ImageConfig, Vm, VmState};
use hutch_vmm::{Accel, VmHandle, VmProcess, VmSpec, Vmm, VmmError};
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;

/// A VMM that has no VMs: launches fail, nothing is alive.
struct NoVms;

impl Vmm for NoVms {
    fn name(&self) -> &'static str {
        "none"
    }
    fn launch(&self, _spec: &VmSpec) -> Result<VmProcess, VmmError> {
        Err(VmmError::Launch("the test VMM launches nothing".into()))
    }
    fn is_alive(&self, _vm: &VmHandle) -> bool {
        false
    }
    fn kill(&self, _vm: &VmHandle) -> Result<(), VmmError> {
        Ok(())
    }
    fn create_disk(
        &self,
        _disk: &std::path::Path,
        _base: &hutch_vmm::Layer,
        _from: Option<&std::path::Path>,
    ) -> Result<(), VmmError> {
        Err(VmmError::Launch("the test VMM makes no disks".into()))
    }
}

async fn manager(dir: &std::path::Path) -> Arc<Service> {
    let node = NodeConfig {
        data_dir: dir.to_path_buf(),
        bundle: hutch_guest::BootBundle {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd"),
            release: "test".into(),
        },
        accel: Accel::Tcg,
        boot_timeout: std::time::Duration::from_secs(1),
        default_disk_gib: 1,
        console_max_bytes: 1 << 20,
        jail_uids: None,
        registry_allow_private: false,
        max_upload_bytes: 1 << 30,
        qemu_version: "10.0.0".into(),
    };
    let records = crate::records::Records::open(Arc::new(hutch_store::kv::MemoryStore::new()))
        .await
        .unwrap();
    let images = hutch_image::ImageStore::open(&dir.join("images")).unwrap();
    let tokens = Tokens::load_or_create(dir).unwrap();
    let node = Node::new(
        node,
        records,
        Arc::new(images),
        Arc::new(NoVms),
        Arc::new(SocketConnector),
        Arc::default(),
    );
    Arc::new(Service::new(Arc::new(node), tokens, Default::default()))
}

fn caller(account: &str, admin: bool) -> Caller {
    Caller {
        account: account.into(),
        admin,
    }
}

fn vm(name: &str, owner: Option<&str>) -> Vm {
    Vm {
        id: format!("{name:0>12}"),
        name: name.into(),
        image: "busybox:latest".into(),
        image_digest: format!("sha256:{}", "a".repeat(64)),
        vcpus: 1,
        mem_mib: 64,
        disk_gib: 1,
        state: VmState::Stopped,
        reason: None,
        pid: None,
        accel: None,
        created_at: 0,
        started_at: None,
        boot_ms: None,
        kernel: None,
        disk_us: None,
        run: false,
        main_pid: None,
        owner: owner.map(str::to_string),
        image_config_digest: None,
        image_layers: vec![],
        image_config: None,
        confinement: None,
        restart: Default::default(),
        restarts: 0,
        clean_exit: false,
        net: Default::default(),
        net_us: None,
        timers: Default::default(),
        pool: None,
        node: None,
        recreated: None,
        migrated: None,
        lost: false,
        mem: Default::default(),
    }
}

fn image(name: &str, owner: Option<&str>) -> Image {
    Image {
        name: name.into(),
        digest: format!("sha256:{}", "b".repeat(64)),
        config_digest: format!("sha256:{}", "c".repeat(64)),
        layers: vec![],
        config: ImageConfig::default(),
        architecture: "amd64".into(),
        rootfs_size: 0,
        created_at: 0,
        owner: owner.map(str::to_string),
    }
}

/// Puts the fixtures back (a DELETE in an earlier call may have removed them).
async fn fixtures(m: &Service) {
    for v in [vm("web", Some("alice")), vm("adm", None)] {
        m.records.put_vm(&v).await.unwrap();
    }
    let i = image("priv:latest", Some("alice"));
    m.records.put_image(&i).await.unwrap();
}

async fn call(m: &Arc<Service>, who: &Caller, method: &str, path: &str) -> (StatusCode, Value) {
    let who = who.clone();
    let app = api::router(m.clone(), false).layer(axum::middleware::from_fn(
        move |mut req: axum::extract::Request, next: axum::middleware::Next| {
            req.extensions_mut().insert(who.clone());
            next.run(req)
        },
    ));
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let st = resp.status();
    // The event stream never ends by itself.
    if resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/x-ndjson")
    {
        return (st, Value::Null);
    }
    let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    (st, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// The router's answer for a path it has no route for.
fn unrouted(st: StatusCode, v: &Value) -> bool {
    st == StatusCode::NOT_FOUND
        && v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("route "))
}

fn missing_sandbox(st: StatusCode, v: &Value) -> bool {
    st == StatusCode::NOT_FOUND
        && v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("sandbox "))
}

fn documented() -> Vec<(String, Vec<String>)> {
    let doc: Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, ops)| {
            (
                p.clone(),
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(|k| k.to_uppercase())
                    .collect(),
            )
        })
        .collect()
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

#[tokio::test(flavor = "multi_thread")]
async fn openapi_and_router_agree() {
    let d = tempfile::tempdir().unwrap();
    let m = manager(d.path()).await;
    let admin = Caller::local_admin();
    let paths = documented();
    assert!(paths.len() >= 15, "{paths:?}");
    for (path, methods) in &paths {
        let p = path.replace("{name}", "nope");
        for method in METHODS {
            fixtures(&m).await;
            let (st, v) = call(&m, &admin, method, &p).await;
            if methods.iter().any(|x| x == method) {
                assert!(
                    !unrouted(st, &v),
                    "{method} {path} is documented but not routed"
                );
                assert_ne!(st, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            } else if path != "/api/v1/images/{name}" {
                // (Under /images/ every other name is an image name: GET /images/pull is the
                // image called "pull".)
                assert!(
                    st == StatusCode::METHOD_NOT_ALLOWED || unrouted(st, &v),
                    "{method} {path} is routed ({st}) but not documented"
                );
            }
        }
    }
    // The document itself is the one route it does not describe.
    let (st, _) = call(&m, &admin, "GET", "/api/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_per_owner() {
    let d = tempfile::tempdir().unwrap();
    let m = manager(d.path()).await;
    let (alice, bob, admin) = (
        caller("alice", false),
        caller("bob", false),
        Caller::local_admin(),
    );
    let mut sandbox_ops = 0;
    for (path, methods) in documented() {
        if !path.contains("/sandboxes/{name}") {
            continue;
        }
        // DELETE last, so the others see the VM.
        let mut methods = methods.clone();
        methods.sort_by_key(|m| m == "DELETE");
        for method in &methods {
            sandbox_ops += 1;
            for (who, name, reaches) in [
                (&alice, "web", true),
                (&alice, "alice%2Fweb", true),
                (&admin, "alice%2Fweb", true),
                (&admin, "adm", true),
                (&bob, "web", false),
                (&bob, "alice%2Fweb", false),
                (&alice, "adm", false),
                // A handler that looked names up without the caller would find the admin's.
                (&bob, "adm", false),
                (&bob, "..%2Fweb", false),
            ] {
                fixtures(&m).await;
                let p = path.replace("{name}", name);
                let (st, v) = call(&m, who, method, &p).await;
                assert!(!unrouted(st, &v), "{method} {p}");
                if reaches {
                    assert!(
                        !missing_sandbox(st, &v),
                        "{} {method} {p}: {st} {v}",
                        who.account
                    );
                } else {
                    assert!(
                        missing_sandbox(st, &v),
                        "{} {method} {p}: {st} {v}",
                        who.account
                    );
                }
            }
        }
    }
    assert!(sandbox_ops >= 11, "{sandbox_ops}");

    // Images: alice's private image is hers and the admin's to see; bob cannot tell it exists.
    let priv_path = "/api/v1/images/~alice%2Fpriv";
    for (who, st_get) in [(&alice, 200), (&admin, 200), (&bob, 404)] {
        fixtures(&m).await;
        let (st, v) = call(&m, who, "GET", priv_path).await;
        assert_eq!(st.as_u16(), st_get, "{} GET {priv_path}: {v}", who.account);
    }
    fixtures(&m).await;
    let (st, _) = call(&m, &bob, "DELETE", priv_path).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = call(&m, &bob, "GET", "/api/v1/images").await;
    assert_eq!(st, StatusCode::OK);
    assert!(!v.to_string().contains("priv"), "{v}");
    let (st, v) = call(&m, &alice, "GET", "/api/v1/images").await;
    assert!(st.is_success() && v.to_string().contains("priv"), "{v}");
    // Admin-only routes.
    for (method, path) in [
        ("POST", "/api/v1/images/gc"),
        ("GET", "/metrics"),
        ("POST", "/api/v1/admin/recover"),
    ] {
        let (st, _) = call(&m, &bob, method, path).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{method} {path}");
    }
    // An account's status has its own VMs and quota, not the host's figures.
    let (st, v) = call(&m, &bob, "GET", "/api/v1/status").await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["host"].is_null() && v["quota"]["account"] == "bob", "{v}");
    assert!(v["vms"].as_object().unwrap().is_empty(), "{v}");
    let (st, _) = call(&m, &alice, "DELETE", priv_path).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "alice deletes her own image");
    // Sandbox listings.
    fixtures(&m).await;
    let (_, v) = call(&m, &bob, "GET", "/api/v1/sandboxes").await;
    assert_eq!(v, serde_json::json!([]));
    let (_, v) = call(&m, &alice, "GET", "/api/v1/sandboxes").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, v) = call(&m, &admin, "GET", "/api/v1/sandboxes").await;
    assert_eq!(v.as_array().unwrap().len(), 2);
}
