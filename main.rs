//! A minimal, production-shaped HTTP service in one file. Read it top to bottom: `main`, `run` (the
//! wiring), `route` (the endpoints), the handlers, the middleware, the server loop, logging, helpers.
//! The example endpoint, `POST /resize`, comes last, fenced so that it can be deleted in one cut.

use std::time::{Duration, Instant};
use std::{convert::Infallible, fmt, io, net::IpAddr, ops::RangeInclusive, panic::AssertUnwindSafe};
use std::{pin::pin, process::ExitCode, str::FromStr, sync::Arc};

use futures_util::{FutureExt as _, future::BoxFuture};
use http_body_util::{BodyExt as _, Collected, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, rt::TokioTimer, server::graceful::GracefulShutdown};
use tokio::net::TcpListener;
use tracing::{Dispatch, Event, error, info, instrument::WithSubscriber, warn};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::{Registry, fmt::FmtContext, fmt::FormatEvent, fmt::MakeWriter};

type Body = Full<Bytes>;
/// What a handler answers: a response, or a refusal that `recover` turns into its JSON error.
type Answer = Result<Response<Body>, Refusal>;

/// A client that has not sent a whole request head by then is disconnected (Go's ReadHeaderTimeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight at shutdown may take to finish before their connections are closed.
const GRACE_PERIOD: Duration = Duration::from_secs(10);
/// The largest body `read_body` reads: a longer one is refused (413), unread when its length is announced.
const MAX_BODY_BYTES: usize = 20 << 20;
/// A body that comes slower than this is refused (408) instead of holding its memory and its handler.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
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
    let served = run(getenv, io::stdout, shutdown_signal(), build).await;
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

/// Serves until `shutdown` resolves with its cause; every outside input is a parameter, for tests.
async fn run(
    getenv: impl Fn(&str) -> Option<String>, log_writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static,
    shutdown: impl Future<Output = &'static str>, build: BuildInfo,
) -> Result<(), String> {
    let port = getenv("PORT").filter(|port| !port.is_empty()); // set but empty counts as unset
    let port = port.map_or(Ok(8080), |port| parse_in_range("PORT", &port, 0..=65535))?;
    let bound = TcpListener::bind(("0.0.0.0", port)).await;
    let listener = bound.map_err(|err| format!("listen on port {port}: {err}"))?;
    let port = listener.local_addr().map_or(port, |address| address.port()); // PORT=0 lets the system pick
    let state = Arc::new(State { build, started: Instant::now(), resize: ResizeEndpoint::new() });
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
    started: Instant,
    resize: ResizeEndpoint,
}

/// The one list of endpoints (a test checks openapi.yaml against it); GET answers HEAD, as in Go. Each
/// arm names the route's pattern, the access line's bounded `route`, before its handler runs.
fn route(req: Request<Incoming>, state: &State) -> (&'static str, BoxFuture<'_, Answer>) {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/health" if get => ("/health", handle_health(state).boxed()),
        "/health" => ("/health", method_not_allowed("GET, HEAD").boxed()),
        "/openapi.yaml" if get => ("/openapi.yaml", handle_openapi().boxed()),
        "/openapi.yaml" => ("/openapi.yaml", method_not_allowed("GET, HEAD").boxed()),
        "/resize" if req.method() == Method::POST => ("/resize", state.resize.handle(req).boxed()),
        "/resize" => ("/resize", method_not_allowed("POST").boxed()),
        _ => ("unmatched", async { Err(Refusal(StatusCode::NOT_FOUND, "not found".into())) }.boxed()),
    }
}

/// The build and the uptime ("3723.456s", which Go's time.ParseDuration reads), no map per probe.
async fn handle_health(state: &State) -> Answer {
    #[derive(serde::Serialize)]
    struct Health<'a> {
        status: &'static str,
        uptime: String,
        #[serde(flatten)]
        build: &'a BuildInfo,
    }
    let uptime = format!("{:.3?}", state.started.elapsed());
    let health = Health { status: "pass", uptime, build: &state.build };
    Ok(response(StatusCode::OK, "application/json", serde_json::to_vec(&health).expect("strings and a bool")))
}

