//! A minimal, production-shaped HTTP service in one file. Read it top to bottom: `main`, `run` (the
//! wiring), `route` (the endpoints), the handlers, the middleware, the server loop, logging, helpers.
//! The example endpoint, `POST /resize`, comes last, fenced so that it can be deleted in one cut.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed};
use std::time::{Duration, Instant};
use std::{convert::Infallible, fmt::Display, future::Future, future::poll_fn, io, pin::pin, task::Poll};
use std::{net::IpAddr, net::SocketAddr, ops::RangeInclusive, process::ExitCode, str::FromStr};

use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, rt::TokioTimer, server::graceful::GracefulShutdown};
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram, info::Info};
use prometheus_client::registry::{Registry, Unit};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{Dispatch, Event, error, info, instrument::WithSubscriber, subscriber::NoSubscriber, warn};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, MakeWriter, format::JsonFields, format::Writer};

type Body = Full<Bytes>;

/// A client that has not sent a whole request head by then is disconnected (Go's ReadHeaderTimeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight at shutdown may take to finish before their connections are closed.
const GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Latency buckets in seconds, from `/health` (well under a millisecond) to a large image.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// The methods counted by name in the metrics; any other counts as `OTHER`, adding no series.
const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[tokio::main]
async fn main() -> ExitCode {
    let build = BuildInfo {
        version: env!("VERSION"),
        commit_hash: env!("GIT_COMMIT"),
        commit_time: env!("GIT_COMMIT_TIME"),
        dirty: env!("GIT_DIRTY") == "true",
    };
    log_panics();
    let getenv = |key: &str| std::env::var(key).ok();
    let served = run(getenv, io::stdout, shutdown_signal, build, std::net::TcpListener::bind).await;
    served.inspect_err(|err| eprintln!("{err}")).map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

/// The build's version and last commit, embedded by build.rs; a parameter so tests choose it. It
/// goes into /health under kickstart.go's keys, so one dashboard reads both.
#[derive(Clone, Copy, serde::Serialize)]
struct BuildInfo {
    version: &'static str,
    #[serde(rename = "lastCommitHash")]
    commit_hash: &'static str,
    #[serde(rename = "lastCommitTime")]
    commit_time: &'static str,
    #[serde(rename = "dirtyBuild")]
    dirty: bool,
}

/// Reads the configuration, binds and serves until a `signal` resolves with its cause. All it
/// needs from the outside comes in as a parameter, so tests run the real server in-process.
async fn run<S: Future<Output = &'static str>>(
    getenv: impl Fn(&str) -> Option<String>, log_writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static,
    signal: impl Fn() -> S, build: BuildInfo,
    bind: impl FnOnce(SocketAddr) -> io::Result<std::net::TcpListener>,
) -> Result<(), String> {
    let port = env_in_range(&getenv, "PORT", 8080, 0..=65535)?;
    let delay = Duration::from_secs(env_in_range(&getenv, "SHUTDOWN_DELAY", 0, 0..=3600)?);
    let mut registry = Registry::with_prefix(metric_prefix(env!("CARGO_PKG_NAME")));
    let metrics = HttpMetrics::register(&mut registry, build);
    let resize = ResizeEndpoint::new(&getenv, &mut registry)?;
    let listener = bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .and_then(TcpListener::from_std)
        .map_err(|err| format!("listen on port {port}: {err}"))?;
    let port = listener.local_addr().map_or(port, |address| address.port()); // PORT=0 picks one
    let state = Arc::new(State {
        build,
        ready: AtomicBool::new(true),
        started: Instant::now(),
        openapi: openapi_document(build.version),
        registry,
        metrics,
        resize,
    });
    let draining = state.clone();
    // Kubernetes stops sending requests only a while after SIGTERM: meanwhile, report not ready and
    // serve on. A second signal cuts the delay short.
    let shutdown = async move {
        let cause = signal().await;
        draining.ready.store(false, Relaxed);
        info!(cause, delay_s = delay.as_secs(), "not ready, shutting down after the delay");
        tokio::select! { () = tokio::time::sleep(delay) => {}, _ = signal() => {} }
        cause
    };
    let app = move |req, peer| {
        let state = state.clone();
        async move { middleware(req, peer, &state.metrics, |req| route(req, &state)).await }
    };
    let serving = async move {
        info!(name = env!("CARGO_PKG_NAME"), port, version = build.version, "server started");
        serve(listener, app, shutdown).await;
        Ok(())
    };
    serving.with_subscriber(json_logs(log_writer)).await
}

/// What the handlers share, made once at start-up.
struct State {
    build: BuildInfo,
    ready: AtomicBool,
    started: Instant,
    openapi: Bytes,
    /// This server's metrics: its own, not the process's, since tests run many servers.
    registry: Registry,
    metrics: HttpMetrics,
    resize: ResizeEndpoint,
}

