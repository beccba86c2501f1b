//! A minimal, production-shaped HTTP service in one file. Read it top to bottom: `main`, `run` (the
//! wiring), `route` (the endpoints), the handlers, the middleware, the server loop, logging, helpers.
//! The example endpoint, `POST /resize`, comes last, fenced so that it can be deleted in one cut.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed};
use std::time::{Duration, Instant};
use std::{convert::Infallible, fmt::Display, future::Future, future::poll_fn, io, pin::pin, task::Poll};
use std::{net::IpAddr, ops::RangeInclusive, process::ExitCode, str::FromStr};

use http_body_util::Full;
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, rt::TokioTimer, server::graceful::GracefulShutdown};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{Dispatch, Event, error, info, instrument::WithSubscriber, warn};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, MakeWriter, format::JsonFields, format::Writer};

type Body = Full<Bytes>;

/// A client that has not sent a whole request head by then is disconnected (Go's ReadHeaderTimeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight at shutdown may take to finish before their connections are closed.
const GRACE_PERIOD: Duration = Duration::from_secs(10);
/// A constant, so the name is not parsed again for every request.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[tokio::main]
async fn main() -> ExitCode {
    let build = BuildInfo {
        version: env!("VERSION"),
        last_commit_hash: env!("GIT_COMMIT"),
        last_commit_time: env!("GIT_COMMIT_TIME"),
        dirty_build: env!("GIT_DIRTY") == "true",
    };
    log_panics();
    let getenv = |key: &str| std::env::var(key).ok();
    let served = run(getenv, io::stdout, shutdown_signal, build).await;
    served.inspect_err(|err| eprintln!("{err}")).map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

/// The build's version and last commit (from build.rs) under kickstart.go's keys: one dashboard reads both.
#[derive(Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BuildInfo {
    version: &'static str,
    last_commit_hash: &'static str,
    last_commit_time: &'static str,
    dirty_build: bool,
}

/// Serves until a `signal` resolves with its cause; every outside input is a parameter, for tests.
async fn run<S: Future<Output = &'static str>>(
    getenv: impl Fn(&str) -> Option<String>, log_writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static,
    signal: impl Fn() -> S, build: BuildInfo,
) -> Result<(), String> {
    let port = env_in_range(&getenv, "PORT", 8080, 0..=65535)?;
    let delay = Duration::from_secs(env_in_range(&getenv, "SHUTDOWN_DELAY", 0, 0..=3600)?);
    let resize = ResizeEndpoint::new(&getenv)?;
    let bound = TcpListener::bind(("0.0.0.0", port)).await;
    let listener = bound.map_err(|err| format!("listen on port {port}: {err}"))?;
    let port = listener.local_addr().map_or(port, |address| address.port()); // PORT=0 lets the system pick
    let openapi = openapi_document(build.version);
    let state =
        Arc::new(State { build, ready: AtomicBool::new(true), started: Instant::now(), openapi, resize });
    let draining = state.clone();
    // Kubernetes stops sending requests only a while after SIGTERM: until then, report not ready and
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
        async move { observe(req, peer, |req| route(req, &state)).await }
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
    resize: ResizeEndpoint,
}

/// The one list of endpoints (a test checks openapi.yaml against it); GET answers HEAD, as in Go.
async fn route(req: Request<Incoming>, state: &State) -> Response<Body> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/health" if get => handle_health(state),
        "/openapi.yaml" if get => handle_openapi(state),
        "/resize" if req.method() == Method::POST => state.resize.handle(req).await,
        "/health" | "/openapi.yaml" => method_not_allowed("GET, HEAD"),
        "/resize" => method_not_allowed("POST"),
        _ => not_found(),
    }
}

