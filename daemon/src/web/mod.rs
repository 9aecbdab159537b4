//! The daemon's one HTTP server (`telemetry.http_listen`): `/metrics` for Prometheus, the live
//! plate page at `/` with its JSON state and event stream under `/api/`, field thumbnails, and
//! the OME-Zarr plate itself, read-only with CORS and byte ranges, under `/zarr/{plate}.zarr/`
//! for web viewers (vizarr, Viv, neuroglancer) while it is written. `liveomics serve` runs the
//! same server over a finished plate.
//!
//! Bounded like everything the network reaches: at most `MAX_CONNECTIONS` connections (more are
//! closed at once), a request head within two seconds, one request per connection, no request
//! body read, ten seconds per answer except the event stream, at most `MAX_STREAMS` event
//! streams. Paths are matched, never joined: the store is served by `tower-http`'s `ServeDir`,
//! which refuses `..`, behind [`inside_plate`], which serves only regular files whose canonical
//! path lies inside the plate (no symlink leads out). Async for this I/O only, on a runtime of
//! its own thread: the pipeline never waits on it.

pub mod plate;
pub mod thumb;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_stream::StreamExt;
use tower_http::cors::{Any, CorsLayer};
use tower_http::services::ServeDir;
use tower_http::timeout::TimeoutLayer;

pub use crate::live::Live;

/// Connections served at once: a scraper, a few browser tabs and a viewer's parallel reads.
pub const MAX_CONNECTIONS: usize = 48;
/// Event streams at once (each holds a connection for as long as the page is open).
const MAX_STREAMS: usize = 16;
/// Time to receive the request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for any answer but the event stream to begin.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for any answer but the event stream to be sent whole: a reader slower than a 16 MB shard
/// in this long is cut, so it cannot hold a slot for good.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

const INDEX: &str = include_str!("page/index.html");
const APP: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/style.css");

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot serve {0:?} under /zarr/: a store name may hold letters, digits, '.', '_' and '-' only")]
    StoreName(String),
    #[error("cannot listen on {addr} (telemetry.http_listen)")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct App {
    metrics: Option<PrometheusHandle>,
    live: Arc<Live>,
    plate_dir: Option<PathBuf>,
    streams: Arc<tokio::sync::Semaphore>,
}

/// Starts the server on `listen` (empty: no server) on its own thread until the process exits,
/// and returns the address it is bound to (port 0 picks one).
pub fn start(
    listen: &str,
    metrics: Option<PrometheusHandle>,
    live: Arc<Live>,
    plate_dir: Option<PathBuf>,
) -> Result<Option<SocketAddr>, WebError> {
    if listen.is_empty() {
        return Ok(None);
    }
    if let Some(name) = plate_dir.as_ref().and_then(|d| d.file_name()) {
        let name = name.to_string_lossy();
        let plain = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if name.is_empty() || !name.bytes().all(plain) {
            return Err(WebError::StoreName(name.into_owned()));
        }
    }
    let bind = |source| WebError::Bind {
        addr: listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(listen).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(bind)?;
    let app = App {
        metrics,
        live,
        plate_dir,
        streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
    };
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || runtime.block_on(serve(listener, router(app))))
        .map_err(bind)?;
    Ok(Some(addr))
}

fn router(app: App) -> Router {
    let mut answers = Router::new()
        .route("/", get(|| async { page(INDEX, "text/html; charset=utf-8") }))
        .route("/app.js", get(|| async { page(APP, "text/javascript; charset=utf-8") }))
        .route("/style.css", get(|| async { page(STYLE, "text/css; charset=utf-8") }))
        .route("/metrics", get(metrics))
        .route("/api/state", get(state))
        .route("/api/thumb/{row}/{column}/{field}/{channel}", get(thumbnail));
    if let Some(dir) = &app.plate_dir {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cors = CorsLayer::new()
            .allow_origin(Any)
            .allow_methods([Method::GET, Method::HEAD])
            .allow_headers([header::RANGE])
            .expose_headers([header::CONTENT_RANGE, header::ACCEPT_RANGES, header::CONTENT_LENGTH]);
        let store: Router = Router::new()
            .fallback_service(ServeDir::new(dir).append_index_html_on_directories(false))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(dir.clone()),
                inside_plate,
            ));
        answers = answers.nest_service(&format!("/zarr/{name}"), store);
        answers = answers.layer(cors);
    }
    let answers = answers
        .layer(axum::middleware::map_response(|r: Response| async move {
            r.map(|body| axum::body::Body::new(Deadline::new(body, BODY_TIMEOUT)))
        }))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            ANSWER_TIMEOUT,
        ));
    Router::new()
        .route("/api/events", get(events))
        .merge(answers)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: see / or /metrics\n") })
        .with_state(app)
}