/// The single list of endpoints; a test checks that openapi.yaml agrees. Each is an exact path, so
/// the metrics name a route by its path, and every other path counts as `unmatched`. GET routes
/// answer HEAD too, as Go's ServeMux does: hyper sends the headers and leaves the body out.
async fn route(req: Request<Incoming>, state: &State) -> Response<Body> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let post = req.method() == Method::POST;
    match req.uri().path() {
        "/health" if get => handle_health(state),
        "/metrics" if get => handle_metrics(state),
        "/openapi.yaml" if get => handle_openapi(state),
        "/resize" if post => state.resize.handle(req).await,
        "/health" | "/metrics" | "/openapi.yaml" => method_not_allowed("GET, HEAD"),
        "/resize" => method_not_allowed("POST"),
        _ => unmatched(),
    }
}

/// Reports readiness, the build and the uptime: a struct serialized straight into the body, where a
/// `json!` map would be built and dropped on every probe.
fn handle_health(state: &State) -> Response<Body> {
    #[derive(serde::Serialize)]
    struct Health<'a> {
        status: &'static str,
        uptime: String,
        #[serde(flatten)]
        build: &'a BuildInfo,
    }
    let ready = state.ready.load(Relaxed);
    let health = Health {
        status: if ready { "pass" } else { "fail" },
        uptime: go_duration(state.started.elapsed()),
        build: &state.build,
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    response(status, "application/json", serde_json::to_vec(&health).expect("strings and a bool serialize"))
}

/// This server's metrics in the Prometheus text format.
fn handle_metrics(state: &State) -> Response<Body> {
    let mut text = String::new();
    match prometheus_text::encode(&mut text, &state.registry) {
        Ok(()) => response(StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
        Err(err) => Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the metrics: {err}")).into(),
    }
}

/// Serves openapi.yaml to any origin, so API tools running in a browser can load it.
fn handle_openapi(state: &State) -> Response<Body> {
    let mut res = response(StatusCode::OK, "application/yaml", state.openapi.clone());
    res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    res
}

/// openapi.yaml, compiled in. The folder is the file: the root would have rust-embed walk target/.
#[derive(rust_embed::Embed)]
#[folder = "openapi.yaml"]
#[prefix = "openapi.yaml"]
struct OpenApiFile;

/// openapi.yaml with the package's name and the build's version (quoted: "1.0" is not a number).
fn openapi_document(version: &str) -> Bytes {
    let file = OpenApiFile::get("openapi.yaml").expect("openapi.yaml is embedded at build time");
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    String::from_utf8_lossy(&file.data)
        .replacen("title: package name\n", &format!("title: {}\n", quoted(env!("CARGO_PKG_NAME"))), 1)
        .replacen("version: local\n", &format!("version: {}\n", quoted(version)), 1)
        .into()
}

/// The middleware every request passes, innermost first: each line wraps the ones above it, so a
/// new middleware is one more line here.
async fn middleware<F: Future<Output = Response<Body>>>(
    req: Request<Incoming>, peer: IpAddr, metrics: &HttpMetrics, handler: impl FnOnce(Request<Incoming>) -> F,
) -> Response<Body> {
    let handler = |req| recover(handler(req));
    let handler = |req| access_log(req, peer, metrics, handler);
    let handler = |req| with_request_id(req, handler);
    handler(req).await
}

/// Middleware: gives the request its id (see `request_id`), which every log line of the request
/// carries and the `x-request-id` response header echoes.
async fn with_request_id<F: Future<Output = Response<Body>>>(
    req: Request<Incoming>, next: impl FnOnce(Request<Incoming>) -> F,
) -> Response<Body> {
    let id = request_id(req.headers());
    let header = HeaderValue::from_str(&id);
    let request = RequestContext { id, method: req.method().clone(), uri: req.uri().clone() };
    let mut res = REQUEST.scope(request, next(req)).await;
    if let Ok(id) = header {
        res.headers_mut().insert(X_REQUEST_ID, id);
    }
    res
}

tokio::task_local! {
    /// The request a task is handling: its log lines carry the id, and the panic hook names it.
    static REQUEST: RequestContext;
}

#[derive(Clone)]
struct RequestContext {
    id: String,
    method: Method,
    uri: Uri,
}

/// The trace-id of a valid W3C `traceparent`, else a valid `x-request-id` (1 to 128 visible ASCII
/// characters), else 128 random bits as 32 hex digits, fit to be a trace-id downstream.
fn request_id(headers: &HeaderMap) -> String {
    let mut traceparents = headers.get_all("traceparent").iter();
    let traceparent = match (traceparents.next(), traceparents.next()) {
        (Some(only), None) => only.to_str().ok().and_then(trace_id),
        _ => None, // none, or two, which the spec makes invalid
    };
    let visible = |id: &&str| (1..=128).contains(&id.len()) && id.bytes().all(|byte| byte.is_ascii_graphic());
    let request_id = headers.get(X_REQUEST_ID).and_then(|id| id.to_str().ok()).filter(visible);
    traceparent.or(request_id).map_or_else(|| format!("{:032x}", fastrand::u128(..)), str::to_owned)
}

/// The trace-id of a `traceparent` that W3C Trace Context accepts: `version-traceid-parentid-flags`
/// in lowercase hex, neither id all zeros, and nothing more in version 00 (a later one may add fields).
fn trace_id(traceparent: &str) -> Option<&str> {
    let mut fields = traceparent.split('-');
    let lower_hex = |field: &&str| field.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
    let mut hex = |len| fields.next().filter(|field| field.len() == len && lower_hex(field));
    let version = hex(2)?;
    let trace_id = hex(32)?;
    let parent_id = hex(16)?;
    let _flags = hex(2)?;
    let nonzero = |id: &str| id.bytes().any(|digit| digit != b'0');
    let ends = version != "00" || fields.next().is_none();
    (ends && version != "ff" && nonzero(trace_id) && nonzero(parent_id)).then_some(trace_id)
}

/// Middleware: one access line, with kickstart.go's fields, and one count per request.
async fn access_log<F: Future<Output = Response<Body>>>(
    req: Request<Incoming>, peer: IpAddr, metrics: &HttpMetrics, next: impl FnOnce(Request<Incoming>) -> F,
) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut line = AccessLine {
        start: Instant::now(),
        method,
        uri,
        peer,
        metrics,
        status: 499,
        bytes: 0,
        unmatched: false,
    };
    let res = next(req).await;
    line.status = res.status().as_u16();
    line.bytes = if line.method == Method::HEAD { 0 } else { res.body().size_hint().lower() };
    line.unmatched = res.extensions().get::<Unmatched>().is_some();
    res
}