/// Readiness, the build and the uptime, serialized straight from a struct: no `json!` map per probe.
fn handle_health(state: &State) -> Response<Body> {
    #[derive(serde::Serialize)]
    struct Health<'a> {
        status: &'static str,
        uptime: String,
        #[serde(flatten)]
        build: &'a BuildInfo,
    }
    let ready = state.ready.load(Relaxed);
    let uptime = go_duration(state.started.elapsed());
    let health = Health { status: if ready { "pass" } else { "fail" }, uptime, build: &state.build };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    response(status, "application/json", serde_json::to_vec(&health).expect("strings and a bool"))
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

/// Middleware: gives the request its id (see `request_id`), which every log line of the request
/// carries and `x-request-id` echoes; `access_log` and `recover` run inside it.
async fn observe<F: Future<Output = Response<Body>>>(
    req: Request<Incoming>, peer: IpAddr, handler: impl FnOnce(Request<Incoming>) -> F,
) -> Result<Response<Body>, Infallible> {
    let id = request_id(req.headers());
    let header = HeaderValue::from_str(&id);
    let mut res = REQUEST_ID.scope(id, access_log(req, peer, |req| recover(handler(req)))).await;
    if let Ok(id) = header {
        res.headers_mut().insert(X_REQUEST_ID, id);
    }
    Ok(res)
}

tokio::task_local! {
    /// The id of the request a task is handling, which `JsonLine` leads each of its lines with.
    static REQUEST_ID: String;
}

/// Middleware: the request's canonical log line, from which Fluent Bit derives the metrics.
async fn access_log<F: Future<Output = Response<Body>>>(
    req: Request<Incoming>, peer: IpAddr, next: impl FnOnce(Request<Incoming>) -> F,
) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut line =
        AccessLine { start: Instant::now(), method, uri, peer, status: 499, bytes: 0, unmatched: false };
    let res = next(req).await;
    line.status = res.status().as_u16();
    line.bytes = if line.method == Method::HEAD { 0 } else { res.body().size_hint().lower() };
    line.unmatched = res.extensions().get::<Unmatched>().is_some();
    res
}

/// A request being answered, logged when dropped: hyper drops a request whose client hangs up
/// before the answer, and that one is logged too, with nginx's status for it, 499.
struct AccessLine {
    start: Instant,
    method: Method,
    uri: Uri,
    peer: IpAddr,
    status: u16,
    bytes: u64,
    unmatched: bool,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let latency = self.start.elapsed();
        info!(
            method = self.method.as_str(),
            route = if self.unmatched { "unmatched" } else { self.uri.path() },
            path = self.uri.path(),
            query = self.uri.query().unwrap_or_default(),
            ip = %self.peer,
            status = self.status,
            bytes = self.bytes,
            latency_us = latency.as_micros() as u64,
            latency_s = latency.as_secs_f64(), // what Fluent Bit's latency histogram reads
            "accessed"
        );
    }
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

/// Middleware: a panic becomes a 500 that reveals nothing (the panic hook logs it), and the
/// connection keeps serving.
async fn recover(handler: impl Future<Output = Response<Body>>) -> Response<Body> {
    let mut handler = pin!(handler);
    poll_fn(|cx| {
        catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))).unwrap_or_else(|_| {
            Poll::Ready(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"))
        })
    })
    .await
}

/// Serves HTTP/1.1 until `shutdown` resolves, then lets requests in flight finish for GRACE_PERIOD.
async fn serve<F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static>(
    listener: TcpListener, handler: impl Fn(Request<Incoming>, IpAddr) -> F + Clone + Send + 'static,
    shutdown: impl Future<Output = &'static str>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT); // without a timer, no timeout
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
                    warn!(%err, "accept failed"); // usually out of file descriptors: back off, not spin
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true); // a response goes out in one write: nothing for Nagle to batch
        let handler = handler.clone();
        let service = service_fn(move |req| handler(req, peer.ip()));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        // Awaited in a block of its own, so that a request whose client hung up is dropped, and
        // logged, where the logger is in scope, not by the runtime after the task has ended.
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