/// The store answers a path only when its canonical form is a regular file inside the plate.
/// `ServeDir` refuses `..` but follows symlinks, and a plate on a shared or network disk may
/// hold one to anywhere (with CORS `*`, any page in a local browser could then read it). A name
/// the filesystem refuses (a component over 255 bytes) is a 404 too. A suffix range longer than
/// the file asks for all of it (RFC 9110 14.1.1): the whole file, not 416.
async fn inside_plate(
    State(root): State<Arc<PathBuf>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let rel = percent_encoding::percent_decode_str(req.uri().path())
        .decode_utf8_lossy()
        .into_owned();
    let file = tokio::task::spawn_blocking(move || {
        let root = std::fs::canonicalize(&*root).ok()?;
        let path = std::fs::canonicalize(root.join(rel.trim_start_matches('/'))).ok()?;
        let meta = std::fs::metadata(&path).ok()?;
        (path.starts_with(&root) && meta.is_file()).then_some(meta.len())
    })
    .await
    .ok()
    .flatten();
    let Some(len) = file else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let whole = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes=-"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .is_some_and(|n| n >= len);
    if whole {
        req.headers_mut().remove(header::RANGE);
    }
    next.run(req).await
}

fn page(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    match &app.metrics {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics in this process\n").into_response(),
    }
}

async fn state(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], app.live.snapshot()).into_response()
}

/// Server-Sent Events: the whole state first (a late joiner sees what happened so far), then
/// every change; a subscriber that fell behind gets the whole state again.
async fn events(State(app): State<App>) -> Response {
    let Ok(permit) = app.streams.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many event streams\n").into_response();
    };
    let rx = app.live.subscribe();
    let first = app.live.snapshot();
    let live = app.live.clone();
    let changes = tokio_stream::wrappers::BroadcastStream::new(rx).map(move |item| {
        let _held = &permit;
        Ok::<_, Infallible>(Event::default().data(item.unwrap_or_else(|_| live.snapshot())))
    });
    let stream = tokio_stream::once(Ok::<_, Infallible>(Event::default().data(first))).chain(changes);
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// `?t=N`: the timepoint (default 0).
#[derive(Debug, serde::Deserialize)]
struct Timepoint {
    #[serde(default)]
    t: u32,
}

async fn thumbnail(
    State(app): State<App>,
    UrlPath((row, column, field, channel)): UrlPath<(String, String, u32, String)>,
    Query(Timepoint { t }): Query<Timepoint>,
) -> Response {
    let Some(dir) = app.plate_dir.clone() else {
        return (StatusCode::NOT_FOUND, "no plate store\n").into_response();
    };
    let Some(channel) = channel.strip_suffix(".png").and_then(|c| c.parse::<usize>().ok()) else {
        return (StatusCode::NOT_FOUND, "expected CHANNEL.png\n").into_response();
    };
    let made = tokio::task::spawn_blocking(move || thumb::png(&dir, &row, &column, field, channel, t)).await;
    match made {
        Ok(Ok(png)) => (
            [(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-cache")],
            png,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "thumbnail failed\n").into_response(),
    }
}

/// A response body that ends in an error, which makes hyper drop the connection, once `deadline`
/// has passed: what a slow reader gets instead of a slot held for as long as it likes.
struct Deadline {
    inner: axum::body::Body,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(inner: axum::body::Body, limit: Duration) -> Self {
        Self {
            inner,
            sleep: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl axum::body::HttpBody for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if std::future::Future::poll(self.sleep.as_mut(), cx).is_ready() {
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not read within its time");
            return std::task::Poll::Ready(Some(Err(axum::Error::new(e))));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connections being served: when all slots are taken, a new connection takes the slot of
/// the oldest connection of the address holding the most, so one client (or a flood of
/// reconnecting ones) cannot starve `/metrics` or the page; every newcomer is served.
#[derive(Default)]
struct Slots {
    next: u64,
    held: Vec<(u64, std::net::IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl Slots {
    /// Registers a connection from `ip`, evicting one if all are taken; returns its id and the
    /// receiver that says it was evicted.
    fn take(&mut self, ip: std::net::IpAddr) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        if self.held.len() >= MAX_CONNECTIONS {
            let mut counts: std::collections::HashMap<std::net::IpAddr, usize> = Default::default();
            for (_, a, _) in &self.held {
                *counts.entry(*a).or_default() += 1;
            }
            let busiest = counts.into_iter().max_by_key(|&(_, n)| n).map(|(a, _)| a);
            // `held` is in arrival order: the first of the busiest address is its oldest.
            if let Some(i) = self.held.iter().position(|(_, a, _)| Some(*a) == busiest) {
                let (_, _, evict) = self.held.remove(i);
                let _ = evict.send(());
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.next += 1;
        self.held.push((self.next, ip, tx));
        (self.next, rx)
    }

    fn give_back(&mut self, id: u64) {
        self.held.retain(|(i, _, _)| *i != id);
    }
}

async fn serve(listener: TcpListener, router: Router) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(std::sync::Mutex::new(Slots::default()));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors, say: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok((id, evicted)) = slots.lock().map(|mut s| s.take(peer.ip())) else {
            return;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let slots = Arc::clone(&slots);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = evicted => {}
            }
            if let Ok(mut s) = slots.lock() {
                s.give_back(id);
            }
        });
    }
}
