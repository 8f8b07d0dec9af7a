//! The `Host` check of both HTTP APIs, against DNS rebinding: a page in a browser on this machine
//! can make a name of its own resolve to 127.0.0.1 and then talk to a loopback listener, but its
//! requests still carry that name in `Host`. A listener on a loopback address therefore answers
//! only requests whose `Host` is a loopback name (`localhost`, `127.x.x.x`, `[::1]`, any port);
//! a listener on another address (compose, a LAN) answers any `Host`.

use crate::problem::ApiError;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};

/// Whether requests to a listener on `listen` need a loopback `Host`.
#[derive(Debug, Clone, Copy)]
pub struct HostCheck {
    loopback_only: bool,
}

impl HostCheck {
    /// The check for a listener bound to `listen`.
    pub fn for_listener(listen: SocketAddr) -> Self {
        Self {
            loopback_only: listen.ip().is_loopback(),
        }
    }
}

/// True when `host` (a `Host` header's value) names this machine's loopback.
pub fn is_loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Middleware: a 403 with a JSON error for a request whose `Host` a loopback listener must not
/// answer.
pub async fn check_host(State(check): State<HostCheck>, request: Request, next: Next) -> Response {
    if check.loopback_only {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !is_loopback_name(host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "this service listens on loopback and answers only requests for a loopback name \
                 (Host: localhost, 127.0.0.1 or [::1])",
            )
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::is_loopback_name;

    #[test]
    fn only_loopback_names_pass() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8081",
            "127.1.2.3",
            "[::1]:80",
            "LOCALHOST",
        ] {
            assert!(is_loopback_name(host), "{host}");
        }
        for host in [
            "",
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "[::2]:80",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_name(host), "{host}");
        }
    }
}