/// openapi.yaml, compiled in. The folder is the file: the root would have rust-embed walk target/.
#[derive(rust_embed::Embed)]
#[folder = "openapi.yaml"]
#[prefix = "openapi.yaml"]
struct OpenApiFile;

async fn handle_openapi() -> Answer {
    let file = OpenApiFile::get("openapi.yaml").expect("openapi.yaml is embedded at build time");
    Ok(response(StatusCode::OK, "application/yaml", file.data.into_owned()))
}

/// 405 with the `Allow` header that RFC 9110 requires.
async fn method_not_allowed(allow: &'static str) -> Answer {
    let mut res = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    Ok(res)
}

/// Middleware: the request's id (see `request_id`), on every line logged for it and in `x-request-id`,
/// and its canonical log line, from which Fluent Bit derives the metrics; `recover` runs inside it.
async fn observe<'a>(
    req: Request<Incoming>, peer: IpAddr,
    route: impl FnOnce(Request<Incoming>) -> (&'static str, BoxFuture<'a, Answer>),
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let id = request_id(req.headers());
    let method = req.method().clone();
    let uri = req.uri().clone();
    let (route, handler) = route(req);
    let mut res = REQUEST_ID.scope(id.clone(), recover(handler)).await;
    let latency = start.elapsed();
    info!(
        request_id = id.to_str().unwrap_or_default(), // after the scope: the id is this line's own field
        method = method.as_str(),
        route,
        path = uri.path(),
        query = uri.query().unwrap_or_default(),
        ip = %peer,
        status = res.status().as_u16(),
        bytes = if method == Method::HEAD { 0 } else { res.body().size_hint().lower() },
        latency_us = latency.as_micros() as u64,
        latency_s = latency.as_secs_f64(), // what Fluent Bit's latency histogram reads
        "accessed"
    );
    res.headers_mut().insert(X_REQUEST_ID, id);
    Ok(res)
}

tokio::task_local! {
    /// The id of the request being served, which `json_line` puts on each line logged for it.
    static REQUEST_ID: HeaderValue;
}

/// The client's `x-request-id` when it is 1 to 128 visible ASCII characters, else 32 random hex digits.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let visible =
        |id: &&HeaderValue| (1..=128).contains(&id.len()) && id.as_bytes().iter().all(u8::is_ascii_graphic);
    headers.get(X_REQUEST_ID).filter(visible).cloned().unwrap_or_else(|| {
        HeaderValue::try_from(format!("{:032x}", fastrand::u128(..))).expect("hex digits are a header value")
    })
}

/// Middleware: a refusal becomes its JSON error, and a panic a 500 that reveals nothing (the panic
/// hook logs it), so the connection keeps serving.
async fn recover(handler: impl Future<Output = Answer>) -> Response<Body> {
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(Ok(res)) => res,
        Ok(Err(Refusal(status, message))) => error_response(status, &message),
        Err(_panic) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"),
    }
}

