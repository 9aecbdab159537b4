//! The HTTP server as a client on the network sees it: `/metrics` answers, other paths and
//! methods do not, and clients that connect and send nothing can neither block a scrape (a new
//! connection takes the oldest one's slot) nor hold a slot past the header timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use std::sync::Arc;

use liveomics::live::Live;
use liveomics::telemetry::Metrics;

fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_are_served_and_the_endpoint_stays_bounded() {
    let m = Metrics::install().expect("metrics");
    let addr = liveomics::web::start("127.0.0.1:0", Some(m.handle()), Arc::new(Live::default()), None)
        .expect("a server")
        .expect("bound");
    let ok = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
    let missing = exchange(addr, "GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = exchange(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let garbage = exchange(addr, "\x16\x03\x01 not http at all\r\n\r\n");
    assert!(!garbage.contains("200 OK"), "{garbage}");

    // Clients that connect and say nothing hold every slot: one more is still answered, in the
    // slot of the oldest of them (all come from one address), which is closed...
    let mut idle: Vec<TcpStream> = (0..liveomics::web::MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let served = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let oldest = &mut idle[0];
    oldest.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
    let mut buf = [0u8; 16];
    assert!(
        matches!(oldest.read(&mut buf), Ok(0)),
        "the oldest idle connection was closed"
    );
    // ...and the two-second header timeout drops the rest.
    std::thread::sleep(Duration::from_millis(2500));
    let again = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    drop(idle);
}