/// tracing-subscriber's JSON line, led by the request's id where there is a request, whoever logs
/// it. A span would carry the id too, at 24% more instructions per request: it is created for each
/// request, and its fields are parsed back from JSON for every line.
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
        let led_by_id = REQUEST_ID.try_with(|id| {
            let mut line = String::with_capacity(384);
            json.format_event(ctx, Writer::new(&mut line), event)?;
            let fields = line.strip_prefix('{').unwrap_or(&line);
            write!(writer, "{{\"request_id\":{id:?},{fields}")
        });
        led_by_id.unwrap_or_else(|_| json.format_event(ctx, writer, event))
    }
}

/// Logs panics as JSON lines with their message, location and request id; outside `run`, the default
/// hook prints them.
fn log_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if tracing::dispatcher::get_default(|logs| logs.is::<tracing::subscriber::NoSubscriber>()) {
            return default_hook(info);
        }
        let message = info.payload_as_str().unwrap_or("panic payload is not a string");
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        error!(panic = message, location, "panic");
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
    let lower = name.to_lowercase();
    number.ok_or_else(|| format!("invalid {name} {value:?}: {lower} must be between {min} and {max}"))
}

/// Hours, minutes and seconds to the millisecond ("1h2m3.456s"), as Go's time.ParseDuration reads.
fn go_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    format!("{}h{}m{}.{:03}s", secs / 3600, secs / 60 % 60, secs % 60, elapsed.subsec_millis())
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

/// 404, marked so that the access line's `route` is `unmatched`, not the path: a bounded metric label.
fn not_found() -> Response<Body> {
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

// ===== The example endpoint, POST /resize, to the end marker. To remove it, delete this section, its
// two lines in `route`, its field in `State` and its line in `run`, and its crates.

use http_body_util::{BodyExt, LengthLimitError, Limited};
use image::ImageFormat::{self, Gif, Jpeg, Png, WebP};
use image::codecs::png::{CompressionType::Fast, FilterType::Adaptive, PngEncoder};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageError, ImageReader, RgbImage};
use image::{codecs::webp::WebPEncoder, metadata::Orientation};
use rusty_jpeg::{decode::PixelFormat, encode::ColorType};
use std::panic::resume_unwind;
use tokio::sync::Semaphore;

/// An upload slower than this is refused (408) instead of holding its place in the queue.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the rest of a refused body is read and dropped, so that its client reads the refusal.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// The largest width or height /resize produces: within every encoder's limit (WebP's is 16383).
const MAX_SIDE: u32 = 10_000;
/// Each scan of a progressive JPEG is a pass over every block; encoders write about 10.
const MAX_JPEG_SCANS: u64 = 100;
/// The pixels of all a JPEG's scans together: a 50-megapixel photo may have 12, a 12-megapixel one 50.
const MAX_SCANNED_PIXELS: u64 = 600_000_000;
/// Resize requests admitted per core, working or waiting for a core; past them, 503.
const QUEUE_PER_CORE: usize = 8;

/// POST /resize: its limits, its queue and its workers.
struct ResizeEndpoint {
    max_bytes: usize,
    max_pixels: u64,
    queue: Semaphore, // a place per request admitted: it bounds the memory their bodies hold
    workers: Arc<Semaphore>, // a permit per core, for the image being decoded, resized and encoded
}