/// A request being answered, logged and counted when dropped: hyper drops a request whose client
/// hangs up before the answer, and that one is logged too, with nginx's status for it, 499.
struct AccessLine<'a> {
    start: Instant,
    method: Method,
    uri: Uri,
    peer: IpAddr,
    metrics: &'a HttpMetrics,
    status: u16,
    bytes: u64,
    unmatched: bool,
}

impl Drop for AccessLine<'_> {
    fn drop(&mut self) {
        let latency = self.start.elapsed();
        let route = if self.unmatched { "unmatched" } else { self.uri.path() };
        self.metrics.count(route, &self.method, self.status, latency);
        info!(
            method = self.method.as_str(),
            path = self.uri.path(),
            query = self.uri.query().unwrap_or_default(),
            ip = %self.peer,
            status = self.status,
            bytes = self.bytes,
            latency_us = latency.as_micros() as u64,
            "accessed"
        );
    }
}

/// Middleware: a panic in the handler becomes a 500 that reveals nothing (the panic hook logs it),
/// and the connection keeps serving.
async fn recover(handler: impl Future<Output = Response<Body>>) -> Response<Body> {
    let mut handler = pin!(handler);
    poll_fn(|cx| {
        catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))).unwrap_or_else(|_| {
            Poll::Ready(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"))
        })
    })
    .await
}

/// Requests by route, method and status, and their latency by route.
struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<[(&'static str, String); 1], Histogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: u16,
}

impl HttpMetrics {
    /// Registers the request metrics, and the build's version and commit as `build_info`.
    fn register(registry: &mut Registry, build: BuildInfo) -> HttpMetrics {
        let metrics = HttpMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
        };
        let help = "HTTP requests answered, by route, method and status (499: the client hung up)";
        registry.register("http_requests", help, metrics.requests.clone());
        let help = "Time from a request's head to its answer, by route";
        registry.register_with_unit("http_request_duration", help, Unit::Seconds, metrics.latency.clone());
        let build_info = Info::new([("version", build.version), ("commit", build.commit_hash)]);
        registry.register("build", "The running build", build_info);
        metrics
    }

    fn count(&self, route: &str, method: &Method, status: u16, latency: Duration) {
        self.latency.get_or_create(&[("route", route.to_owned())]).observe(latency.as_secs_f64());
        let method = METHODS.into_iter().find(|known| *known == method.as_str()).unwrap_or("OTHER");
        self.requests.get_or_create(&RequestLabels { route: route.to_owned(), method, status }).inc();
    }
}

