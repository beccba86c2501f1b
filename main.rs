//! A minimal, production-shaped HTTP service in one file. Read it top to bottom: `main`, `run` (the
//! wiring), `route` (the endpoints), the handlers, the server loop, middleware, helpers.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering::Relaxed};
use std::{convert::Infallible, io, ops::RangeInclusive, pin::pin, process::ExitCode, task::Poll};
use std::{future::Future, future::poll_fn, net::IpAddr, net::SocketAddr, time::Duration, time::Instant};

use fast_image_resize::Resizer;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, Uri, server::conn::http1, service::service_fn};
use hyper::{body::Body as _, body::Bytes, body::Incoming, header, header::HeaderValue};
use hyper_util::{rt::TokioIo, rt::TokioTimer, server::graceful::GracefulShutdown};
use image::ImageFormat::{self, Gif, Jpeg, Png, WebP};
use image::codecs::png::{CompressionType::Fast, FilterType::Adaptive, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::metadata::Orientation::{self, NoTransforms};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageError, ImageReader, RgbImage, Rgba};
use rusty_jpeg::{decode::PixelFormat, encode::ColorType};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tracing::{Dispatch, error, info, instrument::WithSubscriber, subscriber::NoSubscriber, warn};
use tracing_subscriber::fmt::MakeWriter;

type Body = Full<Bytes>;
/// How a request is refused: the status and a message that names the problem.
type Refusal = (StatusCode, String);

/// A client that has not sent a whole request head by then is disconnected (Go's ReadHeaderTimeout).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight at shutdown may take to finish before their connections are closed.
const GRACE_PERIOD: Duration = Duration::from_secs(10);
/// An upload slower than this is refused (408) instead of holding its place in the queue.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the rest of a refused body is read and dropped, so that its client sees the 413.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// The largest width or height /resize produces.
const MAX_SIDE: u64 = 10_000;
/// Resize requests admitted per core, working or waiting for a core; past them, 503.
const QUEUE_PER_CORE: usize = 8;

#[tokio::main]
async fn main() -> ExitCode {
    let build = BuildInfo {
        version: env!("VERSION"),
        commit_hash: env!("GIT_COMMIT"),
        commit_time: env!("GIT_COMMIT_TIME"),
        dirty: env!("GIT_DIRTY") == "true",
    };
    log_panics();
    // glibc's malloc would give each image's buffers back to the kernel, then fault them in again.
    #[cfg(target_env = "gnu")] // SAFETY: mallopt only sets two thresholds; any value is allowed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
    let getenv = |key: &str| std::env::var(key).ok();
    let served = run(getenv, io::stdout, shutdown_signal, build, std::net::TcpListener::bind).await;
    served.inspect_err(|err| eprintln!("{err}")).map_or(ExitCode::FAILURE, |()| ExitCode::SUCCESS)
}

/// The build's version and last commit, embedded by build.rs; a parameter so tests choose it.
#[derive(Clone, Copy)]
struct BuildInfo {
    version: &'static str,
    commit_hash: &'static str,
    commit_time: &'static str,
    dirty: bool,
}