/// Serves HTTP/1.1 until `shutdown` resolves, then lets requests in flight finish for GRACE_PERIOD;
/// connections still open then close when the process exits.
async fn serve<F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static>(
    listener: TcpListener, handler: impl Fn(Request<Incoming>, IpAddr) -> F + Clone + Send + 'static,
    shutdown: impl Future<Output = &'static str>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT); // without a timer, no timeout
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    let cause = loop {
        let (stream, peer) = tokio::select! {
            cause = &mut shutdown => break cause,
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
        tokio::spawn(connection.with_current_subscriber());
    };
    info!(cause, "shutting down");
    drop(listener);
    match tokio::time::timeout(GRACE_PERIOD, graceful.shutdown()).await {
        Ok(()) => info!("server stopped"),
        Err(_) => warn!("server stopped, closing connections still open"),
    }
}

/// JSON lines for a log collector: one object per line, an RFC 3339 UTC `timestamp`, the event's
/// fields at the top level and, on the lines of a request, its `request_id`.
fn json_logs(writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static) -> Dispatch {
    let logs = tracing_subscriber::fmt().fmt_fields(JsonFields::new()).with_writer(writer);
    Dispatch::new(logs.event_format(json_line as fn(&FmtContext<_, _>, Writer, &Event) -> _).finish())
}

/// tracing-subscriber's JSON line (a `fn` is a `FormatEvent`), led by `request_id` while a request is
/// served: a span would nest the id under `span`, and json-subscriber, which flattens, cost 18% more.
fn json_line(ctx: &FmtContext<Registry, JsonFields>, mut line: Writer, event: &Event) -> fmt::Result {
    let json = tracing_subscriber::fmt::format().json().flatten_event(true).with_target(false);
    let Ok(id) = REQUEST_ID.try_with(HeaderValue::clone) else {
        return json.format_event(ctx, line, event);
    };
    let mut fields = String::new();
    json.format_event(ctx, Writer::new(&mut fields), event)?;
    let fields = fields.strip_prefix('{').unwrap_or(&fields);
    write!(line, "{{\"request_id\":{},{fields}", serde_json::json!(id.to_str().unwrap_or_default()))
}

/// Logs panics as JSON lines with their message and location; outside `run`, the default hook prints them.
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

/// A number within `range`, or an error that names the setting or parameter and the range.
fn parse_in_range<T: FromStr + PartialOrd + fmt::Display>(
    name: &str, value: &str, range: RangeInclusive<T>,
) -> Result<T, String> {
    let number = value.parse().ok().filter(|number| range.contains(number));
    let (min, max) = range.into_inner();
    number.ok_or_else(|| format!("invalid {name} {value:?}: must be between {min} and {max}"))
}

/// The whole body, for any handler: 413 past MAX_BODY_BYTES, announced or counted, 408 when it comes
/// too slowly, 400 when empty.
#[allow(dead_code)] // a handler's tool: no warning while no route reads a body
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    let too_large =
        Refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("body over the limit of {MAX_BODY_BYTES} bytes"));
    // Refused unread: a client that waits for `100 Continue` is not asked for the body.
    if req.body().size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(too_large);
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, body).await.map(|read| read.map(Collected::to_bytes)) {
        Err(_) => Err(Refusal(StatusCode::REQUEST_TIMEOUT, "the body came too slowly".into())),
        Ok(Err(err)) if err.is::<LengthLimitError>() => Err(too_large),
        Ok(Err(err)) => Err(Refusal(StatusCode::BAD_REQUEST, format!("reading the body: {err}"))),
        Ok(Ok(body)) if body.is_empty() => Err(Refusal(StatusCode::BAD_REQUEST, "empty body".into())),
        Ok(Ok(body)) => Ok(body),
    }
}

/// A request refused: its status and the message the client reads as `{"error": message}`.
struct Refusal(StatusCode, String);

/// The one error shape of the service: `{"error": "..."}`.
fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    response(status, "application/json", serde_json::json!({ "error": message }).to_string())
}

fn response(status: StatusCode, mime: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let res = Response::builder().status(status).header(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    res.body(Full::new(body.into())).expect("a status and a header that are valid already")
}

// ===== The example endpoint, POST /resize, to the end marker. To remove it, delete this section, its
// two lines in `route`, its field in `State` and its line in `run`, and its crates.

use image::ImageFormat::{self, Jpeg, Png};
use image::codecs::png::{CompressionType::Fast, FilterType::Adaptive, PngEncoder};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage, metadata::Orientation};
use rusty_jpeg::{decode::PixelFormat, encode::ColorType};
use tokio::sync::Semaphore;