/// Serves HTTP/1.1 until `shutdown` resolves, then lets requests in flight finish for GRACE_PERIOD.
async fn serve<F: Future<Output = Response<Body>> + Send + 'static>(
    listener: TcpListener, handler: impl Fn(Request<Incoming>, IpAddr) -> F + Clone + Send + 'static,
    shutdown: impl Future<Output = &'static str>,
) {
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
        let service = service_fn(move |req| {
            let answer = handler(req, peer.ip());
            async { Ok::<_, Infallible>(answer.await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        // Awaited in a block of its own, so that the connection, and with it a request whose client
        // hung up, is dropped where the logger is in scope, not by the runtime after the task ends.
        #[expect(
            clippy::redundant_async_block,
            reason = "the block decides where the connection is dropped"
        )]
        connections.spawn(async move { connection.await }.with_current_subscriber());
    };
    info!(cause, "shutting down");
    drop(listener);
    match tokio::time::timeout(GRACE_PERIOD, graceful.shutdown()).await {
        Ok(()) => info!("server stopped"),
        Err(_) => warn!(open = connections.len(), "server stopped, closing connections still open"),
    }
}

/// JSON lines for a log collector: one object per line, an RFC 3339 UTC `timestamp`, the event's
/// fields at the top level and, on every line logged for a request, its `request_id`.
fn json_logs(writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static) -> Dispatch {
    let logs = tracing_subscriber::fmt().fmt_fields(JsonFields::new()).event_format(JsonLine);
    Dispatch::new(logs.with_writer(writer).finish())
}

/// tracing-subscriber's JSON line, led by the request's id where there is a request: one key on
/// every line of it, whoever logs the line, and no span per request to create and re-format.
struct JsonLine;

impl FormatEvent<tracing_subscriber::Registry, JsonFields> for JsonLine {
    fn format_event(
        &self, ctx: &FmtContext<'_, tracing_subscriber::Registry, JsonFields>, mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let json = tracing_subscriber::fmt::format().json().flatten_event(true).with_target(false);
        let json = json.with_current_span(false).with_span_list(false);
        // One buffer sized for an access line; the id is visible ASCII (see `request_id`), so its
        // Debug form is also its JSON string.
        let led_by_id = REQUEST.try_with(|request| {
            let mut line = String::with_capacity(256);
            json.format_event(ctx, Writer::new(&mut line), event)?;
            let fields = line.strip_prefix('{').unwrap_or(&line);
            write!(writer, "{{\"request_id\":{:?},{fields}", request.id)
        });
        led_by_id.unwrap_or_else(|_| json.format_event(ctx, writer, event))
    }
}

/// Logs panics as JSON lines with their message, location and request; where no logger is in scope
/// (outside `run`), the default hook prints them.
fn log_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if tracing::dispatcher::get_default(|logs| logs.is::<NoSubscriber>()) {
            return default_hook(info);
        }
        let message = info.payload_as_str().unwrap_or("panic payload is not a string");
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let request = REQUEST.try_with(|request| format!("{} {}", request.method, request.uri.path()));
        error!(panic = message, location, request = request.ok(), "panic");
    }));
}

/// Resolves with the signal's name on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes).
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = interrupt.recv() => "SIGINT", _ = terminate.recv() => "SIGTERM" }
}

/// A setting from the environment, `default` where unset; set but empty counts as unset.
fn env_in_range<T: FromStr + PartialOrd + Display>(
    getenv: impl Fn(&str) -> Option<String>, name: &str, default: T, range: RangeInclusive<T>,
) -> Result<T, String> {
    let value = getenv(name).filter(|value| !value.is_empty());
    value.map_or(Ok(default), |value| parse_in_range(name, &value, range))
}

/// A number within `range`, or an error that names the setting and the range.
fn parse_in_range<T: FromStr + PartialOrd + Display>(
    name: &str, value: &str, range: RangeInclusive<T>,
) -> Result<T, String> {
    let number = value.parse().ok().filter(|number| range.contains(number));
    let (min, max) = range.into_inner();
    number.ok_or_else(|| {
        format!("invalid {name} {value:?}: {} must be between {min} and {max}", name.to_lowercase())
    })
}

/// A prefix for metric names: Prometheus allows `[a-zA-Z0-9_]`, so `my-service` gives `my_service`.
fn metric_prefix(package: &str) -> String {
    package.chars().map(|char| if char.is_ascii_alphanumeric() { char } else { '_' }).collect()
}

/// Hours, minutes and seconds to the millisecond ("1h2m3.456s"), as Go's time.ParseDuration reads.
fn go_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    format!("{}h{}m{}.{:03}s", secs / 3600, secs / 60 % 60, secs % 60, elapsed.subsec_millis())
}

