//! The contract Fluent Bit's parser in fluent-bit.yaml relies on, checked on the real binary's stdout:
//! each line is one JSON object whose `timestamp` `%Y-%m-%dT%H:%M:%S.%L%z` parses, and nothing else.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The longest the test waits for the server: then it kills it, so a hang fails the test.
const TIMEOUT: Duration = Duration::from_secs(60);

use serde_json::Value;

const BINARY: &str = env!(concat!("CARGO_BIN_EXE_", env!("CARGO_PKG_NAME")));

/// Also the shutdown of a real process: on SIGTERM it drains and exits 0.
#[test]
fn stdout_is_json_lines_that_fluent_bit_parses_from_start_to_shutdown() {
    let server = Command::new(BINARY)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let watchdog = kill_after(TIMEOUT, server.id());
    let mut server = KillOnDrop(server);
    let server = &mut server.0;
    let mut stdout = BufReader::new(server.stdout.take().expect("stdout is piped"));
    // The first line says the server listens, and on which port: PORT=0 lets the system choose.
    let mut output = String::new();
    stdout.read_line(&mut output).expect("read the first line");
    let started: Value = serde_json::from_str(&output).expect("the first line is JSON");
    let port = started["port"].as_u64().expect("the port is logged") as u16;

    let health = http_status(port, "GET /health");
    let not_found = http_status(port, "GET /nope");
    let not_allowed = http_status(port, "PUT /health");
    assert_eq!([health, not_found, not_allowed], [200, 404, 405]);
    let sigterm = Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    assert!(sigterm.expect("run kill").success());
    stdout.read_to_string(&mut output).expect("read stdout to its end");
    let exit = server.wait().expect("wait for the server");
    let mut stderr = String::new();
    server.stderr.take().expect("stderr is piped").read_to_string(&mut stderr).expect("read stderr");

    assert!(exit.success(), "exit {exit}, stderr: {stderr}");
    assert_eq!(stderr, "");
    // Fluent Bit's tail input never emits a last line that has no newline.
    assert!(output.ends_with('\n'), "the last line is not terminated: {output:?}");
    let lines: Vec<Value> = output.lines().map(parse_log_line).collect();
    let messages: Vec<&str> = lines.iter().map(|line| line["message"].as_str().unwrap_or_default()).collect();
    let expected = ["server started", "accessed", "accessed", "accessed", "shutting down", "server stopped"];
    assert_eq!(messages, expected);
    let statuses: Vec<&Value> = lines.iter().filter_map(|line| line.get("status")).collect();
    assert_eq!(statuses, [200, 404, 405]);
    assert_eq!(lines[4]["cause"], "SIGTERM");
    let accessed: Vec<&Value> = lines.iter().filter(|line| line["message"] == "accessed").collect();
    assert!(accessed.iter().all(|line| line["request_id"].is_string()), "{accessed:?}");
    let routes: Vec<&Value> = accessed.iter().map(|line| &line["route"]).collect();
    assert_eq!(routes, ["/health", "unmatched", "/health"]);
    drop(watchdog);
}

/// Kills the process after `timeout` unless the returned sender is dropped first.
fn kill_after(timeout: Duration, pid: u32) -> std::sync::mpsc::Sender<()> {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if finished.recv_timeout(timeout) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    });
    done
}

/// Kills the server when the test fails before it has stopped it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// One JSON object with a `timestamp` Fluent Bit can parse, or the test fails naming the line.
fn parse_log_line(line: &str) -> Value {
    let value: Value = serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"));
    assert!(value.is_object(), "not a JSON object: {line}");
    let timestamp = value["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {line}"));
    assert!(fluent_bit_parses(timestamp), "Fluent Bit cannot parse the timestamp {timestamp:?}");
    value
}

/// What `%Y-%m-%dT%H:%M:%S.%L%z` reads: Fluent Bit rejects a time without a fraction or an offset,
/// and reads one with over 9 fractional digits or a lowercase `z` as 1970.
fn fluent_bit_parses(timestamp: &str) -> bool {
    let Some((seconds, rest)) = timestamp.split_once('.') else { return false };
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (fraction, offset) = rest.split_at(digits);
    let pattern = "0000-00-00T00:00:00";
    let seconds_match = seconds.len() == pattern.len()
        && seconds
            .chars()
            .zip(pattern.chars())
            .all(|(c, p)| if p == '0' { c.is_ascii_digit() } else { c == p });
    let offset_ok =
        offset == "Z" || offset.len() == 6 && offset.starts_with(['+', '-']) && offset.as_bytes()[3] == b':';
    seconds_match && (1..=9).contains(&fraction.len()) && offset_ok
}

/// Sends one request without a body on its own connection and returns the response's status code.
fn http_status(port: u16, request_line: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("a read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("a write timeout");
    let head = format!("{request_line} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok());
    status.unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}