/// The most pixels (width × height) an image may have, read from its header before any pixel buffer.
const MAX_PIXELS: u64 = 50_000_000;
/// The largest width or height produced, and what a side left out of the query means.
const MAX_SIDE: u32 = 10_000;
/// Each scan of a progressive JPEG is a pass over every block; encoders write about 10.
const MAX_JPEG_SCANS: u64 = 100;
/// The pixels of all a JPEG's scans together: a 50-megapixel photo may have 12, a 12-megapixel one 50.
const MAX_SCANNED_PIXELS: u64 = 600_000_000;
/// Resize requests admitted per core, working or waiting for a core; past them, 503.
const QUEUE_PER_CORE: usize = 8;

/// POST /resize: its queue and its workers.
struct ResizeEndpoint {
    queue: Semaphore,   // a place per request admitted: it bounds the memory their bodies hold
    workers: Semaphore, // a permit per core, for the image being decoded, resized and encoded
}

impl ResizeEndpoint {
    fn new() -> ResizeEndpoint {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        // glibc's malloc: keep freed image buffers, not fault them in again, in an arena per core at most.
        #[cfg(target_env = "gnu")] // SAFETY: mallopt only sets limits; any value is allowed.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_ARENA_MAX, cores as i32);
        }
        let queue = Semaphore::new(cores * QUEUE_PER_CORE);
        ResizeEndpoint { queue, workers: Semaphore::new(cores) }
    }

    /// Resizes the image in the body to fit inside `width`×`height`; openapi.yaml has the details.
    async fn handle(&self, req: Request<Incoming>) -> Answer {
        let Ok(_place) = self.queue.try_acquire() else {
            let mut res = error_response(StatusCode::SERVICE_UNAVAILABLE, "too many images in flight");
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Ok(res);
        };
        // A bad query is refused once the body is read: a client still sending reads the 400, not a reset.
        let job = ResizeJob::parse(req.uri().query().unwrap_or_default());
        let body = read_body(req).await?;
        let job = job.map_err(|message| Refusal(StatusCode::BAD_REQUEST, message))?;
        let _working = self.workers.acquire().await.expect("the semaphore is never closed");
        // CPU work: tokio moves this thread's other tasks away, and the request's logs and id stay.
        let (image, format) = tokio::task::block_in_place(|| job.process(&body))?;
        Ok(response(StatusCode::OK, format.to_mime_type(), image))
    }
}

/// The box a POST /resize asks the image to fit in.
struct ResizeJob {
    width: u32,
    height: u32,
}

impl ResizeJob {
    /// Reads `width` and `height`, percent-decoded as clients encode a query (`%31%30` is 10).
    fn parse(query: &str) -> Result<ResizeJob, String> {
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
        Ok(ResizeJob { width: width.unwrap_or(MAX_SIDE), height: height.unwrap_or(MAX_SIDE) })
    }