/// A request refused: its status and what the client reads. A 500's message goes to the log only;
/// the client reads "internal server error".
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl From<Refusal> for Response<Body> {
    fn from(Refusal(status, message): Refusal) -> Self {
        if status != StatusCode::INTERNAL_SERVER_ERROR {
            return error_response(status, &message);
        }
        error!(error = message, "internal error");
        error_response(status, "internal server error")
    }
}

/// The one error shape of the service: `{"error": "..."}`. A 503 says when to retry.
fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let mut res = response(status, "application/json", serde_json::json!({ "error": message }).to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// 405 with the `Allow` header that RFC 9110 requires.
fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut res = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    res
}

/// 404 for a path that no route matches, marked so that the metrics count it as `unmatched`.
fn unmatched() -> Response<Body> {
    let mut res = error_response(StatusCode::NOT_FOUND, "not found");
    res.extensions_mut().insert(Unmatched);
    res
}

#[derive(Clone)]
struct Unmatched;

fn response(status: StatusCode, mime: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    res
}

// ===== The example endpoint, POST /resize, from here to the end marker. To remove it, delete this
// section, its two lines in `route`, its field in `State` and its line in `run`, and its crates.

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage, Rgba};
use prometheus_client::metrics::gauge::Gauge;
use rusty_jpeg::{decode::PixelFormat, encode::ColorType};
use tokio::sync::Semaphore;

/// An upload slower than this is refused (408) instead of holding its place in the queue.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the rest of a refused body is read and dropped, so that its client reads the refusal.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// The largest width or height /resize produces.
const MAX_SIDE: u32 = 10_000;
/// A progressive JPEG may have any number of scans, each a pass over every block, so a small file
/// of thousands is seconds of CPU. Encoders write about 10; libjpeg-turbo and zune-jpeg limit them too.
const MAX_JPEG_SCANS: u64 = 100;
/// The pixels of all a JPEG's scans together: a 50-megapixel photo may have 12, a 12-megapixel one 50.
const MAX_SCANNED_PIXELS: u64 = 600_000_000;
/// Resize requests admitted per core, working or waiting for a core; past them, 503.
const QUEUE_PER_CORE: usize = 8;

/// POST /resize: its limits, its queue and its metrics.
struct ResizeEndpoint {
    max_bytes: u64,
    max_pixels: u64,
    /// One permit per core: the images being decoded, resized or encoded.
    workers: Arc<Semaphore>,
    /// Requests admitted, working or waiting (a gauge for Prometheus): it bounds the memory their
    /// bodies hold. Past `max_in_flight`, 503.
    in_flight: Gauge,
    max_in_flight: i64,
    outcomes: Family<[(&'static str, &'static str); 1], Counter>,
}

impl ResizeEndpoint {
    /// Reads its limits from the environment and registers its metrics.
    fn new(
        getenv: impl Fn(&str) -> Option<String>, registry: &mut Registry,
    ) -> Result<ResizeEndpoint, String> {
        // glibc's malloc would give each image's buffers back to the kernel, then fault them in again.
        #[cfg(target_env = "gnu")] // SAFETY: mallopt only sets two thresholds; any value is allowed.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let endpoint = ResizeEndpoint {
            max_bytes: env_in_range(&getenv, "RESIZE_MAX_BYTES", 20 << 20, 1..=1 << 30)?,
            max_pixels: env_in_range(&getenv, "RESIZE_MAX_PIXELS", 50_000_000, 1..=1 << 32)?,
            workers: Arc::new(Semaphore::new(cores)),
            in_flight: Gauge::default(),
            max_in_flight: i64::try_from(cores * QUEUE_PER_CORE).unwrap_or(i64::MAX),
            outcomes: Family::default(),
        };
        let help = "Resize requests answered, by outcome: done, 4xx, 5xx or busy (503)";
        registry.register("resize", help, endpoint.outcomes.clone());
        let help = "Resize requests admitted, working or waiting for a core";
        registry.register("images_in_flight", help, endpoint.in_flight.clone());
        Ok(endpoint)
    }

    /// Answers a POST /resize and counts its outcome.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let answer = self.resize(req).await;
        let outcome = match &answer {
            Ok(_) => "done",
            Err(Refusal(StatusCode::SERVICE_UNAVAILABLE, _)) => "busy",
            Err(Refusal(status, _)) if status.is_client_error() => "4xx",
            Err(_) => "5xx",
        };
        self.outcomes.get_or_create(&[("outcome", outcome)]).inc();
        answer.unwrap_or_else(Response::from)
    }

    /// Resizes the image in the body to fit inside `width`×`height`; openapi.yaml has the details.
    async fn resize(&self, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        let Some(_admitted) = Admitted::new(&self.in_flight, self.max_in_flight) else {
            if !req.headers().contains_key(header::EXPECT) {
                linger(req.into_body()); // a client still sending reads the 503
            }
            return Err(Refusal(StatusCode::SERVICE_UNAVAILABLE, "too many images in flight".into()));
        };
        // The query is checked once the body is read: a client still sending gets its 400, not a reset.
        let query = req.uri().query().unwrap_or_default().to_owned();
        let body = read_body(req, self.max_bytes).await?;
        let job = ResizeJob::parse(&query, self.max_pixels)
            .map_err(|text| Refusal(StatusCode::BAD_REQUEST, text))?;
        let closed =
            |err: tokio::sync::AcquireError| Refusal(StatusCode::INTERNAL_SERVER_ERROR, err.to_string());
        let working = self.workers.clone().acquire_owned().await.map_err(closed)?;
        // The permit goes with the job: an image keeps its core until it is done, even if its client left.
        let (image, format) = in_blocking_thread(move || {
            let _working = working;
            job.process(&body)
        })
        .await?;
        Ok(response(StatusCode::OK, format.to_mime_type(), image))
    }
}

