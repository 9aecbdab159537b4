//! The metrics endpoint: `GET /metrics` in Prometheus' text format, served by hyper on a
//! single-threaded tokio runtime of its own thread (async for this I/O only; the pipeline never
//! waits on it). Bounded like everything the network can reach: a few connections at a time
//! (more are closed at once), two seconds to send the request head, ten for the whole exchange,
//! no request body read, one request per connection.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;

/// Connections served at once; a scraper needs one.
const MAX_CONNECTIONS: usize = 8;
/// Time to receive the request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for one connection from accept to the last byte of the response.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` (already bound, so that the caller knows the port) on its own thread until
/// the process exits.
pub fn spawn(listener: TcpListener, handle: PrometheusHandle) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || runtime.block_on(serve(listener, handle)))?;
    Ok(())
}

async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, handle.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

async fn respond(req: Request<Incoming>, handle: PrometheusHandle) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, handle.render()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "see /metrics\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(resp)
}
