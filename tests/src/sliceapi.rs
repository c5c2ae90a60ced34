//! The stub apiserver's `EndpointSlice` API: list and watch of
//! `/apis/discovery.k8s.io/v1/namespaces/default/endpointslices`, served from a
//! [`SliceFile`] that the test rewrites at run time, as kube-apiserver serves
//! them, so that kube-rs's watcher runs against it unchanged:
//!
//! - a list carries the slice and its `resourceVersion`;
//! - a watch from version `V` sends the slice as `ADDED` if it is newer than `V`
//!   (or `V` is empty or `0`), then `MODIFIED` at each new version of the file,
//!   and a `BOOKMARK` every second when `allowWatchBookmarks` asks for them; it
//!   ends after `timeoutSeconds`;
//! - a watch from below the file's `compacted` version gets a `200` whose one
//!   event is an `ERROR` with status `410 Gone` (`Expired`), as kube-apiserver
//!   answers a resume from a compacted revision;
//! - a watch whose version the file's `compacted` passes ends, as the
//!   apiserver's watches do when their history is compacted away;
//! - while `<file>.fail` exists, every request gets `403 Forbidden`, and open
//!   watches end.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Channel, Full, combinators::BoxBody};
use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{CONTENT_TYPE, HeaderValue},
};

use crate::endpointslice::{SliceFile, fail_file};

/// The path kube-rs lists and watches.
pub const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

type Body = BoxBody<Bytes, Infallible>;

/// How often a watch looks at the file.
const POLL: Duration = Duration::from_millis(50);
/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// The query parameters that matter here.
struct Query {
    watch: bool,
    resource_version: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
}

fn query(q: Option<&str>) -> Query {
    let mut out = Query {
        watch: false,
        resource_version: None,
        bookmarks: false,
        timeout: Duration::from_mins(5),
    };
    for pair in q.unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "watch" => out.watch = matches!(v, "1" | "true"),
            "resourceVersion" => out.resource_version = v.parse().ok(),
            "allowWatchBookmarks" => out.bookmarks = v == "true",
            "timeoutSeconds" => {
                if let Ok(s) = v.parse() {
                    out.timeout = Duration::from_secs(s);
                }
            }
            _ => {}
        }
    }
    out
}

fn read(file: &Path) -> Option<SliceFile> {
    SliceFile::parse(&std::fs::read_to_string(file).ok()?)
}

/// Answer a GET of [`PATH`] with `query`, from the slice file `file`.
pub fn serve(file: &Path, q: Option<&str>) -> Response<Body> {
    if fail_file(file).exists() {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "endpointslices.discovery.k8s.io is forbidden: User \"apilb-test\" cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\" in the namespace \"default\"",
        );
    }
    let q = query(q);
    let Some(slice) = read(file) else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "no slice file",
        );
    };
    if !q.watch {
        let list = serde_json::json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": slice.resource_version.to_string()},
            "items": [slice.to_object()],
        });
        return json(StatusCode::OK, list.to_string());
    }
    let from = q.resource_version.unwrap_or(0);
    if from != 0 && from < slice.compacted {
        let gone = serde_json::json!({
            "type": "ERROR",
            "object": status_object(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", slice.compacted),
            ),
        });
        return json(StatusCode::OK, format!("{gone}\n"));
    }
    watch(file.to_owned(), from, q.bookmarks, q.timeout)
}

/// The watch stream: changes past `from`, bookmarks, until the timeout, the
/// fail file, or the client going away.
fn watch(file: PathBuf, from: u64, bookmarks: bool, timeout: Duration) -> Response<Body> {
    let (mut tx, body) = Channel::<Bytes>::new(4);
    tokio::spawn(async move {
        let end = Instant::now() + timeout;
        let mut sent = from;
        let mut first = true;
        let mut bookmark_at = Instant::now() + BOOKMARK_EVERY;
        while Instant::now() < end && !fail_file(&file).exists() {
            let Some(slice) = read(&file) else {
                tokio::time::sleep(POLL).await;
                continue;
            };
            if sent != 0 && slice.compacted > sent {
                // The history this watch stands on is compacted away: the
                // apiserver ends it, and its resume gets 410 Gone.
                return;
            }
            let mut event = None;
            if slice.resource_version > sent {
                let kind = if first && from == 0 {
                    "ADDED"
                } else {
                    "MODIFIED"
                };
                event = Some(serde_json::json!({"type": kind, "object": slice.to_object()}));
                sent = slice.resource_version;
            } else if bookmarks && Instant::now() >= bookmark_at {
                event = Some(serde_json::json!({
                    "type": "BOOKMARK",
                    "object": {
                        "kind": "EndpointSlice",
                        "apiVersion": "discovery.k8s.io/v1",
                        "metadata": {"resourceVersion": sent.max(slice.resource_version).to_string()},
                    },
                }));
                bookmark_at = Instant::now() + BOOKMARK_EVERY;
            }
            first = false;
            if let Some(e) = event
                && tx.send_data(Bytes::from(format!("{e}\n"))).await.is_err()
            {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    });
    let mut resp = Response::new(body.boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn status_object(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json(
        code,
        status_object(code.as_u16(), reason, message).to_string(),
    )
}

fn json(code: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