/// A request's place in the resize queue, counted by the gauge until it is dropped.
struct Admitted<'a>(&'a Gauge);

impl<'a> Admitted<'a> {
    fn new(in_flight: &'a Gauge, max: i64) -> Option<Admitted<'a>> {
        let admitted = Admitted(in_flight);
        (in_flight.inc() < max).then_some(admitted)
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs CPU-bound work on tokio's blocking pool with the request's context and logger, so that its
/// log lines and panics name the request; a panic there goes on to `recover` (500).
async fn in_blocking_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let logs = tracing::dispatcher::get_default(Dispatch::clone);
    let request = REQUEST.try_with(RequestContext::clone).ok();
    let job = tokio::task::spawn_blocking(move || {
        tracing::dispatcher::with_default(&logs, || match request {
            Some(request) => REQUEST.sync_scope(request, work),
            None => work(),
        })
    });
    job.await.unwrap_or_else(|err| resume_unwind(err.into_panic()))
}

/// The whole body: 413 past `max_bytes`, announced or counted, and 408 when it comes too slowly.
async fn read_body(req: Request<Incoming>, max_bytes: u64) -> Result<Vec<u8>, Refusal> {
    // An announced length over the limit is refused unread: no `100 Continue`, so the client sends no body.
    let expects_continue = req.headers().contains_key(header::EXPECT);
    let mut body = req.into_body();
    let mut data = Vec::with_capacity(usize::try_from(body.size_hint().lower().min(max_bytes)).unwrap_or(0));
    let read_all = async {
        while data.len() as u64 + body.size_hint().lower() <= max_bytes {
            let Some(frame) = body.frame().await else { return Ok(true) };
            data.extend_from_slice(&frame?.into_data().unwrap_or_default());
        }
        Ok::<_, hyper::Error>(false)
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read_all).await {
        Err(_) => Err(Refusal(StatusCode::REQUEST_TIMEOUT, "the body came too slowly".into())),
        Ok(Err(err)) => Err(Refusal(StatusCode::BAD_REQUEST, format!("reading the body: {err}"))),
        Ok(Ok(true)) if data.is_empty() => Err(Refusal(StatusCode::BAD_REQUEST, "empty body".into())),
        Ok(Ok(true)) => Ok(data),
        Ok(Ok(false)) => {
            if !(expects_continue && data.is_empty()) {
                linger(body);
            }
            Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("body over the limit of {max_bytes} bytes")))
        }
    }
}

/// Reads and drops what the client still sends, for a while, so that it reads the answer instead
/// of a reset: nginx's lingering close.
fn linger(mut body: Incoming) {
    let discard = async move { while let Some(Ok(_)) = body.frame().await {} };
    tokio::spawn(tokio::time::timeout(LINGER_TIME, discard));
}

/// What a POST /resize asks for, from its query, and the pixel limit it runs under.
struct ResizeJob {
    width: Option<u32>,
    height: Option<u32>,
    format: Option<ImageFormat>,
    quality: u8,
    max_pixels: u64,
}

