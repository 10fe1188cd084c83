//! `ADD <url>`: fetch a remote file for a build step.
//!
//! Downloads use the network settings registries do (`FERRY_REGISTRY_TIMEOUT`, `_RETRIES`,
//! `_BACKOFF`): a server that goes quiet for the timeout fails the step, however long the
//! whole download takes while bytes keep coming; a refused connection, a timeout, a 5xx
//! or a 429 is tried again with backoff, or after the server's `Retry-After` (up to
//! `FERRY_REGISTRY_MAX_RETRY_AFTER`). A 4xx other than 429 fails at once.

use std::io::Read;
use std::sync::LazyLock;
use std::time::Duration;

use reqwest::blocking::Client;

use crate::digest::Digest;
use crate::registry::{self, RegistryConfig};

/// The network settings, read once per process.
static SETTINGS: LazyLock<RegistryConfig> = LazyLock::new(|| {
    let mut config = RegistryConfig::default();
    config.apply_network_variables(|name| std::env::var(name).ok());
    config
});

/// One client for every download of the process (connections are reused).
static CLIENT: LazyLock<Result<Client, String>> = LazyLock::new(|| {
    let timeout = SETTINGS.timeout;
    registry::http_client_builder()
        // Per wait: for the answer, then for each piece of the body read through `Read`.
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(20)))
        .build()
        .map_err(|e| format!("cannot set up HTTP: {}", registry::describe(&e)))
});

/// Fetch `url` (https, or http), checking `--checksum=sha256:…` when given. https servers
/// are verified against the system's CA store (rustls with the platform verifier), so a
/// private CA is trusted by installing it on the build machine.
pub fn download(url: &str, checksum: Option<&str>) -> Result<Vec<u8>, String> {
    // A malformed checksum is an error before any network traffic.
    let expected: Option<Digest> =
        checksum.map(|c| c.parse().map_err(|e| format!("ADD --checksum={c}: {e}"))).transpose()?;
    if let Some(problem) = &SETTINGS.settings_error {
        return Err(format!("ADD {url}: {problem}"));
    }
    let client = CLIENT.as_ref().map_err(|e| format!("ADD {url}: {e}"))?;
    let retry = &SETTINGS.retry;
    let mut attempt = 0;
    let bytes = loop {
        attempt += 1;
        match fetch(client, url) {
            Ok(bytes) => break bytes,
            Err(Failure { message, transient, retry_after }) => {
                if let Some(wait) = retry_after.filter(|w| *w > retry.max_retry_after) {
                    return Err(format!(
                        "ADD {url}: {message}, and the server asks to wait {} (more than FERRY_REGISTRY_MAX_RETRY_AFTER, {})",
                        registry::seconds(&wait),
                        registry::seconds(&retry.max_retry_after)
                    ));
                }
                if !transient || attempt >= retry.attempts {
                    let tries =
                        if attempt == 1 { String::new() } else { format!(" ({attempt} tries)") };
                    return Err(format!("ADD {url}: {message}{tries}"));
                }
                tracing::info!(%url, attempt, error = %message, "download failed; trying again");
                std::thread::sleep(retry_after.unwrap_or_else(|| retry.backoff(attempt)));
            }
        }
    };
    if let Some(expected) = expected {
        let actual = Digest::of(&bytes);
        if actual != expected {
            return Err(format!("ADD {url}: checksum mismatch: expected {expected}, got {actual}"));
        }
    }
    Ok(bytes)
}

struct Failure {
    message: String,
    /// Worth another try: the server or the network may recover.
    transient: bool,
    /// How long the server asked to wait first.
    retry_after: Option<Duration>,
}

fn fetch(client: &Client, url: &str) -> Result<Vec<u8>, Failure> {
    let network = |e: reqwest::Error| Failure {
        transient: e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
        message: registry::describe(&e),
        retry_after: None,
    };
    let mut response = client.get(url).send().map_err(network)?;
    let status = response.status();
    if !status.is_success() {
        let transient = status.is_server_error() || status.as_u16() == 429;
        return Err(Failure {
            message: format!("the server answered {status}"),
            transient,
            retry_after: registry::retry_after(response.headers()).filter(|_| transient),
        });
    }
    let mut bytes = Vec::new();
    // Through `Read`, the client's timeout bounds each wait for more of the body, not the
    // whole download (which `bytes()` would).
    response.read_to_end(&mut bytes).map_err(|e| {
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<reqwest::Error>());
        let message = if e.kind() == std::io::ErrorKind::TimedOut
            || inner.is_some_and(reqwest::Error::is_timeout)
        {
            format!(
                "the server sent nothing for {} (FERRY_REGISTRY_TIMEOUT)",
                registry::seconds(&SETTINGS.timeout)
            )
        } else {
            let reason = inner.map(registry::describe).unwrap_or_else(|| e.to_string());
            format!("the download broke off: {reason}")
        };
        Failure { message, transient: true, retry_after: None }
    })?;
    Ok(bytes)
}