    /// Decodes, resizes and encodes in the input's format: CPU work, for a blocking thread.
    fn process(&self, input: &[u8]) -> Result<(Vec<u8>, ImageFormat), Refusal> {
        let (image, orientation, format) = match image::guess_format(input) {
            Ok(Jpeg) => self.decode_jpeg(input)?,
            Ok(Png) => decode_png(input)?,
            _ => return Err(Refusal(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not a JPEG or PNG image".into())),
        };
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
        if format == Jpeg {
            // Quality 80, with 4:2:0 chroma (the encoder's default below 90) as libvips writes it.
            let encoder = rusty_jpeg::encode::Encoder::new(&mut out, 80);
            let side = |len: u32| u16::try_from(len).expect("at most MAX_SIDE");
            let (width, height) = (side(resized.width()), side(resized.height()));
            encoder.encode(resized.as_bytes(), width, height, ColorType::Rgb).expect("RGB8 encodes");
        } else {
            let encoder = PngEncoder::new_with_quality(&mut out, Fast, Adaptive);
            resized.write_with_encoder(encoder).expect("RGB8 or RGBA8 encodes");
        }
        Ok((out, format))
    }

    /// Decodes at the smallest DCT scale (1/8 to 1) still at least the target size, as libvips does.
    fn decode_jpeg(&self, input: &[u8]) -> Result<(DynamicImage, Orientation, ImageFormat), Refusal> {
        let refused = |message| Refusal(StatusCode::UNPROCESSABLE_ENTITY, message);
        let corrupt = |err| refused(format!("cannot decode the JPEG: {err}"));
        let mut decoder = rusty_jpeg::decode::Decoder::new(input);
        decoder.set_single_threaded(true); // images run one per core already
        decoder.read_info().map_err(corrupt)?;
        let info = decoder.info().expect("read_info found the frame");
        let size = (u32::from(info.width), u32::from(info.height));
        check_pixels(size)?;
        // A start-of-scan marker cannot occur in entropy-coded data: this counts every scan.
        let scans = memchr::memmem::find_iter(input, b"\xFF\xDA").count() as u64;
        if scans > MAX_JPEG_SCANS || scans * u64::from(size.0) * u64::from(size.1) > MAX_SCANNED_PIXELS {
            let limits = format!("at most {MAX_JPEG_SCANS}, and {MAX_SCANNED_PIXELS} pixels in all");
            let message = format!("a JPEG of {scans} scans of {}x{} pixels: {limits}", size.0, size.1);
            return Err(refused(message));
        }
        if !matches!(info.pixel_format, PixelFormat::RGB24 | PixelFormat::L8) {
            return Err(refused("a CMYK, YCCK or 16-bit JPEG: only 8-bit grey and RGB are read".into()));
        }
        let exif = decoder.exif_data().and_then(Orientation::from_exif_chunk);
        let orientation = exif.unwrap_or(Orientation::NoTransforms);
        let (width, height) = self.fit_inside(size, orientation);
        let side = |len: u32| u16::try_from(len).unwrap_or(u16::MAX); // never larger than the stored u16
        // The scale is the smallest that reaches the request in one axis: ask of the longer, so both do.
        let request = if size.0 >= size.1 { (side(width), u16::MAX) } else { (u16::MAX, side(height)) };
        let scaled = decoder.scale(request.0, request.1).map_err(corrupt)?;
        let (width, height) = (u32::from(scaled.0), u32::from(scaled.1));
        let pixels = decoder.decode().map_err(corrupt)?;
        let image = match info.pixel_format {
            PixelFormat::L8 => GrayImage::from_raw(width, height, pixels).map(DynamicImage::from),
            _ => RgbImage::from_raw(width, height, pixels).map(DynamicImage::from),
        };
        let image = image.ok_or_else(|| refused("the JPEG decoded to too few pixels".into()))?;
        Ok((image, orientation, Jpeg))
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
}

/// A PNG and its EXIF orientation; too many pixels are refused from the header.
fn decode_png(input: &[u8]) -> Result<(DynamicImage, Orientation, ImageFormat), Refusal> {
    let corrupt = |err| Refusal(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot decode the PNG: {err}"));
    let mut reader = ImageReader::with_format(io::Cursor::new(input), Png);
    // A colour profile is inflated in memory: 1 MB could ask for 1 GB. The decoder's own
    // allocations (metadata, a row) get 8 MiB; `check_pixels` bounds the pixels.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(8 << 20);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    check_pixels(decoder.dimensions())?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    Ok((DynamicImage::from_decoder(decoder).map_err(corrupt)?, orientation, Png))
}

/// Refuses from its header alone an image with too many pixels: a bomb gets no pixel buffer.
fn check_pixels((width, height): (u32, u32)) -> Result<(), Refusal> {
    if u64::from(width) * u64::from(height) <= MAX_PIXELS {
        return Ok(());
    }
    let message = format!("image of {width}x{height} pixels, over the limit of {MAX_PIXELS}");
    Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, message))
}

// ===== End of the example endpoint.

#[cfg(test)]
mod main_test;
