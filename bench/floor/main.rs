//! The floor of `GET /health`: what hyper and tokio cost before kickstart adds anything. Every
//! request gets the same JSON body, of the size of kickstart's `/health`; nothing is logged.
//! Serves on 127.0.0.1:PORT until Ctrl-C, then exits 0, so that callgrind writes its counts.

use http_body_util::Full;
use hyper::{Response, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

const BODY: &[u8] = br#"{"status":"pass","uptime":"12.345s","version":"local","lastCommitHash":"0123456789abcdef0123456789abcdef01234567","lastCommitTime":"2026-12-07T00:00:00Z","dirtyBuild":false}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT").ok().and_then(|port| port.parse().ok()).unwrap_or(8080);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true); // as kickstart: one write per response
        let service = service_fn(|_request| async {
            let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
            let json = header::HeaderValue::from_static("application/json");
            response.headers_mut().insert(header::CONTENT_TYPE, json);
            Ok::<_, Infallible>(response)
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}
