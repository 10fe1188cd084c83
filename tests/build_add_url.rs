//! `ADD <url>` over a network that misbehaves: a server that fails once is tried again,
//! a slow download that keeps sending finishes however long it takes, and a server that
//! goes quiet or keeps failing fails the step with the Dockerfile line and the reason.

mod fixture;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixture::{ferry, project, umoci_unpack};

const BODY: &[u8] = b"0123456789abcdef\n";

/// How the test server answers each path.
fn respond(path: &str, count: usize, stream: &mut TcpStream) -> std::io::Result<()> {
    let ok_head =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", BODY.len());
    let status =
        |code: &str| format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    match path {
        // 503 the first time, then the file.
        "/flaky" if count == 1 => stream.write_all(status("503 Service Unavailable").as_bytes()),
        "/flaky" => {
            stream.write_all(ok_head.as_bytes())?;
            stream.write_all(BODY)
        }
        // The body in pieces, 0.4 s apart: 2.4 s in all, each wait under the 1 s timeout.
        "/slow" => {
            stream.write_all(ok_head.as_bytes())?;
            for piece in BODY.chunks(3) {
                std::thread::sleep(Duration::from_millis(400));
                stream.write_all(piece)?;
                stream.flush()?;
            }
            Ok(())
        }
        // Half the body, then silence.
        "/stall" => {
            stream.write_all(ok_head.as_bytes())?;
            stream.write_all(&BODY[..8])?;
            stream.flush()?;
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        }
        // 429 asking for a second the first time, then the file.
        "/limited" if count == 1 => stream.write_all(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        "/limited" => {
            stream.write_all(ok_head.as_bytes())?;
            stream.write_all(BODY)
        }
        // Come back in an hour.
        "/patience" => stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        "/broken" => stream.write_all(status("500 Internal Server Error").as_bytes()),
        "/forbidden" => stream.write_all(status("403 Forbidden").as_bytes()),
        _ => stream.write_all(status("404 Not Found").as_bytes()),
    }
}

/// The paths the test server counts requests of (the last counts every other path).
const PATHS: [&str; 8] =
    ["/flaky", "/slow", "/stall", "/broken", "/forbidden", "/limited", "/patience", "/other"];

/// An HTTP/1.1 server on loopback, one thread per connection, counting requests per path.
fn serve() -> (u16, Arc<[AtomicUsize; 8]>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let counts: Arc<[AtomicUsize; 8]> = Arc::new(Default::default());
    let seen = counts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => request.push(byte[0]),
                        _ => return,
                    }
                }
                let line =
                    String::from_utf8_lossy(&request).lines().next().unwrap_or("").to_string();
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                let slot = PATHS.iter().position(|p| *p == path).unwrap_or(PATHS.len() - 1);
                let count = seen[slot].fetch_add(1, Ordering::SeqCst) + 1;
                let _ = respond(&path, count, &mut stream);
            });
        }
    });
    (port, counts)
}

fn manifest() -> String {
    "[project]\nname = \"t\"\n\n[images.dl]\ncontext = \"dl\"\n".to_string()
}

/// `ferry build` with a 1 s timeout, retries without backoff.
fn build(dir: &Path, store: &Path, retries: &str) -> std::process::Output {
    ferry(dir)
        .env("FERRY_REGISTRY_TIMEOUT", "1")
        .env("FERRY_REGISTRY_BACKOFF", "0")
        .env("FERRY_REGISTRY_RETRIES", retries)
        .arg("--store")
        .arg(store)
        .arg("build")
        .output()
        .unwrap()
}

#[test]
fn a_failing_server_is_tried_again_and_a_slow_one_is_waited_for() {
    let (port, counts) = serve();
    let dir = project(&[
        ("images.toml", &manifest()),
        (
            "dl/Dockerfile",
            &format!(
                "FROM scratch\n\
                 ADD http://127.0.0.1:{port}/flaky /flaky.txt\n\
                 ADD http://127.0.0.1:{port}/slow /slow.txt\n\
                 ADD http://127.0.0.1:{port}/limited /limited.txt\n"
            ),
        ),
    ]);
    let store = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = build(dir.path(), store.path(), "2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The slow download took longer than the timeout (the timeout is per wait, not
    // total), and the 429 was waited out for the second it asked.
    assert!(started.elapsed() > Duration::from_millis(3400));
    assert_eq!(counts[0].load(Ordering::SeqCst), 2, "the 503 was tried again, once");
    assert_eq!(counts[5].load(Ordering::SeqCst), 2, "the 429 was tried again, once");
    let work = tempfile::tempdir().unwrap();
    let root = umoci_unpack(store.path(), "dl", work.path());
    assert_eq!(std::fs::read(root.join("flaky.txt")).unwrap(), BODY);
    assert_eq!(std::fs::read(root.join("slow.txt")).unwrap(), BODY);
    assert_eq!(std::fs::read(root.join("limited.txt")).unwrap(), BODY);
}

#[test]
fn a_quiet_or_failing_server_fails_the_step_and_says_why() {
    let (port, counts) = serve();
    for (path, retries, expected, requests) in [
        ("/stall", "0", "sent nothing for 1s", 1),
        ("/broken", "2", "500 Internal Server Error (3 tries)", 3),
        // A refusal is not worth another try.
        ("/forbidden", "2", "403 Forbidden", 1),
        // Nor a wait longer than the cap.
        ("/patience", "2", "asks to wait 3600s", 1),
    ] {
        let dir = project(&[
            ("images.toml", &manifest()),
            ("dl/Dockerfile", &format!("FROM scratch\nADD http://127.0.0.1:{port}{path} /x\n")),
        ]);
        let store = tempfile::tempdir().unwrap();
        let out = build(dir.path(), store.path(), retries);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path}: {err}");
        assert!(err.contains("dl/Dockerfile:2:"), "{path}: {err}");
        assert!(err.contains(&format!("ADD http://127.0.0.1:{port}{path}")), "{path}: {err}");
        // The message says why it gave up (the stall ends after 5 s with another error, the
        // wait asked for is an hour); no clock is read: a busy CI machine is slow anyway.
        assert!(err.contains(expected), "{path}: expected {expected:?} in {err}");
        let slot = PATHS.iter().position(|p| *p == path).unwrap();
        assert_eq!(counts[slot].load(Ordering::SeqCst), requests, "{path}: requests");
    }
}
