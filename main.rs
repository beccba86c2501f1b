//! kickstart: a minimal, production-shaped HTTP service in one file.
//!
//! Read it top to bottom: `main` wires the process into `run`, `run` wires the service, `route`
//! lists the endpoints, then come the handlers, the server loop, the middleware and the helpers.

use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::process::ExitCode;
use std::sync::{Arc, Once};
use std::task::Poll;
use std::time::{Duration, Instant};
use std::{convert::Infallible, io};

use http_body_util::Full;
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::instrument::WithSubscriber;
use tracing::subscriber::NoSubscriber;
use tracing::{Dispatch, error, info, warn};
use tracing_subscriber::fmt::MakeWriter;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Body = Full<Bytes>;

/// A client that has not sent a whole request head by then is disconnected (Go's ReadHeaderTimeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight at shutdown may take to finish before their connections are closed.
const GRACE_PERIOD: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    let build = BuildInfo {
        version: env!("VERSION"),
        commit_hash: env!("GIT_COMMIT"),
        commit_time: env!("GIT_COMMIT_TIME"),
        dirty: env!("GIT_DIRTY") == "true",
    };
    let getenv = |key: &str| std::env::var(key).ok();
    let bind = std::net::TcpListener::bind;
    match run(getenv, io::stdout, shutdown_signal(), build, bind).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// The build's version and last commit, embedded by build.rs; a parameter so tests choose it.
#[derive(Clone, Copy)]
struct BuildInfo {
    version: &'static str,
    commit_hash: &'static str,
    commit_time: &'static str,
    dirty: bool,
}

/// Reads the configuration, binds, and serves until `shutdown` resolves with its cause.
///
/// Everything from the outside world comes in as a parameter, so tests run the real server
/// in-process: `bind` turns the address PORT asks for into a listener, and a test binds an
/// ephemeral port instead.
async fn run<W>(
    getenv: impl Fn(&str) -> Option<String>,
    log_writer: W,
    shutdown: impl Future<Output = &'static str>,
    build: BuildInfo,
    bind: impl FnOnce(SocketAddr) -> io::Result<std::net::TcpListener>,
) -> Result<(), Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let port = parse_port(getenv("PORT"))?;
    let listener = bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .map_err(|err| format!("listen on port {port}: {err}"))?;
    let state = Arc::new(State {
        build,
        started: Instant::now(),
        openapi: openapi_document(build.version),
    });
    async move {
        info!(port, version = build.version, "server started");
        serve(listener, move |req| route(req, state.clone()), shutdown).await;
        Ok(())
    }
    .with_subscriber(json_logs(log_writer))
    .await
}

/// What the handlers share, computed once at start-up.
struct State {
    build: BuildInfo,
    started: Instant,
    openapi: Bytes,
}

/// The single source of truth for the endpoints; openapi.yaml documents exactly these, and a
/// test fails when the two disagree.
async fn route(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => handle_health(&state),
        (&Method::GET, "/openapi.yaml") => handle_openapi(&state),
        (_, "/health" | "/openapi.yaml") => method_not_allowed("GET"),
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Reports the build and the uptime, with kickstart.go's keys so one dashboard reads both.
fn handle_health(state: &State) -> Response<Body> {
    let build = &state.build;
    let body = serde_json::json!({
        "status": "pass",
        "version": build.version,
        "uptime": go_duration(state.started.elapsed()),
        "lastCommitHash": build.commit_hash,
        "lastCommitTime": build.commit_time,
        "dirtyBuild": build.dirty,
    });
    response(StatusCode::OK, "application/json", body.to_string())
}

/// Serves openapi.yaml to any origin, so API tools running in a browser can load it.
fn handle_openapi(state: &State) -> Response<Body> {
    let mut res = response(StatusCode::OK, "application/yaml", state.openapi.clone());
    let any_origin = HeaderValue::from_static("*");
    res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, any_origin);
    res
}

/// The OpenAPI document, compiled into the binary. The folder is the file itself: a folder
/// holding it (the repository root) would have rust-embed walk `target/` on every build.
#[derive(rust_embed::Embed)]
#[folder = "openapi.yaml"]
#[prefix = "openapi.yaml"]
struct OpenApiFile;

/// openapi.yaml with `info.version` set to the build's version (quoted: "1.0" is not a number).
fn openapi_document(version: &str) -> Bytes {
    let file = OpenApiFile::get("openapi.yaml").expect("openapi.yaml is embedded at build time");
    let quoted = serde_json::Value::from(version).to_string();
    let text = String::from_utf8_lossy(&file.data);
    let text = text.replacen("\n  version: local\n", &format!("\n  version: {quoted}\n"), 1);
    Bytes::from(text)
}

