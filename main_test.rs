//! Tests of the real server: started through `run` (or `serve` with the same middleware, where a
//! test needs a handler of its own) on an ephemeral port and spoken to over HTTP. Log lines are the
//! readiness signals, so no test sleeps, and every wait has a timeout, so a regression fails
//! instead of hanging.

use super::*;
use http_body_util::BodyExt;
use hyper::client::conn::http1 as client;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

/// The longest any test waits for the server; in tests with a paused clock, it is virtual time
/// longer than every timeout of the server's.
const TIMEOUT: Duration = Duration::from_secs(60);

const BUILD: BuildInfo = BuildInfo {
    version: "v1.2.3-test",
    last_commit_hash: "0123456789abcdef0123456789abcdef01234567",
    last_commit_time: "2026-11-26T21:55:00Z",
    dirty_build: true,
};

#[tokio::test]
async fn health_reports_the_build_and_the_uptime() {
    let server = TestServer::start().await;
    let res = request(server.addr, Method::GET, "/health").await;

    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
    let health: Value = serde_json::from_str(res.body()).expect("JSON body");
    let uptime = health["uptime"].as_str().expect("uptime is a string");
    assert!(is_go_duration(uptime), "uptime {uptime:?} is not a duration Go's time.ParseDuration reads");
    let expected = json!({
        "status": "pass",
        "version": "v1.2.3-test",
        "uptime": uptime,
        "lastCommitHash": "0123456789abcdef0123456789abcdef01234567",
        "lastCommitTime": "2026-11-26T21:55:00Z",
        "dirtyBuild": true,
    });
    assert_eq!(health, expected);
    server.stop().await;
}

/// Served as it is in the repository, byte for byte: its `info.version` is the API's, edited by hand.
#[tokio::test]
async fn openapi_yaml_is_served_as_embedded() {
    let server = TestServer::start().await;
    let res = request(server.addr, Method::GET, "/openapi.yaml").await;

    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/yaml");
    assert_eq!(res.body(), include_str!("openapi.yaml"));
    let title = format!("\n  title: {}\n", env!("CARGO_PKG_NAME"));
    assert!(res.body().contains(&title), "info.title is not the package name");
    server.stop().await;
}