impl ResizeEndpoint {
    fn new(getenv: impl Fn(&str) -> Option<String>) -> Result<ResizeEndpoint, String> {
        // glibc's malloc would give each image's buffers back to the kernel, then fault them in again.
        #[cfg(target_env = "gnu")] // SAFETY: mallopt only sets two thresholds; any value is allowed.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(ResizeEndpoint {
            max_bytes: env_in_range(&getenv, "RESIZE_MAX_BYTES", 20 << 20, 1..=1 << 30)?,
            max_pixels: env_in_range(&getenv, "RESIZE_MAX_PIXELS", 50_000_000, 1..=1 << 32)?,
            queue: Semaphore::new(cores * QUEUE_PER_CORE),
            workers: Arc::new(Semaphore::new(cores)),
        })
    }

    /// Resizes the image in the body to fit inside `width`×`height`; openapi.yaml has the details.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let answer = async {
            let Ok(_place) = self.queue.try_acquire() else {
                if !req.headers().contains_key(header::EXPECT) {
                    linger(req.into_body()); // a client still sending reads the 503
                }
                return Err(Refusal(StatusCode::SERVICE_UNAVAILABLE, "too many images in flight".into()));
            };
            // The query is checked once the body is read: a client still sending gets its 400, not a reset.
            let query = req.uri().query().unwrap_or_default().to_owned();
            let body = read_body(req, self.max_bytes).await?;
            let job = ResizeJob::parse(&query, self.max_pixels)
                .map_err(|err| Refusal(StatusCode::BAD_REQUEST, err))?;
            let working = self.workers.clone().acquire_owned().await.expect("the semaphore is never closed");
            // The permit goes with the job: an image keeps its core until it is done, even if its client left.
            let resized = in_blocking_thread(move || {
                let _working = working;
                job.process(&body)
            });
            let (image, format) = resized.await?;
            Ok(response(StatusCode::OK, format.to_mime_type(), image))
        };
        answer.await.unwrap_or_else(|Refusal(status, message)| error_response(status, &message))
    }
}

/// Runs CPU-bound work on tokio's blocking pool with the request's logger and id, so that its lines
/// carry the id; a panic there goes on to `recover` (500).
async fn in_blocking_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let logs = tracing::dispatcher::get_default(Dispatch::clone);
    let id = REQUEST_ID.try_with(String::clone).ok();
    let job = tokio::task::spawn_blocking(move || {
        tracing::dispatcher::with_default(&logs, || match id {
            Some(id) => REQUEST_ID.sync_scope(id, work),
            None => work(),
        })
    });
    job.await.unwrap_or_else(|err| resume_unwind(err.into_panic()))
}

/// The whole body: 413 past `max_bytes`, announced or counted, and 408 when it comes too slowly.
async fn read_body(req: Request<Incoming>, max_bytes: usize) -> Result<Bytes, Refusal> {
    let expects_continue = req.headers().contains_key(header::EXPECT);
    let mut body = req.into_body();
    let too_large =
        Refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("body over the limit of {max_bytes} bytes"));
    // An announced length over the limit is refused unread: no `100 Continue`, so the client sends no body.
    if body.size_hint().lower() > max_bytes as u64 {
        if !expects_continue {
            linger(body);
        }
        return Err(too_large);
    }
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(&mut body, max_bytes).collect()).await;
    match read.map(|read| read.map(|data| data.to_bytes())) {
        Err(_) => Err(Refusal(StatusCode::REQUEST_TIMEOUT, "the body came too slowly".into())),
        Ok(Err(err)) if err.is::<LengthLimitError>() => {
            linger(body);
            Err(too_large)
        }
        Ok(Err(err)) => Err(Refusal(StatusCode::BAD_REQUEST, format!("reading the body: {err}"))),
        Ok(Ok(data)) if data.is_empty() => Err(Refusal(StatusCode::BAD_REQUEST, "empty body".into())),
        Ok(Ok(data)) => Ok(data),
    }
}

/// Reads and drops what the client still sends, for a while, so that it reads the answer instead
/// of a reset: nginx's lingering close.
fn linger(mut body: Incoming) {
    let discard = async move { while let Some(Ok(_)) = body.frame().await {} };
    tokio::spawn(tokio::time::timeout(LINGER_TIME, discard));
}

/// A request refused: its status and what the client reads.
struct Refusal(StatusCode, String);