/// Reads the configuration, binds and serves until a `signal` resolves with its cause. All it
/// needs from the outside comes in as a parameter, so tests run the real server in-process.
async fn run<S: Future<Output = &'static str>>(
    getenv: impl Fn(&str) -> Option<String>, log_writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static,
    signal: impl Fn() -> S, build: BuildInfo,
    bind: impl FnOnce(SocketAddr) -> io::Result<std::net::TcpListener>,
) -> Result<(), String> {
    let port = env_in_range(&getenv, "PORT", 8080, 0..=65535)? as u16;
    let max_bytes = env_in_range(&getenv, "RESIZE_MAX_BYTES", 20 << 20, 1..=1 << 30)?;
    let max_pixels = env_in_range(&getenv, "RESIZE_MAX_PIXELS", 50_000_000, 1..=1 << 32)?;
    let delay = Duration::from_secs(env_in_range(&getenv, "SHUTDOWN_DELAY", 0, 0..=3600)?);
    let listener = bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .and_then(TcpListener::from_std)
        .map_err(|err| format!("listen on port {port}: {err}"))?;
    let port = listener.local_addr().map_or(port, |address| address.port()); // PORT=0 picks one
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let state = Arc::new(State {
        build,
        ready: AtomicBool::new(true),
        started: Instant::now(),
        openapi: openapi_document(build.version),
        max_bytes,
        max_pixels,
        resize_workers: Arc::new(Semaphore::new(cores)),
        resize_queue: Semaphore::new(cores * QUEUE_PER_CORE),
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
    let serving = async move {
        info!(name = env!("CARGO_PKG_NAME"), port, version = build.version, "server started");
        serve(listener, move |req| route(req, state.clone()), shutdown).await;
        Ok(())
    };
    serving.with_subscriber(json_logs(log_writer)).await
}

/// What the handlers share, computed once at start-up.
struct State {
    build: BuildInfo,
    ready: AtomicBool,
    started: Instant,
    openapi: Bytes,
    max_bytes: u64,
    max_pixels: u64,
    /// One permit per core: the images being decoded, resized or encoded.
    resize_workers: Arc<Semaphore>,
    /// Resize requests admitted, working or waiting: it bounds the memory their bodies hold.
    resize_queue: Semaphore,
}

/// The single source of truth for the endpoints; a test checks that openapi.yaml agrees.
async fn route(req: Request<Incoming>, state: Arc<State>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => handle_health(&state),
        (&Method::GET, "/openapi.yaml") => handle_openapi(&state),
        (&Method::POST, "/resize") => handle_resize(req, &state)
            .await
            .unwrap_or_else(|(status, message)| error_response(status, &message)),
        (_, "/health" | "/openapi.yaml") => method_not_allowed("GET"),
        (_, "/resize") => method_not_allowed("POST"),
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Reports readiness, the build and the uptime, with kickstart.go's keys so one dashboard reads both.
fn handle_health(state: &State) -> Response<Body> {
    let (build, ready) = (&state.build, state.ready.load(Relaxed));
    let body = serde_json::json!({
        "status": if ready { "pass" } else { "fail" }, "uptime": go_duration(state.started.elapsed()),
        "version": build.version, "lastCommitHash": build.commit_hash, "lastCommitTime": build.commit_time,
        "dirtyBuild": build.dirty,
    })
    .to_string();
    response(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, "application/json", body)
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

/// Resizes the image in the body to fit inside `width`×`height`; openapi.yaml has the details.
async fn handle_resize(req: Request<Incoming>, state: &State) -> Result<Response<Body>, Refusal> {
    let busy = |_| (StatusCode::SERVICE_UNAVAILABLE, "too many images in flight".to_owned());
    let _admitted = state.resize_queue.try_acquire().map_err(busy)?;
    // The query is checked once the body is read: a client still sending gets its 400, not a reset.
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = read_body(req, state.max_bytes).await?;
    let job = Resize::parse(&query, state.max_pixels).map_err(|text| (StatusCode::BAD_REQUEST, text))?;
    let working = state.resize_workers.clone().acquire_owned().await.expect("the semaphore stays open");
    // The blocking thread logs to this request's logger; a panic there goes on to `recover` (500).
    // The permit goes with the job: an image keeps its core until it is done, even if its client left.
    let logs = tracing::dispatcher::get_default(Dispatch::clone);
    let answer = tokio::task::spawn_blocking(move || {
        let _working = working;
        tracing::dispatcher::with_default(&logs, || job.run(&body))
    });
    let (image, format) = answer.await.unwrap_or_else(|err| resume_unwind(err.into_panic()))?;
    Ok(response(StatusCode::OK, format.to_mime_type(), image))
}

/// The whole body: 413 past `max_bytes`, announced or counted, and 408 when it comes too slowly.
async fn read_body(req: Request<Incoming>, max_bytes: u64) -> Result<Vec<u8>, Refusal> {
    // An announced length over the limit is refused unread: no `100 Continue`, so the client sends no body.
    let expects_continue = req.headers().contains_key(header::EXPECT);
    let mut body = req.into_body();
    let mut data = Vec::with_capacity(body.size_hint().lower().min(max_bytes) as usize);
    let read_all = async {
        while data.len() as u64 + body.size_hint().lower() <= max_bytes {
            let Some(frame) = body.frame().await else { return Ok(true) };
            data.extend_from_slice(&frame?.into_data().unwrap_or_default());
        }
        Ok::<_, hyper::Error>(false)
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read_all).await {
        Err(_) => Err((StatusCode::REQUEST_TIMEOUT, "the body came too slowly".into())),
        Ok(Err(err)) => Err((StatusCode::BAD_REQUEST, format!("reading the body: {err}"))),
        Ok(Ok(true)) if data.is_empty() => Err((StatusCode::BAD_REQUEST, "empty body".into())),
        Ok(Ok(true)) => Ok(data),
        Ok(Ok(false)) => {
            // Drop what the client still sends, for a while, so it sees the 413: nginx's lingering close.
            if !(expects_continue && data.is_empty()) {
                let discard = async move { while let Some(Ok(_)) = body.frame().await {} };
                tokio::spawn(tokio::time::timeout(LINGER_TIME, discard));
            }
            Err((StatusCode::PAYLOAD_TOO_LARGE, format!("body over the limit of {max_bytes} bytes")))
        }
    }
}

/// What POST /resize asks for, from its query, and the pixel limit it runs under.
struct Resize {
    width: Option<u32>,
    height: Option<u32>,
    format: Option<ImageFormat>,
    quality: u8,
    max_pixels: u64,
}

impl Resize {
    fn parse(query: &str, max_pixels: u64) -> Result<Resize, String> {
        let mut job = Resize { width: None, height: None, format: None, quality: 80, max_pixels };
        for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
            let number = |max| parse_in_range(name, value, 1..=max);
            match name {
                "width" => job.width = Some(number(MAX_SIDE)? as u32),
                "height" => job.height = Some(number(MAX_SIDE)? as u32),
                "quality" => job.quality = number(100)? as u8,
                "format" if ["jpeg", "png", "webp"].contains(&value) => {
                    job.format = ImageFormat::from_extension(value);
                }
                "format" => return Err(format!("invalid format {value:?}: use jpeg, png or webp")),
                _ => {}
            }
        }
        job.width.or(job.height).map(|_| job).ok_or_else(|| "width or height is required".into())
    }

    /// Decodes, resizes and encodes: CPU work, for a blocking thread. GIF comes out as PNG.
    fn run(&self, input: &[u8]) -> Result<(Vec<u8>, ImageFormat), Refusal> {
        let (image, input_format) = self.decode_and_fit(input)?;
        let format = self.format.unwrap_or(if input_format == Gif { Png } else { input_format });
        let mut out = Vec::new();
        let encoded = match format {
            Jpeg => encode_jpeg(image, self.quality, &mut out),
            WebP => image.write_with_encoder(WebPEncoder::new_lossless(&mut out)),
            _ => image.write_with_encoder(PngEncoder::new_with_quality(&mut out, Fast, Adaptive)),
        };
        encoded.map_err(|err| (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {err}")))?;
        Ok((out, format))
    }

    /// The image decoded, resized to fit and turned upright as its EXIF says, ready to encode.
    fn decode_and_fit(&self, input: &[u8]) -> Result<(DynamicImage, ImageFormat), Refusal> {
        let format = match image::guess_format(input) {
            Ok(format @ (Jpeg | Png | WebP | Gif)) => format,
            _ => return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "not a JPEG, PNG, WebP or GIF".into())),
        };
        let (image, orientation) = match format {
            Jpeg => self.decode_jpeg(input)?,
            _ => {
                let reader = ImageReader::with_format(std::io::Cursor::new(input), format);
                let decoder = reader.into_decoder().map_err(undecodable)?;
                self.check_pixels(decoder.dimensions())?;
                (DynamicImage::from_decoder(decoder).map_err(undecodable)?, NoTransforms)
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
        Resizer::new().resize(&image, &mut resized, None).expect("RGB8 and RGBA8 are supported");
        resized.apply_orientation(orientation);
        Ok((resized, format))
    }

    /// Decodes at the smallest DCT scale (1/8 to 1) still at least the target size, as libvips does.
    fn decode_jpeg(&self, input: &[u8]) -> Result<(DynamicImage, Orientation), Refusal> {
        let corrupt = |err| (StatusCode::UNPROCESSABLE_ENTITY, format!("truncated or corrupt JPEG: {err}"));
        let mut decoder = rusty_jpeg::decode::Decoder::new(input);
        decoder.set_single_threaded(true); // images run one per core already
        decoder.read_info().map_err(corrupt)?;
        let info = decoder.info().expect("read_info found the frame");
        let size = (u32::from(info.width), u32::from(info.height));
        self.check_pixels(size)?;
        let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk).unwrap_or(NoTransforms);
        let (width, height) = self.fit_inside(size, orientation);
        let (width, height) = decoder.scale(width as u16, height as u16).map_err(corrupt)?;
        let (width, height, pixels) = (width.into(), height.into(), decoder.decode().map_err(corrupt)?);
        let image: Option<DynamicImage> = match info.pixel_format {
            PixelFormat::RGB24 => RgbImage::from_raw(width, height, pixels).map(Into::into),
            PixelFormat::L8 => GrayImage::from_raw(width, height, pixels).map(Into::into),
            _ => None,
        };
        let unsupported = (StatusCode::UNSUPPORTED_MEDIA_TYPE, "only 8-bit RGB or grey JPEGs".into());
        Ok((image.ok_or(unsupported)?, orientation))
    }

    /// The stored size at which the upright image fits the box, keeping its aspect; no upscaling.
    fn fit_inside(&self, (width, height): (u32, u32), orientation: Orientation) -> (u32, u32) {
        let turned = orientation.to_exif() >= 5; // EXIF 5 to 8 swap the axes
        let (max_w, max_h) = if turned { (self.height, self.width) } else { (self.width, self.height) };
        let ratio = |max: Option<u32>, len: u32| max.map_or(1.0, |max| f64::from(max) / f64::from(len));
        let scale = ratio(max_w, width).min(ratio(max_h, height)).min(1.0);
        let scaled = |len: u32| ((f64::from(len) * scale).round() as u32).max(1);
        (scaled(width), scaled(height))
    }

    /// Refuses from its header alone an image with too many pixels: a bomb gets no pixel buffer.
    fn check_pixels(&self, (width, height): (u32, u32)) -> Result<(), Refusal> {
        let too_many = u64::from(width) * u64::from(height) > self.max_pixels;
        let message = format!("image of {width}x{height} pixels, over the limit of {}", self.max_pixels);
        if too_many { Err((StatusCode::PAYLOAD_TOO_LARGE, message)) } else { Ok(()) }
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
    let (width, height) = (rgb.width() as u16, rgb.height() as u16);
    let encoded = rusty_jpeg::encode::Encoder::new(out, quality).encode(&rgb, width, height, ColorType::Rgb);
    encoded.map_err(|err| ImageError::IoError(io::Error::other(err)))
}

fn undecodable(err: ImageError) -> Refusal {
    let too_large = matches!(err, ImageError::Limits(_));
    let status = if too_large { StatusCode::PAYLOAD_TOO_LARGE } else { StatusCode::UNPROCESSABLE_ENTITY };
    (status, format!("cannot decode the image: {err}"))
}

/// Serves HTTP/1.1 until `shutdown` resolves, then lets requests in flight finish for GRACE_PERIOD.
async fn serve<F: Future<Output = Response<Body>> + Send + 'static>(
    listener: TcpListener, handler: impl Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    shutdown: impl Future<Output = &'static str>,
) {
    let mut http = http1::Builder::new();
    // Without a timer, hyper silently ignores the header read timeout.
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let (graceful, mut connections, mut shutdown) = (GracefulShutdown::new(), JoinSet::new(), pin!(shutdown));
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
async fn access_log<F: Future<Output = Response<Body>>>(
    ip: IpAddr, req: Request<Incoming>, handler: impl FnOnce(Request<Incoming>) -> F,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let res = REQUEST.scope((method.clone(), uri.clone()), recover(handler(req))).await;
    let (path, query) = (uri.path(), uri.query().unwrap_or_default());
    let (status, bytes) = (res.status().as_u16(), res.body().size_hint().lower());
    let latency_us = start.elapsed().as_micros() as u64;
    info!(method = method.as_str(), path, query, %ip, status, bytes, latency_us, "accessed");
    Ok(res)
}

tokio::task_local! {
    /// The request a task is handling, so that the panic hook can say which one panicked.
    static REQUEST: (Method, Uri);
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

/// JSON lines for a log collector: one object per line, an RFC 3339 UTC `timestamp`, the event's
/// fields at the top level.
fn json_logs(writer: impl for<'w> MakeWriter<'w> + Send + Sync + 'static) -> Dispatch {
    let json = tracing_subscriber::fmt().json().flatten_event(true).with_span_list(false);
    Dispatch::new(json.with_target(false).with_writer(writer).finish())
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
        let request = REQUEST.try_with(|(method, uri)| format!("{method} {}", uri.path())).ok();
        error!(panic = message, location, request, "panic");
    }));
}

/// Resolves with the signal's name on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes).
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = interrupt.recv() => "SIGINT", _ = terminate.recv() => "SIGTERM" }
}

/// A number from the environment, `default` where unset; set but empty counts as unset.
fn env_in_range(
    getenv: impl Fn(&str) -> Option<String>, name: &str, default: u64, range: RangeInclusive<u64>,
) -> Result<u64, String> {
    let value = getenv(name).filter(|value| !value.is_empty());
    value.map_or(Ok(default), |value| parse_in_range(name, &value, range))
}

fn parse_in_range(name: &str, value: &str, range: RangeInclusive<u64>) -> Result<u64, String> {
    let (min, max, what) = (range.start(), range.end(), name.to_lowercase());
    let number = value.parse().ok().filter(|number| range.contains(number));
    number.ok_or_else(|| format!("invalid {name} {value:?}: {what} must be between {min} and {max}"))
}

/// Hours, minutes and seconds to the millisecond ("1h2m3.456s"), as Go's time.ParseDuration reads.
fn go_duration(elapsed: Duration) -> String {
    let (secs, millis) = (elapsed.as_secs(), elapsed.subsec_millis());
    format!("{}h{}m{}.{millis:03}s", secs / 3600, secs / 60 % 60, secs % 60)
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

fn response(status: StatusCode, mime: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    res
}

#[cfg(test)]
mod main_test;