/// Fails when a route is added to `route` without being documented, or documented without
/// existing: paths are compared with route's source, methods by asking the server.
#[tokio::test]
async fn openapi_documents_exactly_the_routes_that_exist() {
    let documented = documented_routes();
    let documented_paths: BTreeSet<&str> = documented.keys().map(String::as_str).collect();
    assert_eq!(documented_paths, routed_paths(), "paths in openapi.yaml vs route()");

    let server = TestServer::start().await;
    for (pattern, documented) in &documented {
        // A parameter, `{id}` in openapi.yaml, is sent as `1`.
        let segments = pattern.split('/').map(|segment| if segment.starts_with('{') { "1" } else { segment });
        let path = &segments.collect::<Vec<_>>().join("/");
        // A GET route answers HEAD as well, as openapi.yaml's description says.
        let head = documented.iter().any(|m| m == "GET").then(|| "HEAD".to_owned());
        let methods: Vec<String> = documented.iter().cloned().chain(head).collect();
        for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            let res = request(server.addr, method.parse().expect("method"), path).await;
            if methods.iter().any(|m| m == method) {
                let status = res.status();
                let routed = status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED;
                assert!(routed, "{method} {path} is documented but answers {status}");
            } else {
                assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert_eq!(res.headers()[header::ALLOW], methods.join(", "), "{method} {path}");
                let body = if method == "HEAD" { "" } else { r#"{"error":"method not allowed"}"# };
                assert_eq!(res.body(), body, "{method} {path}");
                assert!(res.headers().contains_key(X_REQUEST_ID), "{method} {path}");
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_paths_get_a_json_404() {
    let server = TestServer::start().await;
    let res = request(server.addr, Method::GET, "/nope").await;

    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(res.body(), r#"{"error":"not found"}"#);
    assert!(res.headers().contains_key(X_REQUEST_ID));
    server.stop().await;
}

#[tokio::test]
async fn every_request_gets_an_id_from_x_request_id_or_a_new_one() {
    let server = TestServer::start().await;
    let longest = "x".repeat(128);
    let too_long = "x".repeat(129);
    let cases: [(Option<&[u8]>, Option<&str>); 8] = [
        (Some(b"req-42/\"quoted\"\\"), Some("req-42/\"quoted\"\\")),
        (Some(longest.as_bytes()), Some(&longest)),
        (Some(too_long.as_bytes()), None),
        (Some(b"has space"), None),
        (Some(b"tab\there"), None),
        (Some(b"caf\xe9"), None),
        (Some(b""), None),
        (None, None),
    ];
    let mut ids = Vec::new();
    for (sent, expected) in cases {
        let headers: Vec<(&'static str, &[u8])> = sent.map(|id| ("x-request-id", id)).into_iter().collect();
        let res = get_with(server.addr, "/health", &headers).await;
        let id = res.headers()[X_REQUEST_ID].to_str().expect("visible ASCII").to_owned();
        match expected {
            Some(expected) => assert_eq!(id, expected, "{sent:?}"),
            None => {
                let new = id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                assert!(new, "{sent:?} gave {id:?}, not 32 lowercase hex digits");
            }
        }
        ids.push(id);
    }
    let new_ids: BTreeSet<&String> =
        cases.iter().zip(&ids).filter(|(case, _)| case.1.is_none()).map(|(_, id)| id).collect();
    assert_eq!(new_ids.len(), cases.iter().filter(|case| case.1.is_none()).count(), "new ids repeat");

    let lines = server.stop().await;
    let logged: Vec<&Value> =
        lines.iter().filter(|line| line["message"] == "accessed").map(|line| &line["request_id"]).collect();
    assert_eq!(logged, ids.iter().map(|id| json!(id)).collect::<Vec<_>>().iter().collect::<Vec<_>>());
}

/// The access line is the request's canonical log line, one per request, from which the shipped
/// Fluent Bit pipeline derives the metrics: `route` is what matched or `unmatched`, so a scan of
/// random paths adds no value a metric would be labelled with.
#[tokio::test]
async fn each_request_gets_one_access_line_whose_route_is_bounded() {
    let server = TestServer::start().await;
    let sent = [("GET", "/health"), ("HEAD", "/health"), ("PUT", "/health"), ("BREW", "/openapi.yaml")];
    for (method, path) in &sent {
        request(server.addr, method.parse().expect("a method"), path).await;
    }
    let scan: Vec<String> = (0..30).map(|n| format!("/scan-{n}/{}", "x".repeat(n))).collect();
    for path in &scan {
        request(server.addr, Method::GET, path).await;
    }
    let lines = server.stop().await;

    let accessed: Vec<&Value> = lines.iter().filter(|line| line["message"] == "accessed").collect();
    let seen: Vec<(&str, &str, u64)> = accessed
        .iter()
        .map(|line| {
            let text = |key: &str| line[key].as_str().unwrap_or_else(|| panic!("{key} in {line}"));
            (text("method"), text("route"), line["status"].as_u64().expect("a status"))
        })
        .collect();
    let expected_head = [
        ("GET", "/health", 200),
        ("HEAD", "/health", 200),
        ("PUT", "/health", 405),
        ("BREW", "/openapi.yaml", 405),
    ];
    assert_eq!(seen[..sent.len()], expected_head);
    assert!(seen[sent.len()..].iter().all(|&line| line == ("GET", "unmatched", 404)), "{seen:?}");
    assert_eq!(seen.len(), sent.len() + scan.len(), "one line per request");
    let paths: Vec<&str> =
        accessed[sent.len()..].iter().map(|line| line["path"].as_str().unwrap_or("")).collect();
    assert_eq!(paths, scan, "the path itself is still on the line");
    for line in accessed {
        assert!(line["latency_us"].is_u64() && line["bytes"].is_u64(), "{line}");
        assert!(line["request_id"].is_string(), "{line}");
    }
}

/// Quotes, backslashes and UTF-8 in the path, the query and `x-request-id` are escaped, so every
/// line stays one JSON object; what hyper cannot parse (a quote in the query, bytes that are not
/// UTF-8) is refused with a 400 before any handler or line.
#[tokio::test]
async fn whatever_the_client_sends_every_line_is_json() {
    let server = TestServer::start().await;
    let targets: [&[u8]; 4] = [b"/a\"b\\c?q=\\x\\y", b"/caf\xc3\xa9?q=\xc3\xa9", b"/x?q=\"", b"/\xff"];
    let mut statuses = Vec::new();
    for target in targets {
        let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
        let head =
            [b"GET ", target, b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\nx-request-id: \"\\\r\n\r\n"];
        within("a write", stream.write_all(&head.concat())).await.expect("request");
        let mut response = Vec::new();
        within("the stream to close", stream.read_to_end(&mut response)).await.expect("a response");
        statuses.push(String::from_utf8_lossy(&response[..12]).into_owned());
    }
    assert_eq!(statuses, ["HTTP/1.1 404", "HTTP/1.1 404", "HTTP/1.1 400", "HTTP/1.1 400"]);
    let lines = server.stop().await; // each one JSON object, or the test fails
    let accessed: Vec<[&Value; 3]> = lines
        .iter()
        .filter(|line| line["message"] == "accessed")
        .map(|line| [&line["path"], &line["query"], &line["request_id"]])
        .collect();
    let quoted = [json!("/a\"b\\c"), json!("q=\\x\\y"), json!("\"\\")];
    let utf8 = [json!("/café"), json!("q=é"), json!("\"\\")];
    assert_eq!(accessed, [quoted.each_ref(), utf8.each_ref()]);
}

#[tokio::test]
async fn head_answers_wherever_get_does_with_the_headers_and_no_body() {
    let server = TestServer::start().await;
    for path in ["/health", "/openapi.yaml"] {
        let get = request(server.addr, Method::GET, path).await;
        let head = request(server.addr, Method::HEAD, path).await;
        assert_eq!(head.status(), StatusCode::OK, "{path}");
        assert_eq!(head.body(), "", "{path}");
        assert_eq!(head.headers()[header::CONTENT_TYPE], get.headers()[header::CONTENT_TYPE], "{path}");
        assert!(head.headers().contains_key(header::CONTENT_LENGTH), "{path}");
    }
    let get = request(server.addr, Method::GET, "/openapi.yaml").await;
    let head = request(server.addr, Method::HEAD, "/openapi.yaml").await;
    assert_eq!(head.headers()[header::CONTENT_LENGTH], get.body().len().to_string().as_str());
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_port_is_an_error_naming_it() {
    for bad in ["abc", "-1", "65536", "8080 "] {
        let (log_writer, _logs) = Logs::capture();
        let getenv = |key: &str| (key == "PORT").then(|| bad.to_owned());
        let result = within("run to fail", run(getenv, log_writer, std::future::pending(), BUILD)).await;
        let expected = format!("invalid PORT {bad:?}: must be between 0 and 65535");
        assert_eq!(result.expect_err(bad), expected);
    }
}

/// A port taken is an error that names it, and nothing is served. With PORT unset or empty, that
/// port is 8080, which the test holds (or something else does: either way it is taken).
#[tokio::test]
async fn a_port_in_use_is_an_error_naming_it_and_unset_or_empty_means_8080() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("bound address").port().to_string();
    let _default_taken = std::net::TcpListener::bind("0.0.0.0:8080");
    for (set, expected) in [(Some(port.as_str()), port.as_str()), (Some(""), "8080"), (None, "8080")] {
        let (log_writer, _logs) = Logs::capture();
        let getenv = |key: &str| set.filter(|_| key == "PORT").map(str::to_owned);
        let result = within("run to fail", run(getenv, log_writer, std::future::pending(), BUILD)).await;
        let message = result.expect_err("the port is taken");
        assert!(message.starts_with(&format!("listen on port {expected}: ")), "PORT={set:?}: {message}");
    }
}

#[tokio::test]
async fn logs_are_json_lines_with_one_access_line_per_request() {
    let server = TestServer::start().await;
    let server_port = server.addr.port();
    let res = request(server.addr, Method::GET, "/health?verbose=1").await;
    let body_bytes = res.body().len();
    let started = server.started.clone();
    let lines = [vec![started], server.stop().await].concat();

    // tests/stdout_logs.rs checks the timestamps against Fluent Bit's format on the real binary.
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string(), "{line}");
        assert!(line["message"].is_string(), "{line}");
    }
    let messages: Vec<&str> = lines.iter().map(|l| l["message"].as_str().unwrap_or_default()).collect();
    assert_eq!(messages, ["server started", "accessed", "shutting down", "server stopped"]);
    for outside_a_request in [&lines[0], &lines[2], &lines[3]] {
        assert!(outside_a_request.get("request_id").is_none(), "{outside_a_request}");
    }
    assert_eq!(lines[0]["name"], env!("CARGO_PKG_NAME"));
    assert_eq!(lines[0]["port"], server_port, "the port bound, which PORT=0 leaves to the system");
    assert_eq!(lines[0]["version"], "v1.2.3-test");
    let access = &lines[1];
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/health");
    assert_eq!(access["route"], "/health");
    assert_eq!(access["query"], "verbose=1");
    assert_eq!(access["ip"], "127.0.0.1");
    assert_eq!(access["status"], 200);
    assert_eq!(access["bytes"], body_bytes);
    let latency_us = access["latency_us"].as_u64().expect("latency_us, a whole number");
    let latency_s = access["latency_s"].as_f64().expect("latency_s, a number");
    assert!(latency_us.abs_diff((latency_s * 1e6).round() as u64) <= 1, "{access}");
    assert_eq!(access["request_id"], res.headers()[X_REQUEST_ID].to_str().expect("an id"));
    assert_eq!(lines[2]["cause"], "SIGTERM");
}

#[tokio::test]
async fn a_panicking_handler_gets_a_500_and_the_connection_keeps_serving() {
    let route = |req: Request<Incoming>| {
        let answer = async move {
            if req.uri().path() == "/panic" {
                panic!("secret detail");
            }
            Ok(response(StatusCode::OK, "text/plain", "ok"))
        };
        ("/test", answer.boxed())
    };
    let mut server = ServeTest::start(route).await;
    let mut connection = connect(server.addr).await;

    let res = send(&mut connection, Method::GET, "/panic").await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let id = res.headers()[X_REQUEST_ID].to_str().expect("an id").to_owned();
    assert_eq!(res.body(), r#"{"error":"internal server error"}"#);
    let res = send(&mut connection, Method::GET, "/after").await;
    assert_eq!((res.status(), res.body().as_str()), (StatusCode::OK, "ok"));

    let panic = server.logs.wait_for("panic").await;
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["panic"], "secret detail");
    let location = panic["location"].as_str().expect("location");
    assert!(location.starts_with("main_test.rs:"), "location {location}");
    let accessed = server.logs.wait_for("accessed").await;
    assert_eq!((&accessed["status"], &accessed["request_id"]), (&json!(500), &json!(id)));
    assert_eq!(accessed["route"], "/test", "a panic keeps the route's label");
    server.stop().await;
}

/// Every line written while serving a request carries its id, at the top level, once: a handler's
/// own line, a handler's panic, and a panic in CPU work moved off the runtime with `block_in_place`.
/// The lines outside a request carry none.
#[tokio::test(flavor = "multi_thread")]
async fn every_line_of_a_request_carries_its_id_and_no_other_line_does() {
    let route = |req: Request<Incoming>| {
        let answer = async move {
            match req.uri().path() {
                "/log" => info!(order = 7, "order taken"),
                "/panic" => panic!("the handler failed"),
                _ => tokio::task::block_in_place(|| panic!("the job failed")),
            }
            Ok(response(StatusCode::OK, "text/plain", "ok"))
        };
        ("/test", answer.boxed())
    };
    let mut server = ServeTest::start(route).await;
    let sent_id: &[u8] = b"order-1234/\"q\"\\";
    for (path, message) in [("/log", "order taken"), ("/panic", "panic"), ("/job", "panic")] {
        for sent in [Some(sent_id), None] {
            let headers: Vec<(&'static str, &[u8])> =
                sent.map(|id| ("x-request-id", id)).into_iter().collect();
            let res = get_with(server.addr, path, &headers).await;
            let id = res.headers()[X_REQUEST_ID].to_str().expect("visible ASCII").to_owned();
            if sent.is_some() {
                assert_eq!(id.as_bytes(), sent_id);
            }
            let line = server.logs.wait_for(message).await;
            assert_eq!(line["request_id"], json!(id), "{path} {line}");
            let accessed = server.logs.wait_for("accessed").await;
            assert_eq!(accessed["request_id"], json!(id), "{path} {accessed}");
        }
    }
    server.stop.send("SIGTERM").expect("server is running");
    for message in ["shutting down", "server stopped"] {
        let line = server.logs.wait_for(message).await;
        assert!(line.get("request_id").is_none(), "{line}");
    }
    within("serve to return", server.done).await.expect("serve returned");
}

/// The access line's `route` is the label the route named, a pattern, never the path: a route
/// with a parameter adds one metric series, not one per value.
#[tokio::test]
async fn a_route_with_a_parameter_is_labelled_with_its_pattern() {
    let route = |req: Request<Incoming>| match req.uri().path().strip_prefix("/users/") {
        Some(id) => {
            let id = id.to_owned();
            ("/users/{id}", async move { Ok(response(StatusCode::OK, "text/plain", id)) }.boxed())
        }
        None => ("unmatched", async { Err(Refusal(StatusCode::NOT_FOUND, "not found".into())) }.boxed()),
    };
    let mut server = ServeTest::start(route).await;
    for path in ["/users/1", "/users/2", "/users/%22x%22", "/nope"] {
        request(server.addr, Method::GET, path).await;
        let accessed = server.logs.wait_for("accessed").await;
        let expected = if path == "/nope" { "unmatched" } else { "/users/{id}" };
        assert_eq!((&accessed["route"], &accessed["path"]), (&json!(expected), &json!(path)));
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let route = {
        let release = release.clone();
        move |_| {
            let (started_tx, release) = (started_tx.clone(), release.clone());
            let answer = async move {
                started_tx.send(()).expect("test is waiting");
                release.notified().await;
                Ok(response(StatusCode::OK, "text/plain", "finished"))
            };
            ("/slow", answer.boxed())
        }
    };
    let mut server = ServeTest::start(route).await;
    let in_flight = tokio::spawn(request(server.addr, Method::GET, "/slow"));
    within("the handler to start", started.recv()).await.expect("handler started");

    server.stop.send("SIGTERM").expect("server is running");
    server.logs.wait_for("shutting down").await;
    assert!(within("connect", TcpStream::connect(server.addr)).await.is_err(), "still accepting");
    release.notify_one();

    let res = within("the request in flight", in_flight).await.expect("client task");
    assert_eq!((res.status(), res.body().as_str()), (StatusCode::OK, "finished"));
    assert_eq!(res.headers()[header::CONNECTION], "close");
    server.logs.wait_for("server stopped").await;
    within("serve to return", server.done).await.expect("serve returned");
}

/// After the grace period `serve` returns with a warning; the process then exits, and its
/// connections still open close with it.
#[tokio::test(start_paused = true)]
async fn shutdown_stops_waiting_for_requests_after_the_grace_period() {
    let (route, mut started) = never_answers();
    let mut server = ServeTest::start(route).await;
    let mut connection = connect(server.addr).await;
    let stuck = tokio::spawn(async move { connection.send_request(empty_request(Method::GET, "/")).await });
    within("the handler to start", started.recv()).await.expect("handler started");

    let shutdown_at = tokio::time::Instant::now();
    server.stop.send("SIGTERM").expect("server is running");
    within("serve to return", server.done).await.expect("serve returned");
    assert!(shutdown_at.elapsed() >= GRACE_PERIOD);
    server.logs.wait_for("server stopped, closing connections still open").await;
    assert!(!stuck.is_finished(), "the stuck request was answered");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let server = TestServer::start().await;
    let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
    within("a write", stream.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n")).await.expect("write");
    let sent_at = tokio::time::Instant::now();

    let mut received = Vec::new();
    let _ = within("the stream to close", stream.read_to_end(&mut received)).await; // EOF or reset: closed either way
    assert!(sent_at.elapsed() >= HEADER_READ_TIMEOUT);
    assert!(!received.starts_with(b"HTTP/1.1 200"), "served an incomplete request");
    server.stop().await;
}

/// A handler's whole body through `read_body`: its length, or the refusal.
fn route_reading_the_body(req: Request<Incoming>) -> Routed {
    let answer = async move {
        let body = read_body(req).await?;
        Ok(response(StatusCode::OK, "text/plain", body.len().to_string()))
    };
    ("/upload", answer.boxed())
}

#[tokio::test]
async fn read_body_reads_a_body_and_refuses_an_empty_one() {
    let server = ServeTest::start(route_reading_the_body).await;
    for (body, status, text) in
        [("hello", StatusCode::OK, "5"), ("", StatusCode::BAD_REQUEST, r#"{"error":"empty body"}"#)]
    {
        let mut req = empty_request(Method::POST, "/upload");
        *req.body_mut() = Full::from(body);
        let res = send_request(&mut connect(server.addr).await, req).await;
        assert_eq!((res.status(), res.body().as_ref()), (status, text.as_bytes()), "{body:?}");
    }
    server.stop().await;
}

/// A body that turns out longer than the limit once counted (chunked, so no length was announced)
/// is a 413. The client stops at the first byte over, so the server has read all it sent.
#[tokio::test]
async fn a_body_counted_over_the_limit_gets_413() {
    let server = ServeTest::start(route_reading_the_body).await;
    let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
    let over = MAX_BODY_BYTES + 1;
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n{over:x}\r\n");
    within("a write", stream.write_all(head.as_bytes())).await.expect("head");
    within("a write", stream.write_all(&vec![0; over])).await.expect("the server reads the body");
    let mut status_line = [0; 12];
    within("a read", stream.read_exact(&mut status_line)).await.expect("a response");
    assert_eq!(&status_line, b"HTTP/1.1 413");
    server.stop().await;
}

#[tokio::test]
async fn an_announced_body_over_the_limit_gets_413_and_no_100_continue() {
    let server = ServeTest::start(route_reading_the_body).await;
    let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
    let length = MAX_BODY_BYTES + 1;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    );
    within("a write", stream.write_all(head.as_bytes())).await.expect("head");
    let mut response = Vec::new();
    within("the stream to close", stream.read_to_end(&mut response))
        .await
        .expect("a response, then the connection closes");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413") && !response.contains("100 Continue"), "{response}");
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_body_that_comes_too_slowly_gets_408() {
    let server = ServeTest::start(route_reading_the_body).await;
    let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
    let head = "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\nstarted";
    within("a write", stream.write_all(head.as_bytes())).await.expect("head");
    let sent_at = tokio::time::Instant::now();

    let mut response = [0; 12];
    within("a read", stream.read_exact(&mut response)).await.expect("a response");
    assert_eq!(&response, b"HTTP/1.1 408");
    assert!(sent_at.elapsed() >= BODY_READ_TIMEOUT);
    server.stop().await;
}

/// build.rs embeds the commit being built; checked against git itself where there is a repository.
#[test]
fn build_info_is_the_commit_being_built() {
    let git = |args: &[&str]| {
        let output = std::process::Command::new("git").args(args).output().ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        eprintln!("no git repository: build.rs used GIT_COMMIT and friends");
        return;
    };
    assert_eq!(env!("GIT_COMMIT"), head);
    assert!(is_rfc3339_utc(env!("GIT_COMMIT_TIME")), "{}", env!("GIT_COMMIT_TIME"));
    let status = git(&["status", "--porcelain", "--untracked-files=no"]).expect("git status");
    assert_eq!(env!("GIT_DIRTY"), (!status.is_empty()).to_string(), "dirty flag");
}

/// A server started through `run`, as `main` starts it, but on an ephemeral port.
struct TestServer {
    addr: SocketAddr,
    /// Its first line, `server started`, which says the port it bound.
    started: Value,
    logs: Logs,
    /// Stands for SIGTERM.
    stop: oneshot::Sender<&'static str>,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

impl TestServer {
    async fn start() -> TestServer {
        log_panics_once();
        let (log_writer, mut logs) = Logs::capture();
        let (stop, stopped) = oneshot::channel();
        let sigterm = async { stopped.await.unwrap_or("test dropped") };
        let getenv = |key: &str| (key == "PORT").then(|| "0".to_owned());
        let done = tokio::spawn(run(getenv, log_writer, sigterm, BUILD));
        let started = logs.wait_for("server started").await;
        let port =
            started["port"].as_u64().and_then(|port| u16::try_from(port).ok()).expect("the port bound");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        TestServer { addr, started, logs, stop, done }
    }

    /// Sends SIGTERM's stand-in, waits until `run` returns Ok, and returns every line it logged.
    async fn stop(mut self) -> Vec<Value> {
        self.stop.send("SIGTERM").expect("server is running");
        within("run to return", self.done).await.expect("run task").expect("run returned Ok");
        std::iter::from_fn(|| self.logs.try_next()).collect()
    }
}

/// The server loop `serve` with a test's own handler, logging as `run` does.
struct ServeTest {
    addr: SocketAddr,
    logs: Logs,
    stop: oneshot::Sender<&'static str>,
    done: tokio::task::JoinHandle<()>,
}

/// What `route` returns: the route's label and its handler's answer.
type Routed = (&'static str, BoxFuture<'static, Answer>);

impl ServeTest {
    /// Serves with `route` in place of the real one, inside the real middleware.
    async fn start(route: impl Fn(Request<Incoming>) -> Routed + Clone + Send + Sync + 'static) -> ServeTest {
        log_panics_once();
        let (log_writer, logs) = Logs::capture();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = oneshot::channel();
        let shutdown = async { stopped.await.unwrap_or("test dropped") };
        let app = move |req, peer| observe(req, peer, route.clone());
        let done = tokio::spawn(serve(listener, app, shutdown).with_subscriber(json_logs(log_writer)));
        ServeTest { addr, logs, stop, done }
    }

    async fn stop(self) {
        self.stop.send("SIGTERM").expect("server is running");
        within("serve to return", self.done).await.expect("serve returned");
    }
}

/// A route whose handler never answers, and a receiver that hears each time it starts.
fn never_answers() -> (impl Fn(Request<Incoming>) -> Routed + Clone + Send + Sync, mpsc::UnboundedReceiver<()>)
{
    let (started_tx, started) = mpsc::unbounded_channel();
    let route = move |_| {
        let started_tx = started_tx.clone();
        let answer = async move {
            started_tx.send(()).expect("test is waiting");
            std::future::pending().await
        };
        ("/never", answer.boxed())
    };
    (route, started)
}

/// Logs panics as `main` does, once for the whole test binary.
fn log_panics_once() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(log_panics);
}

/// The server's log lines, each checked to be exactly one JSON object on one line.
struct Logs(mpsc::UnboundedReceiver<String>);

impl Logs {
    fn capture() -> (impl for<'w> MakeWriter<'w> + Send + Sync + 'static, Logs) {
        let (lines_tx, lines) = mpsc::unbounded_channel();
        (move || LineWriter(lines_tx.clone()), Logs(lines))
    }

    /// Reads lines until one has this message; the lines are the test's readiness signals.
    async fn wait_for(&mut self, message: &str) -> Value {
        loop {
            let next = within(&format!("a log line {message:?}"), self.0.recv()).await;
            let line = next.expect("the server logged that line");
            let line = parse_log_line(&line);
            if line["message"] == message {
                return line;
            }
        }
    }

    fn try_next(&mut self) -> Option<Value> {
        self.0.try_recv().ok().map(|line| parse_log_line(&line))
    }
}

fn parse_log_line(line: &str) -> Value {
    let one_line = line.ends_with('\n') && line.matches('\n').count() == 1;
    assert!(one_line, "not one line: {line:?}");
    assert!(line.matches(r#""request_id":"#).count() <= 1, "request_id twice: {line}");
    serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
}

/// Sends each write of the logger (one whole line) to the test.
struct LineWriter(mpsc::UnboundedSender<String>);

impl io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.send(String::from_utf8_lossy(buf).into_owned());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fails the test when `future` takes longer than TIMEOUT.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    let waited = tokio::time::timeout(TIMEOUT, future).await;
    waited.unwrap_or_else(|_| panic!("waited more than {TIMEOUT:?} for {what}"))
}

/// One request on a new connection; the body comes back as text.
async fn request(addr: SocketAddr, method: Method, path: &str) -> Response<String> {
    send(&mut connect(addr).await, method, path).await
}

/// A GET with these headers on a new connection; the body comes back as text.
async fn get_with(addr: SocketAddr, path: &str, headers: &[(&'static str, &[u8])]) -> Response<String> {
    let mut req = empty_request(Method::GET, path);
    for (name, value) in headers {
        req.headers_mut().append(*name, HeaderValue::from_bytes(value).expect("a header value"));
    }
    let res = send_request(&mut connect(addr).await, req).await;
    res.map(|body| String::from_utf8(body.to_vec()).expect("UTF-8 body"))
}

async fn connect(addr: SocketAddr) -> client::SendRequest<Body> {
    let stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
    let handshake = within("handshake", client::handshake(TokioIo::new(stream))).await;
    let (sender, connection) = handshake.expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn send(connection: &mut client::SendRequest<Body>, method: Method, path: &str) -> Response<String> {
    let res = send_request(connection, empty_request(method, path)).await;
    res.map(|body| String::from_utf8(body.to_vec()).expect("UTF-8 body"))
}

async fn send_request(connection: &mut client::SendRequest<Body>, req: Request<Body>) -> Response<Bytes> {
    let res = within("a response", connection.send_request(req)).await.expect("response");
    let (parts, body) = res.into_parts();
    let body = within("the body", body.collect()).await.expect("body");
    Response::from_parts(parts, body.to_bytes())
}

fn empty_request(method: Method, path: &str) -> Request<Body> {
    let mut req = Request::new(Full::default());
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("path");
    req.headers_mut().insert(header::HOST, HeaderValue::from_static("test"));
    req
}

/// Methods by path, as openapi.yaml's `paths:` section lists them.
fn documented_routes() -> BTreeMap<String, Vec<String>> {
    let spec = include_str!("openapi.yaml");
    let paths = spec.split("\npaths:\n").nth(1).expect("paths section");
    let mut routes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut path = String::new();
    for line in paths.lines().take_while(|line| line.is_empty() || line.starts_with(' ')) {
        let indent = line.len() - line.trim_start().len();
        match (indent, line.trim_start().strip_suffix(':')) {
            (2, Some(key)) => path = key.to_owned(),
            (4, Some(key)) if HTTP_METHODS.contains(&key) => {
                routes.entry(path.clone()).or_default().push(key.to_uppercase())
            }
            _ => {}
        }
    }
    routes
}

const HTTP_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The labels `route`'s arms name: `=> ("/path", ...)`; `unmatched` is none.
fn routed_paths() -> BTreeSet<&'static str> {
    let source = include_str!("main.rs");
    let route = source.split("\nfn route(").nth(1).expect("fn route");
    let body = route.split("\n}\n").next().expect("end of fn route");
    let labels = body.split("=> (\"").skip(1).filter_map(|arm| arm.split('"').next());
    labels.filter(|label| label.starts_with('/')).collect()
}

/// A number and a unit Go's time.ParseDuration reads, as Rust's Duration Debug format writes them.
fn is_go_duration(text: &str) -> bool {
    let number = text.trim_end_matches(|c: char| c.is_alphabetic());
    let unit = &text[number.len()..];
    number.parse::<f64>().is_ok() && ["s", "ms", "µs", "ns"].contains(&unit)
}

/// `2026-11-26T21:55:00Z`: RFC 3339 in UTC, as build.rs writes commit times.
fn is_rfc3339_utc(text: &str) -> bool {
    let pattern = "0000-00-00T00:00:00Z";
    text.len() == pattern.len()
        && text
            .chars()
            .zip(pattern.chars())
            .all(|(c, p)| matches!((c, p), ('0'..='9', '0')) || c == p && p != '0')
}

// ===== The tests of the example endpoint, POST /resize, to the end of the file: with it, delete them.

use image::{GrayImage, RgbImage, Rgba, RgbaImage};
use std::cell::Cell;
use std::panic::catch_unwind;

#[tokio::test(flavor = "multi_thread")]
async fn resize_fits_inside_the_box_keeping_the_aspect_ratio_and_never_upscales() {
    let server = TestServer::start().await;
    let photo = jpeg(300, 200, None);
    let cases = [
        ("width=150", (150, 100)),
        ("height=50", (75, 50)),
        ("width=100&height=100", (100, 67)),
        ("width=1000&height=1000", (300, 200)),
    ];
    for (query, expected) in cases {
        let res = resize(server.addr, query, photo.clone()).await;
        assert_eq!(res.status(), StatusCode::OK, "{query}");
        assert_eq!(res.headers()[header::CONTENT_TYPE], "image/jpeg", "{query}");
        let image = decoded(res.body());
        assert_eq!((image.width(), image.height()), expected, "{query}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resize_reads_jpeg_and_png_and_writes_each_back_as_it_came() {
    let server = TestServer::start().await;
    for format in [Jpeg, Png] {
        let res = resize(server.addr, "width=32", encode(&checkerboard(64, 48), format)).await;
        assert_eq!(res.status(), StatusCode::OK, "{format:?}");
        assert_eq!(res.headers()[header::CONTENT_TYPE], format.to_mime_type(), "{format:?}");
        assert_eq!(image::guess_format(res.body()).ok(), Some(format));
        let image = decoded(res.body());
        assert_eq!((image.width(), image.height()), (32, 24), "{format:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alpha_survives_in_png() {
    let server = TestServer::start().await;
    // Left half transparent, right half opaque red.
    let half =
        RgbaImage::from_fn(64, 32, |x, _| if x < 32 { Rgba([0, 0, 0, 0]) } else { Rgba([255, 0, 0, 255]) });
    let res = resize(server.addr, "width=32", encode(&DynamicImage::from(half), Png)).await;
    let output = decoded(res.body()).into_rgba8();
    let (left, right) = (output.get_pixel(2, 8).0, output.get_pixel(29, 8).0);
    assert_eq!(left[3], 0, "left {left:?}");
    assert!(right[0] > 240 && right[1] < 15 && right[3] == 255, "right {right:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jpeg_is_turned_upright_as_its_exif_orientation_says() {
    let server = TestServer::start().await;
    // Stored 200x100, left half red and right half blue; EXIF orientation 6: rotate 90° clockwise.
    let rotate_90 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0";
    let photo = jpeg(200, 100, Some(rotate_90));
    let res = resize(server.addr, "width=50&height=1000", photo).await;

    let image = decoded(res.body()).into_rgb8();
    assert_eq!(image.dimensions(), (50, 100));
    let (top, bottom) = (image.get_pixel(25, 10).0, image.get_pixel(25, 90).0);
    assert!(top[0] > 200 && top[2] < 60, "top should be red: {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "bottom should be blue: {bottom:?}");
    server.stop().await;
}

/// A side left out means at most 10000, so a narrow box on a panorama stays within the encoders'
/// limits instead of a 500 or a wrapped width.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_fits_every_encoder_whatever_the_aspect_ratio() {
    let server = TestServer::start().await;
    let panorama = |width, height, format| encode(&DynamicImage::from(RgbImage::new(width, height)), format);
    let cases = [
        (panorama(20_000, 10, Png), "height=10", Png, (10_000, 5)),
        (panorama(100_000, 1, Png), "width=10000", Png, (10_000, 1)),
        (panorama(65_535, 1, Jpeg), "height=1", Jpeg, (10_000, 1)),
    ];
    for (image, query, format, expected) in cases {
        let res = resize(server.addr, query, image).await;
        assert_eq!(res.status(), StatusCode::OK, "{query}: {}", String::from_utf8_lossy(res.body()));
        assert_eq!(image::guess_format(res.body()).ok(), Some(format));
        let output = decoded(res.body());
        assert_eq!((output.width(), output.height()), expected, "{query}");
    }
    server.stop().await;
}

/// A progressive JPEG whose last scan is repeated: each copy is a pass over every block.
#[tokio::test(flavor = "multi_thread")]
async fn a_jpeg_of_too_many_scans_is_refused_before_it_is_decoded() {
    let server = TestServer::start().await;
    let grey = GrayImage::from_fn(256, 256, |x, y| image::Luma([(x ^ y) as u8]));
    let mut progressive = Vec::new();
    let mut encoder = rusty_jpeg::encode::Encoder::new(&mut progressive, 90);
    encoder.set_progressive(true);
    encoder.encode(&grey, 256, 256, rusty_jpeg::encode::ColorType::Luma).expect("encode");
    let scans = |jpeg: &[u8]| jpeg.windows(2).filter(|pair| *pair == [0xFF, 0xDA]).count();
    let last_scan = progressive.windows(2).rposition(|pair| pair == [0xFF, 0xDA]).expect("a scan");
    let end = progressive.len() - 2; // the end-of-image marker
    let repeated = |copies| {
        let scan = &progressive[last_scan..end];
        [&progressive[..end], &scan.repeat(copies), &progressive[end..]].concat()
    };
    assert!(scans(&progressive) < 20, "an ordinary progressive JPEG has a few scans");
    let res = resize(server.addr, "width=64", progressive.clone()).await;
    assert_eq!(res.status(), StatusCode::OK, "{}", String::from_utf8_lossy(res.body()));

    let bomb = repeated(3_000);
    assert_eq!(scans(&bomb), scans(&progressive) + 3_000);
    let res = resize(server.addr, "width=64", bomb).await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let message = format!("a JPEG of {} scans of 256x256 pixels: at most 100", scans(&progressive) + 3_000);
    assert!(
        String::from_utf8_lossy(res.body()).contains(&message),
        "{}",
        String::from_utf8_lossy(res.body())
    );

    // Fewer scans, of a 49-megapixel frame: the pixels of all scans together are over the limit.
    let mut large = repeated(12);
    let frame = large.windows(2).position(|marker| marker == [0xFF, 0xC2]).expect("a progressive frame");
    large[frame + 5..frame + 9].copy_from_slice(&[7000_u16.to_be_bytes(), 7000_u16.to_be_bytes()].concat());
    let res = resize(server.addr, "width=64", large).await;
    let text = String::from_utf8_lossy(res.body());
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(text.contains("scans of 7000x7000 pixels"), "{text}");
    server.stop().await;
}

/// A small PNG whose colour profile inflates to 100 MB costs a few MB to resize, not 100: the
/// decoder caps what metadata may take. Its peak is counted on this thread, where it is decoded.
#[tokio::test(flavor = "multi_thread")]
async fn a_png_whose_metadata_inflates_to_100_mb_costs_a_few_mb() {
    let with_profile = |profile: &[u8]| {
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        io::Write::write_all(&mut zlib, profile).expect("compress");
        let iccp = [&b"bomb\0\0"[..], &zlib.finish().expect("compress")].concat();
        let png = encode(&checkerboard(64, 64), ImageFormat::Png);
        let after_header = 8 + 25; // the signature, then IHDR, which must come first
        [&png[..after_header], &png_chunk(b"iCCP", &iccp), &png[after_header..]].concat()
    };
    let bomb = with_profile(&vec![0; 100 << 20]);
    assert!(bomb.len() < 200_000, "the bomb is {} bytes", bomb.len());
    let job = ResizeJob::parse("width=32").expect("query");
    let (resized, peak) = peak_allocation(|| job.process(&bomb));
    assert!(resized.is_ok(), "the image itself is fine");
    assert!(peak < 16 << 20, "resizing the bomb held {} MiB at its peak", peak >> 20);

    let server = TestServer::start().await;
    for png in [with_profile(&[7; 4000]), bomb] {
        assert_eq!(resize(server.addr, "width=32", png).await.status(), StatusCode::OK);
    }
    server.stop().await;
}

/// CMYK and YCCK JPEGs, as print workflows write them (with Adobe's marker), are refused with a
/// 422 that names them; so is a JPEG feature the decoder lacks.
#[tokio::test(flavor = "multi_thread")]
async fn cmyk_and_ycck_jpegs_and_an_unsupported_feature_get_a_422_naming_them() {
    let server = TestServer::start().await;
    let ink = vec![128; 16 * 16 * 4];
    for color in [rusty_jpeg::encode::ColorType::Cmyk, rusty_jpeg::encode::ColorType::CmykAsYcck] {
        let mut cmyk = Vec::new();
        rusty_jpeg::encode::Encoder::new(&mut cmyk, 95).encode(&ink, 16, 16, color).expect("encode");
        let res = resize(server.addr, "width=8", cmyk).await;
        let text = String::from_utf8_lossy(res.body());
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY, "{color:?}: {text}");
        assert!(text.contains("a CMYK, YCCK or 16-bit JPEG"), "{color:?}: {text}");
    }
    let mut arithmetic = jpeg(16, 16, None);
    let frame = arithmetic.windows(2).position(|marker| marker == [0xFF, 0xC0]).expect("a baseline frame");
    arithmetic[frame + 1] = 0xC9; // the same frame, arithmetic-coded
    let res = resize(server.addr, "width=8", arithmetic).await;
    let text = String::from_utf8_lossy(res.body());
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(
        text.contains("unsupported JPEG feature: ArithmeticEntropyCoding") && !text.contains("corrupt"),
        "{text}"
    );
    server.stop().await;
}

/// Query values are read as every HTTP client encodes them: `%31%35%30` is 150.
#[tokio::test(flavor = "multi_thread")]
async fn query_values_are_percent_decoded() {
    let server = TestServer::start().await;
    let photo = jpeg(300, 200, None);
    for (query, expected) in [("width=%31%35%30", (150, 100)), ("h%65ight=5%30", (75, 50))] {
        let res = resize(server.addr, query, photo.clone()).await;
        assert_eq!(res.status(), StatusCode::OK, "{query}: {}", String::from_utf8_lossy(res.body()));
        let output = decoded(res.body());
        assert_eq!((output.width(), output.height()), expected, "{query}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let photo = jpeg(64, 64, None);
    let cases: [(&str, Vec<u8>, StatusCode, &str); 13] = [
        ("width=10", vec![], StatusCode::BAD_REQUEST, "empty body"),
        ("", photo.clone(), StatusCode::BAD_REQUEST, "width or height is required"),
        ("width=0", photo.clone(), StatusCode::BAD_REQUEST, r#"invalid width \"0\""#),
        ("width=-1", photo.clone(), StatusCode::BAD_REQUEST, r#"invalid width \"-1\""#),
        ("height=abc", photo.clone(), StatusCode::BAD_REQUEST, r#"invalid height \"abc\""#),
        ("width=10001", photo.clone(), StatusCode::BAD_REQUEST, "between 1 and 10000"),
        (
            "width=10",
            b"hello, not an image".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a JPEG or PNG",
        ),
        (
            "width=10",
            b"GIF89a\x01\0\x01\0\0\0\0;".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a JPEG or PNG",
        ),
        (
            "width=10",
            b"RIFF\x1a\0\0\0WEBPVP8L".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not a JPEG or PNG",
        ),
        ("width=10", photo[..photo.len() * 2 / 3].to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "the JPEG"),
        ("width=10", png_truncated(), StatusCode::UNPROCESSABLE_ENTITY, "cannot decode the PNG"),
        ("width=10", png_bomb(100_000, 100_000), StatusCode::PAYLOAD_TOO_LARGE, "100000x100000"),
        ("width=10", jpeg_bomb(60_000, 60_000), StatusCode::PAYLOAD_TOO_LARGE, "60000x60000"),
    ];
    for (query, body, status, message) in cases {
        let res = resize(server.addr, query, body).await;
        let text = String::from_utf8_lossy(res.body());
        assert_eq!(res.status(), status, "{query}: {text}");
        assert!(text.starts_with(r#"{"error":"#) && text.contains(message), "{query}: {text}");
    }
    assert_eq!(request(server.addr, Method::GET, "/health").await.status(), StatusCode::OK);
    server.stop().await;
}

/// Past `QUEUE_PER_CORE` resize requests per core, working or waiting, the answer is 503 at once,
/// with `Retry-After`; a client that leaves gives its place back.
#[tokio::test(flavor = "multi_thread")]
async fn resize_requests_past_the_queue_get_503_and_leaving_frees_a_place() {
    let mut server = TestServer::start().await;
    let places = std::thread::available_parallelism().map_or(1, usize::from) * QUEUE_PER_CORE;
    let mut waiting = Vec::new();
    for _ in 0..places {
        let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
        let head = "POST /resize?width=10 HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n";
        within("a write", stream.write_all(head.as_bytes())).await.expect("head");
        // The server asks for the body once the request is admitted: the readiness signal.
        let mut interim = [0; 25];
        within("a read", stream.read_exact(&mut interim)).await.expect("100 Continue");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        waiting.push(stream);
    }

    let refused = resize(server.addr, "width=10", jpeg(64, 64, None)).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    assert!(refused.headers().contains_key(X_REQUEST_ID));
    assert_eq!(refused.body().as_ref(), br#"{"error":"too many images in flight"}"#);
    assert_eq!(request(server.addr, Method::GET, "/health").await.status(), StatusCode::OK);

    drop(waiting);
    let mut gone = 0; // each client that left is logged with the 400 for its unfinished body
    while gone < places {
        gone += usize::from(server.logs.wait_for("accessed").await["status"] == 400);
    }
    let admitted = resize(server.addr, "width=10", jpeg(64, 64, None)).await;
    assert_eq!(admitted.status(), StatusCode::OK);
    server.stop().await;
}

/// Four uploads are admitted (their `100 Continue` says so) and held back by their last byte, so
/// they are in flight, each with its image in memory, while `/health` answers.
#[tokio::test(flavor = "multi_thread")]
async fn health_answers_while_images_are_in_flight() {
    let server = TestServer::start().await;
    let photo = jpeg(1600, 1200, None);
    let mut uploads = Vec::new();
    for _ in 0..4 {
        let mut stream = within("connect", TcpStream::connect(server.addr)).await.expect("connect");
        let head = format!(
            "POST /resize?width=1500 HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            photo.len()
        );
        within("a write", stream.write_all(head.as_bytes())).await.expect("head");
        let mut interim = [0; 25];
        within("a read", stream.read_exact(&mut interim)).await.expect("100 Continue");
        within("a write", stream.write_all(&photo[..photo.len() - 1])).await.expect("all but the last byte");
        uploads.push(stream);
    }

    assert_eq!(request(server.addr, Method::GET, "/health").await.status(), StatusCode::OK);
    for mut stream in uploads {
        within("a write", stream.write_all(&photo[photo.len() - 1..])).await.expect("the last byte");
        let mut status_line = [0; 12];
        within("a read", stream.read_exact(&mut status_line)).await.expect("a response");
        assert_eq!(&status_line, b"HTTP/1.1 200");
    }
    server.stop().await;
}

/// The fast path (DCT-scaled decode, then Lanczos3) must not just be blurrier than resizing the
/// full decode: luma SSIM at least 0.985, sharp's own level, on a real photo.
#[test]
fn the_fast_jpeg_path_matches_a_full_decode_resize() {
    let photo = include_bytes!("testdata/photo-1920x1080.jpg");
    for box_side in [400, 800] {
        let job = ResizeJob::parse(&format!("width={box_side}&height={box_side}")).expect("query");
        let (scaled, _, _) = job.decode_jpeg(photo).unwrap_or_else(|_| panic!("decoded"));
        assert!(scaled.width() < 1920 && scaled.width() >= box_side, "decoded at {}", scaled.width());
        let (width, height) = job.fit_inside((1920, 1080), image::metadata::Orientation::NoTransforms);
        let lanczos = |image: &DynamicImage| {
            let mut resized = DynamicImage::new(width, height, image.color());
            fast_image_resize::Resizer::new().resize(image, &mut resized, None).expect("Lanczos3");
            resized
        };
        let fast = lanczos(&scaled);
        let reference = lanczos(&decoded(photo));
        let ssim = luma_ssim(&fast.to_luma8(), &reference.to_luma8());
        assert!(ssim >= 0.985, "SSIM {ssim:.4} at {box_side}");
    }
}

/// POST /resize with `image` as the body, on a new connection.
async fn resize(addr: SocketAddr, query: &str, image: Vec<u8>) -> Response<Bytes> {
    let mut req = Request::new(Full::from(image));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("/resize?{query}").parse().expect("query");
    req.headers_mut().insert(header::HOST, HeaderValue::from_static("test"));
    send_request(&mut connect(addr).await, req).await
}

/// A JPEG whose left half is red and right half blue, with an optional EXIF segment.
fn jpeg(width: u16, height: u16, exif: Option<&[u8]>) -> Vec<u8> {
    let red_blue = RgbImage::from_fn(width.into(), height.into(), |x, _| {
        if x < u32::from(width) / 2 { image::Rgb([230, 20, 20]) } else { image::Rgb([20, 20, 230]) }
    });
    jpeg_of(&red_blue, exif)
}

fn jpeg_of(image: &RgbImage, exif: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = rusty_jpeg::encode::Encoder::new(&mut out, 90);
    if let Some(exif) = exif {
        encoder.add_app_segment(1, exif.to_vec()).expect("EXIF segment");
    }
    encoder.encode(image, image.width() as u16, image.height() as u16, ColorType::Rgb).expect("encode");
    out
}

fn checkerboard(width: u32, height: u32) -> DynamicImage {
    let on = |x: u32, y: u32| (x / 8 + y / 8).is_multiple_of(2);
    let pixel = |x, y| if on(x, y) { Rgba([250, 250, 250, 255]) } else { Rgba([10, 90, 200, 255]) };
    DynamicImage::from(RgbaImage::from_fn(width, height, pixel))
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    if format == ImageFormat::Jpeg {
        return jpeg_of(&image.to_rgb8(), None);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// A JPEG (always RGB, as the server writes them) or a PNG, decoded whole.
fn decoded(image: &[u8]) -> DynamicImage {
    if image::guess_format(image).ok() == Some(ImageFormat::Png) {
        return image::load_from_memory_with_format(image, ImageFormat::Png).expect("a PNG");
    }
    let mut decoder = rusty_jpeg::decode::Decoder::new(image);
    let pixels = decoder.decode().expect("a JPEG");
    let info = decoder.info().expect("a frame");
    let rgb = RgbImage::from_raw(info.width.into(), info.height.into(), pixels).expect("RGB pixels");
    DynamicImage::from(rgb)
}

fn png_truncated() -> Vec<u8> {
    let png = encode(&checkerboard(64, 64), ImageFormat::Png);
    png[..png.len() - 30].to_vec()
}

/// What `work` returns, and the most bytes this thread held at once while it ran, beyond what it
/// held before.
fn peak_allocation<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE_BYTES.with(Cell::get);
    PEAK_BYTES.with(|peak| peak.set(before));
    let result = work();
    (result, PEAK_BYTES.with(Cell::get).saturating_sub(before))
}

thread_local! {
    static LIVE_BYTES: Cell<usize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting each thread's live bytes and their peak for `peak_allocation`.
struct CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

impl CountingAllocator {
    fn count(grown: usize, shrunk: usize) {
        let _ = LIVE_BYTES.try_with(|live| {
            live.set((live.get() + grown).saturating_sub(shrunk));
            let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(live.get())));
        });
    }
}

// SAFETY: every call goes to the system allocator unchanged; only the counters are added.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let pointer = unsafe { std::alloc::System.alloc(layout) };
        if !pointer.is_null() {
            Self::count(layout.size(), 0);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(pointer, layout) };
        Self::count(0, layout.size());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let moved = unsafe { std::alloc::System.realloc(pointer, layout, size) };
        if !moved.is_null() {
            Self::count(size, layout.size());
        }
        moved
    }
}

/// A PNG chunk: length, type, data and CRC.
fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let body = [kind, data].concat();
    [&(data.len() as u32).to_be_bytes()[..], &body, &crc32(&body).to_be_bytes()].concat()
}

/// A PNG of a few dozen bytes whose header claims `width`×`height` pixels.
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let header = [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 6, 0, 0, 0]].concat();
    [
        &b"\x89PNG\r\n\x1a\n"[..],
        &png_chunk(b"IHDR", &header),
        &png_chunk(b"IDAT", &[0x78, 0x9c, 3, 0]),
        &png_chunk(b"IEND", &[]),
    ]
    .concat()
}

/// A small real JPEG whose frame header is changed to claim `width`×`height` pixels.
fn jpeg_bomb(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = jpeg(16, 16, None);
    let frame = jpeg.windows(2).position(|marker| marker == [0xFF, 0xC0]).expect("a baseline frame");
    jpeg[frame + 5..frame + 9].copy_from_slice(&[height.to_be_bytes(), width.to_be_bytes()].concat());
    jpeg
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0_u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Mean SSIM of two grey images over 8×8 windows (constants of Wang et al., 2004).
fn luma_ssim(a: &GrayImage, b: &GrayImage) -> f64 {
    let (c1, c2) = ((0.01 * 255.0_f64).powi(2), (0.03 * 255.0_f64).powi(2));
    let mut total = (0.0, 0);
    for y in (0..a.height() - 7).step_by(4) {
        for x in (0..a.width() - 7).step_by(4) {
            let pixels = |image: &GrayImage| -> Vec<f64> {
                (0..64).map(|i| f64::from(image.get_pixel(x + i % 8, y + i / 8).0[0])).collect()
            };
            let (pa, pb) = (pixels(a), pixels(b));
            let mean = |p: &[f64]| p.iter().sum::<f64>() / 64.0;
            let (ma, mb) = (mean(&pa), mean(&pb));
            let var_a = pa.iter().map(|v| (v - ma).powi(2)).sum::<f64>() / 63.0;
            let var_b = pb.iter().map(|v| (v - mb).powi(2)).sum::<f64>() / 63.0;
            let cov = pa.iter().zip(&pb).map(|(va, vb)| (va - ma) * (vb - mb)).sum::<f64>() / 63.0;
            total.0 +=
                (2.0 * ma * mb + c1) * (2.0 * cov + c2) / ((ma * ma + mb * mb + c1) * (var_a + var_b + c2));
            total.1 += 1;
        }
    }
    total.0 / f64::from(total.1)
}

/// Seeded mutations of small valid images in every format read, through the whole pipeline:
/// each must give an image or a 4xx, never a panic or a 5xx, in a time proportional to its size.
/// A CPU bomb took seconds for 100 KB; here 0.5 s plus 10 µs a byte is the bound.
#[test]
fn mutated_images_get_an_image_or_a_4xx_in_bounded_time() {
    let seeds = mutation_seeds();
    let queries = ["width=16", "height=9", "width=40&height=5", "width=3"];
    let mut random = fastrand::Rng::with_seed(0x6b69_636b);
    let mut count = 0;
    let mut images = 0;
    for (name, seed) in &seeds {
        for round in 0..450 {
            let input = mutate(seed, &mut random);
            let query = queries[round % queries.len()];
            let job = ResizeJob::parse(query).expect("query");
            let started = std::time::Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| job.process(&input)));
            let took = started.elapsed();
            let case = format!("{name} round {round} ({} bytes, {query})", input.len());
            match outcome {
                Err(_) => panic!("{case} panicked"),
                Ok(Err(Refusal(status, message))) => {
                    assert!(status.is_client_error(), "{case}: {status} {message}")
                }
                Ok(Ok(_)) => images += 1,
            }
            let bound = Duration::from_millis(500) + Duration::from_micros(10) * input.len() as u32;
            assert!(took < bound, "{case} took {took:?}, over {bound:?}");
            count += 1;
        }
    }
    assert_eq!(count, seeds.len() * 450);
    assert!(images > count / 5, "only {images} of {count} inputs decoded: the mutations are too blunt");
}

/// Small valid images: JPEG (baseline with EXIF, progressive, CMYK) and PNG (alpha with text and
/// colour profile chunks, grey).
fn mutation_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let picture = checkerboard(48, 32);
    let rotate_90 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0";
    let mut progressive = Vec::new();
    let mut encoder = rusty_jpeg::encode::Encoder::new(&mut progressive, 85);
    encoder.set_progressive(true);
    encoder.encode(&picture.to_rgb8(), 48, 32, rusty_jpeg::encode::ColorType::Rgb).expect("encode");
    let mut cmyk = Vec::new();
    let ink: Vec<u8> =
        picture.to_rgb8().pixels().flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], 0]).collect();
    rusty_jpeg::encode::Encoder::new(&mut cmyk, 85)
        .encode(&ink, 48, 32, rusty_jpeg::encode::ColorType::Cmyk)
        .expect("encode");
    let png = encode(&picture, ImageFormat::Png);
    let after_header = 8 + 25;
    let chunks = [
        png_chunk(b"tEXt", b"Comment\0made in a test"),
        png_chunk(b"iCCP", b"p\0\0\x78\x9c\x03\0\0\0\0\x01"),
    ];
    let png_with_metadata = [&png[..after_header], &chunks.concat(), &png[after_header..]].concat();
    vec![
        ("baseline JPEG with EXIF", jpeg_of(&picture.to_rgb8(), Some(rotate_90))),
        ("progressive JPEG", progressive),
        ("CMYK JPEG", cmyk),
        ("RGBA PNG with tEXt and iCCP", png_with_metadata),
        ("grey PNG", encode(&DynamicImage::from(picture.to_luma8()), ImageFormat::Png)),
    ]
}

/// One of: flipped bits, inserted or deleted bytes, a truncation, a 2- or 4-byte field set to an
/// extreme value, or a JPEG marker segment or PNG chunk repeated.
fn mutate(seed: &[u8], random: &mut fastrand::Rng) -> Vec<u8> {
    let mut input = seed.to_vec();
    let at = random.usize(..input.len());
    match random.u8(..6) {
        0 => {
            for _ in 0..random.usize(1..8) {
                let at = random.usize(..input.len());
                input[at] ^= 1 << random.u8(..8);
            }
        }
        1 => {
            let bytes: Vec<u8> = (0..random.usize(1..64)).map(|_| random.u8(..)).collect();
            input.splice(at..at, bytes);
        }
        2 => drop(input.drain(at..(at + random.usize(1..64)).min(input.len()))),
        3 => input.truncate(at),
        4 => {
            let extreme: &[u8] = random
                .choice([&[0, 0][..], &[0xFF, 0xFF], &[0x7F, 0xFF], &[0xFF; 4], &[0, 0, 0, 0]])
                .expect("values");
            let end = (at + extreme.len()).min(input.len());
            input[at..end].copy_from_slice(&extreme[..end - at]);
        }
        _ => {
            let (start, end) = segment_at(&input, at);
            let segment = input[start..end].to_vec();
            for _ in 0..random.usize(1..40) {
                input.splice(start..start, segment.iter().copied());
            }
        }
    }
    input
}

/// The JPEG marker segment or PNG chunk that starts nearest before `at`, or 16 bytes there.
fn segment_at(input: &[u8], at: usize) -> (usize, usize) {
    let length = |start: usize, header: usize, size: usize| start + header + size;
    for start in (0..=at).rev() {
        if input[start] == 0xFF && input.get(start + 1).is_some_and(|marker| (0xC0..=0xFE).contains(marker)) {
            let size = input
                .get(start + 2..start + 4)
                .map_or(0, |size| usize::from(u16::from_be_bytes([size[0], size[1]])));
            return (start, length(start, 2, size).min(input.len()));
        }
        if input.get(start + 4..start + 8).is_some_and(|kind| kind.iter().all(u8::is_ascii_alphabetic))
            && start >= 8
        {
            let size =
                u32::from_be_bytes([input[start], input[start + 1], input[start + 2], input[start + 3]]);
            return (start, length(start, 12, size as usize).min(input.len()));
        }
    }
    (at, (at + 16).min(input.len()))
}