impl ResizeJob {
    fn parse(query: &str, max_pixels: u64) -> Result<ResizeJob, String> {
        let mut job = ResizeJob { width: None, height: None, format: None, quality: 80, max_pixels };
        // Decoded as clients encode a query: `width=%31%30` is `width=10`.
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let (name, value) = (name.as_ref(), value.as_ref());
            match name {
                "width" => job.width = Some(parse_in_range(name, value, 1..=MAX_SIDE)?),
                "height" => job.height = Some(parse_in_range(name, value, 1..=MAX_SIDE)?),
                "quality" => job.quality = parse_in_range(name, value, 1..=100)?,
                "format" => {
                    let known = ["jpeg", "png", "webp"].contains(&value);
                    let format = ImageFormat::from_extension(value).filter(|_| known);
                    let unknown = || format!("invalid format {value:?}: use jpeg, png or webp");
                    job.format = Some(format.ok_or_else(unknown)?);
                }
                _ => {}
            }
        }
        match job.width.or(job.height) {
            Some(_) => Ok(job),
            None => Err("width or height is required".into()),
        }
    }

    /// Decodes, resizes and encodes: CPU work, for a blocking thread. GIF comes out as PNG.
    fn process(&self, input: &[u8]) -> Result<(Vec<u8>, ImageFormat), Refusal> {
        let (image, input_format) = self.decode_and_fit(input)?;
        let format = match (self.format, input_format) {
            (Some(asked), _) => asked,
            (None, ImageFormat::Gif) => ImageFormat::Png,
            (None, same) => same,
        };
        let mut out = Vec::new();
        let encoded = match format {
            ImageFormat::Jpeg => encode_jpeg(image, self.quality, &mut out),
            ImageFormat::WebP => image.write_with_encoder(WebPEncoder::new_lossless(&mut out)),
            _ => image.write_with_encoder(PngEncoder::new_with_quality(
                &mut out,
                CompressionType::Fast,
                FilterType::Adaptive,
            )),
        };
        let failed = |err| Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding {format:?}: {err}"));
        encoded.map_err(failed)?;
        Ok((out, format))
    }

    /// The image decoded, resized to fit and turned upright as its EXIF says, ready to encode.
    fn decode_and_fit(&self, input: &[u8]) -> Result<(DynamicImage, ImageFormat), Refusal> {
        let format = match image::guess_format(input) {
            Ok(format @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Gif)) => {
                format
            }
            _ => {
                return Err(Refusal(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "not a JPEG, PNG, WebP or GIF".into(),
                ));
            }
        };
        let (image, orientation) = match format {
            ImageFormat::Jpeg => self.decode_jpeg(input)?,
            _ => {
                let mut reader = ImageReader::with_format(std::io::Cursor::new(input), format);
                // PNG inflates its colour profile in memory: a 1 MB file could ask for 1 GB. Its
                // decoder's own allocations (metadata and a row) get 8 MiB; the pixels are
                // bounded by `check_pixels`.
                if format == ImageFormat::Png {
                    let mut limits = image::Limits::default();
                    limits.max_alloc = Some(8 << 20);
                    reader.limits(limits);
                }
                let decoder = reader.into_decoder().map_err(undecodable)?;
                self.check_pixels(decoder.dimensions())?;
                (DynamicImage::from_decoder(decoder).map_err(undecodable)?, Orientation::NoTransforms)
            }
        };
        // 8-bit RGB or RGBA from here on: what fast_image_resize and every encoder take.
        let image = match image.color().has_alpha() {
            true => DynamicImage::from(image.into_rgba8()),
            false => DynamicImage::from(image.into_rgb8()),
        };
        let (width, height) = self.fit_inside((image.width(), image.height()), orientation);
        let mut resized = DynamicImage::new(width, height, image.color());
        // Lanczos3, with alpha premultiplied so that transparent edges keep their colour.
        let mut resizer = fast_image_resize::Resizer::new();
        resizer.resize(&image, &mut resized, None).expect("RGB8 and RGBA8 are supported");
        resized.apply_orientation(orientation);
        Ok((resized, format))
    }

    /// Decodes at the smallest DCT scale (1/8 to 1) still at least the target size, as libvips does.
    fn decode_jpeg(&self, input: &[u8]) -> Result<(DynamicImage, Orientation), Refusal> {
        let corrupt = |err| match err {
            rusty_jpeg::decode::Error::Unsupported(_) => {
                Refusal(StatusCode::UNPROCESSABLE_ENTITY, err.to_string())
            }
            _ => Refusal(StatusCode::UNPROCESSABLE_ENTITY, format!("truncated or corrupt JPEG: {err}")),
        };
        let mut decoder = rusty_jpeg::decode::Decoder::new(input);
        decoder.set_single_threaded(true); // images run one per core already
        decoder.read_info().map_err(corrupt)?;
        let info = decoder.info().expect("read_info found the frame");
        let size = (u32::from(info.width), u32::from(info.height));
        self.check_pixels(size)?;
        // A start-of-scan marker cannot occur in entropy-coded data, where a 0xFF is followed by 0:
        // this counts every scan, and at most overcounts those of an embedded thumbnail.
        let scans = memchr::memmem::find_iter(input, b"\xFF\xDA").count() as u64;
        let scanned = scans * u64::from(size.0) * u64::from(size.1);
        if scans > MAX_JPEG_SCANS || scanned > MAX_SCANNED_PIXELS {
            let limits = format!("at most {MAX_JPEG_SCANS}, and {MAX_SCANNED_PIXELS} pixels in all");
            let message = format!("a JPEG of {scans} scans of {}x{} pixels: {limits}", size.0, size.1);
            return Err(Refusal(StatusCode::UNPROCESSABLE_ENTITY, message));
        }
        let exif = decoder.exif_data().and_then(Orientation::from_exif_chunk);
        let orientation = exif.unwrap_or(Orientation::NoTransforms);
        // No larger than the stored size, which is a u16 in every JPEG.
        let (width, height) = self.fit_inside(size, orientation);
        let side = |len: u32| u16::try_from(len).unwrap_or(u16::MAX);
        let (width, height) = decoder.scale(side(width), side(height)).map_err(corrupt)?;
        let pixels = decoder.decode().map_err(corrupt)?;
        let (width, height) = (u32::from(width), u32::from(height));
        let image: Option<DynamicImage> = match info.pixel_format {
            PixelFormat::RGB24 => RgbImage::from_raw(width, height, pixels).map(Into::into),
            PixelFormat::L8 => GrayImage::from_raw(width, height, pixels).map(Into::into),
            PixelFormat::CMYK32 => RgbImage::from_raw(width, height, cmyk_to_rgb(&pixels)).map(Into::into),
            PixelFormat::L16 => None,
        };
        let unsupported =
            Refusal(StatusCode::UNPROCESSABLE_ENTITY, "a 16-bit JPEG: only 8-bit ones are read".into());
        Ok((image.ok_or(unsupported)?, orientation))
    }

    /// The stored size at which the upright image fits the box, keeping its aspect; no upscaling. A
    /// side left out means at most MAX_SIDE, so every result fits every encoder (WebP's limit is
    /// 16383 a side, JPEG's 65535).
    fn fit_inside(&self, (width, height): (u32, u32), orientation: Orientation) -> (u32, u32) {
        let turned = orientation.to_exif() >= 5; // EXIF 5 to 8 swap the axes
        let (max_width, max_height) =
            if turned { (self.height, self.width) } else { (self.width, self.height) };
        let ratio = |max: Option<u32>, len: u32| f64::from(max.unwrap_or(MAX_SIDE)) / f64::from(len);
        let scale = ratio(max_width, width).min(ratio(max_height, height)).min(1.0);
        let scaled = |len: u32| ((f64::from(len) * scale).round() as u32).max(1);
        (scaled(width), scaled(height))
    }

    /// Refuses from its header alone an image with too many pixels: a bomb gets no pixel buffer.
    fn check_pixels(&self, (width, height): (u32, u32)) -> Result<(), Refusal> {
        if u64::from(width) * u64::from(height) <= self.max_pixels {
            return Ok(());
        }
        let message = format!("image of {width}x{height} pixels, over the limit of {}", self.max_pixels);
        Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, message))
    }
}