/// Serves HTTP/1.1 until `shutdown` resolves, then stops accepting and gives the requests in
/// flight up to GRACE_PERIOD to finish; connections still open after that are closed.
async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = &'static str>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut http = http1::Builder::new();
    // Without a timer, hyper silently ignores the header read timeout.
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let cause = loop {
        let (stream, peer) = tokio::select! {
            cause = &mut shutdown => break cause,
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors: back off rather than spin.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Responses go out in one write, so there is nothing for Nagle's algorithm to batch.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| access_log(peer.ip(), req, handler.clone()));
        let connection = http.serve_connection(TokioIo::new(stream), service);
        connections.spawn(graceful.watch(connection).with_current_subscriber());
    };
    info!(cause, "shutting down");
    drop(listener);
    match tokio::time::timeout(GRACE_PERIOD, graceful.shutdown()).await {
        Ok(()) => info!("server stopped"),
        Err(_) => warn!(open = connections.len(), "server stopped, closing connections still open"),
    }
}

/// Middleware: one log line per request once its response is ready, with kickstart.go's fields.
async fn access_log<H, F>(
    ip: IpAddr,
    req: Request<Incoming>,
    handler: H,
) -> Result<Response<Body>, Infallible>
where
    H: FnOnce(Request<Incoming>) -> F,
    F: Future<Output = Response<Body>>,
{
    let start = Instant::now();
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let res = REQUEST.scope((method.clone(), uri.clone()), recover(handler(req))).await;
    info!(
        method = method.as_str(),
        path = uri.path(),
        query = uri.query().unwrap_or_default(),
        %ip,
        status = res.status().as_u16(),
        bytes = res.body().size_hint().lower(),
        latency_us = start.elapsed().as_micros() as u64,
        "accessed"
    );
    Ok(res)
}

tokio::task_local! {
    /// The request a task is handling, so that the panic hook can say which one panicked.
    static REQUEST: (Method, Uri);
}

/// Middleware: turns a panic in the handler into a 500 that reveals nothing, so the connection and
/// the server keep serving. The panic hook (see `json_logs`) has logged it by then.
async fn recover(handler: impl Future<Output = Response<Body>>) -> Response<Body> {
    let mut handler = pin!(handler);
    poll_fn(|cx| {
        catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))).unwrap_or_else(|_| {
            Poll::Ready(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"))
        })
    })
    .await
}

/// JSON lines for a log collector: one object per line, an RFC 3339 UTC `timestamp`, the event's
/// fields at the top level. Panics are logged the same way.
fn json_logs<W>(writer: W) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    log_panics();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_span_list(false)
        .with_target(false)
        .with_writer(writer)
        .finish();
    Dispatch::new(subscriber)
}

/// Installs, once per process, a panic hook that logs through tracing, so a panic becomes a JSON
/// line with its message, location and request. Where no logger is in scope, the default hook
/// prints it.
fn log_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if tracing::dispatcher::get_default(|logger| logger.is::<NoSubscriber>()) {
                return default_hook(info);
            }
            let message = info.payload_as_str().unwrap_or("panic payload is not a string");
            let location = info.location().map(ToString::to_string).unwrap_or_default();
            let request = REQUEST.try_with(|(method, uri)| (method.clone(), uri.clone())).ok();
            let method = request.as_ref().map(|(method, _)| method.as_str());
            let path = request.as_ref().map(|(_, uri)| uri.path());
            error!(panic = message, location, method, path, "panic");
        }));
    });
}

/// Resolves with the signal's name on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes).
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// PORT, 1 to 65535, default 8080; set but empty counts as unset.
fn parse_port(value: Option<String>) -> Result<u16, Error> {
    match value.as_deref() {
        None | Some("") => Ok(8080),
        Some(text) => text.parse().ok().filter(|&port| port != 0).ok_or_else(|| {
            format!("invalid PORT {text:?}: port must be between 1 and 65535").into()
        }),
    }
}

/// Formats like Go's time.Duration ("1h2m3.456s"), to the millisecond.
fn go_duration(elapsed: Duration) -> String {
    let millis = elapsed.as_millis();
    let (hours, minutes) = (millis / 3_600_000, millis / 60_000 % 60);
    let seconds = format!("{}.{:03}", millis / 1000 % 60, millis % 1000);
    let seconds = seconds.trim_end_matches('0').trim_end_matches('.');
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, _) => format!("{minutes}m{seconds}s"),
        _ => format!("{hours}h{minutes}m{seconds}s"),
    }
}

/// The one error shape of the service: `{"error": "..."}`.
fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message });
    response(status, "application/json", body.to_string())
}

/// 405 with the `Allow` header that RFC 9110 requires.
fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut res = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

#[cfg(test)]
#[path = "main_test.rs"]
mod tests;