/// What a POST /resize asks for and the pixel limit it runs under; a side left out means MAX_SIDE.
struct ResizeJob {
    width: u32,
    height: u32,
    max_pixels: u64,
}

impl ResizeJob {
    /// Reads `width` and `height`, percent-decoded as clients encode a query (`%31%30` is 10).
    fn parse(query: &str, max_pixels: u64) -> Result<ResizeJob, String> {
        let mut width = None;
        let mut height = None;
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "width" => width = Some(parse_in_range("width", &value, 1..=MAX_SIDE)?),
                "height" => height = Some(parse_in_range("height", &value, 1..=MAX_SIDE)?),
                _ => {}
            }
        }
        if width.is_none() && height.is_none() {
            return Err("width or height is required".into());
        }
        Ok(ResizeJob { width: width.unwrap_or(MAX_SIDE), height: height.unwrap_or(MAX_SIDE), max_pixels })
    }

    /// Decodes, resizes and encodes in the input's format (GIF gives PNG): CPU work, for a blocking thread.
    fn process(&self, input: &[u8]) -> Result<(Vec<u8>, ImageFormat), Refusal> {
        let (image, orientation, format) = self.decode(input)?;
        // 8-bit RGB or RGBA from here on: fast_image_resize's code for other pixel types stays out.
        let image = match image.color().has_alpha() {
            true => DynamicImage::from(image.into_rgba8()),
            false => DynamicImage::from(image.into_rgb8()),
        };
        let (width, height) = self.fit_inside((image.width(), image.height()), orientation);
        let mut resized = DynamicImage::new(width, height, image.color());
        // Lanczos3, with alpha premultiplied so that transparent edges keep their colour.
        fast_image_resize::Resizer::new().resize(&image, &mut resized, None).expect("RGB8 or RGBA8 resizes");
        resized.apply_orientation(orientation);
        let mut out = Vec::new();
        let encoded = match format {
            Jpeg => encode_jpeg(&resized, &mut out),
            WebP => resized.write_with_encoder(WebPEncoder::new_lossless(&mut out)),
            _ => resized.write_with_encoder(PngEncoder::new_with_quality(&mut out, Fast, Adaptive)),
        };
        encoded.expect("an image within MAX_SIDE encodes");
        Ok((out, if format == Gif { Png } else { format }))
    }

    /// The image, its EXIF orientation and its format; too many pixels are refused from the header.
    fn decode(&self, input: &[u8]) -> Result<(DynamicImage, Orientation, ImageFormat), Refusal> {
        let format = match image::guess_format(input) {
            Ok(format @ (Jpeg | Png | WebP | Gif)) => format,
            _ => {
                return Err(Refusal(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "not a JPEG, PNG, WebP or GIF".into(),
                ));
            }
        };
        if format == Jpeg
            && let Some((image, orientation)) = self.decode_jpeg(input)?
        {
            return Ok((image, orientation, format));
        }
        let mut reader = ImageReader::with_format(io::Cursor::new(input), format);
        // A PNG's colour profile is inflated in memory: 1 MB could ask for 1 GB. The decoder's own
        // allocations (metadata, a row) get 8 MiB; `check_pixels` bounds the pixels.
        if format == Png {
            let mut limits = image::Limits::default();
            limits.max_alloc = Some(8 << 20);
            reader.limits(limits);
        }
        let mut decoder = reader.into_decoder().map_err(undecodable)?;
        self.check_pixels(decoder.dimensions())?;
        let orientation = decoder.orientation().map_err(undecodable)?;
        Ok((DynamicImage::from_decoder(decoder).map_err(undecodable)?, orientation, format))
    }

    /// Decodes at the smallest DCT scale (1/8 to 1) still at least the target size, as libvips does;
    /// None for CMYK and YCCK, which the image crate's decoder turns into RGB.
    fn decode_jpeg(&self, input: &[u8]) -> Result<Option<(DynamicImage, Orientation)>, Refusal> {
        let corrupt =
            |err| Refusal(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot decode the JPEG: {err}"));
        let mut decoder = rusty_jpeg::decode::Decoder::new(input);
        decoder.set_single_threaded(true); // images run one per core already
        decoder.read_info().map_err(corrupt)?;
        let info = decoder.info().expect("read_info found the frame");
        let size = (u32::from(info.width), u32::from(info.height));
        self.check_pixels(size)?;
        // A start-of-scan marker cannot occur in entropy-coded data: this counts every scan.
        let scans = memchr::memmem::find_iter(input, b"\xFF\xDA").count() as u64;
        if scans > MAX_JPEG_SCANS || scans * u64::from(size.0) * u64::from(size.1) > MAX_SCANNED_PIXELS {
            let limits = format!("at most {MAX_JPEG_SCANS}, and {MAX_SCANNED_PIXELS} pixels in all");
            let message = format!("a JPEG of {scans} scans of {}x{} pixels: {limits}", size.0, size.1);
            return Err(Refusal(StatusCode::UNPROCESSABLE_ENTITY, message));
        }
        if !matches!(info.pixel_format, PixelFormat::RGB24 | PixelFormat::L8) {
            return Ok(None);
        }
        let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk);
        let orientation = orientation.unwrap_or(Orientation::NoTransforms);
        let (width, height) = self.fit_inside(size, orientation);
        let side = |len: u32| u16::try_from(len).unwrap_or(u16::MAX); // never larger than the stored u16
        // The scale is the smallest that reaches the request in one axis: ask of the longer, so both do.
        let request = if size.0 >= size.1 { (side(width), u16::MAX) } else { (u16::MAX, side(height)) };
        let (width, height) = decoder.scale(request.0, request.1).map_err(corrupt)?;
        let pixels = decoder.decode().map_err(corrupt)?;
        let image = match info.pixel_format {
            PixelFormat::L8 => {
                GrayImage::from_raw(width.into(), height.into(), pixels).map(DynamicImage::from)
            }
            _ => RgbImage::from_raw(width.into(), height.into(), pixels).map(DynamicImage::from),
        };
        let short = || Refusal(StatusCode::UNPROCESSABLE_ENTITY, "the JPEG decoded to too few pixels".into());
        Ok(Some((image.ok_or_else(short)?, orientation)))
    }

    /// The stored size at which the upright image fits the box, keeping its aspect; never larger.
    fn fit_inside(&self, (width, height): (u32, u32), orientation: Orientation) -> (u32, u32) {
        let turned = orientation.to_exif() >= 5; // EXIF 5 to 8 swap the axes
        let (max_width, max_height) =
            if turned { (self.height, self.width) } else { (self.width, self.height) };
        let scale = (f64::from(max_width) / f64::from(width)).min(f64::from(max_height) / f64::from(height));
        let scaled = |len: u32| ((f64::from(len) * scale.min(1.0)).round() as u32).max(1);
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

/// JPEG at quality 80, with 4:2:0 chroma (the encoder's default below 90) as libvips writes it.
fn encode_jpeg(image: &DynamicImage, out: &mut Vec<u8>) -> image::ImageResult<()> {
    let side = |len: u32| u16::try_from(len).expect("a JPEG comes from a JPEG, whose sides are u16");
    let encoder = rusty_jpeg::encode::Encoder::new(out, 80);
    let encoded = encoder.encode(image.as_bytes(), side(image.width()), side(image.height()), ColorType::Rgb);
    encoded.map_err(|err| ImageError::IoError(io::Error::other(err)))
}

fn undecodable(err: ImageError) -> Refusal {
    let too_large = matches!(err, ImageError::Limits(_));
    let status = if too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::UNPROCESSABLE_ENTITY };
    Refusal(status, format!("cannot decode the image: {err}"))
}

// ===== End of the example endpoint.

#[cfg(test)]
mod main_test;