/// JPEG with 4:2:0 chroma below quality 90, as libvips does; transparency goes on white.
fn encode_jpeg(mut image: DynamicImage, quality: u8, out: &mut Vec<u8>) -> Result<(), ImageError> {
    if let DynamicImage::ImageRgba8(rgba) = &image {
        let mut white = image::RgbaImage::from_pixel(rgba.width(), rgba.height(), Rgba([255; 4]));
        image::imageops::overlay(&mut white, rgba, 0, 0);
        image = white.into();
    }
    let rgb = image.into_rgb8();
    // At most MAX_SIDE (`fit_inside`), so within JPEG's u16.
    let side = |len: u32| u16::try_from(len).map_err(|err| ImageError::IoError(io::Error::other(err)));
    let (width, height) = (side(rgb.width())?, side(rgb.height())?);
    let encoded = rusty_jpeg::encode::Encoder::new(out, quality).encode(&rgb, width, height, ColorType::Rgb);
    encoded.map_err(|err| ImageError::IoError(io::Error::other(err)))
}

/// RGB from the decoder's CMYK, ink from 0 (none) to 255, which it gives for Adobe's inverted CMYK
/// and for YCCK alike: the conversion Pillow and libvips make when there is no colour profile.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let light = |ink: u8, black: u8| ((255 - u16::from(ink)) * (255 - u16::from(black)) / 255) as u8;
    cmyk.chunks_exact(4)
        .flat_map(|ink| [light(ink[0], ink[3]), light(ink[1], ink[3]), light(ink[2], ink[3])])
        .collect()
}

fn undecodable(err: ImageError) -> Refusal {
    let too_large = matches!(err, ImageError::Limits(_));
    let status = if too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::UNPROCESSABLE_ENTITY };
    Refusal(status, format!("cannot decode the image: {err}"))
}

// ===== End of the example endpoint.

#[cfg(test)]
mod main_test;
