//! envd's directory watches (WatchDir, CreateWatcher, GetWatcherEvents, RemoveWatcher).

use super::connect::{Code, RpcError};
use super::envd::Ctx;
use axum::http::HeaderMap;
use axum::response::Response;

/// The polled watchers of every sandbox.
#[derive(Default)]
pub struct Watchers {}

pub async fn watch_dir(_c: Ctx, _h: &HeaderMap, _msg: &[u8]) -> Result<Response, RpcError> {
    Err(RpcError::new(Code::Unimplemented, "WatchDir: in progress"))
}

pub async fn watcher_call(
    _c: Ctx,
    _h: &HeaderMap,
    _method: &str,
    _body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    Err(RpcError::new(Code::Unimplemented, "watchers: in progress"))
}
