//! Connecting to etcd with validated endpoints, bounded dial time and optional TLS and auth.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::error::{Error, Result};

/// How long [`Connect::connect`] waits for the cluster to answer, unless changed.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings while requests or streams are open: a member that stops answering (a paused
/// process, a partition) is detected within interval + timeout after its last frame, and the
/// client moves to another endpoint.
///
/// The interval must stay above etcd's `--grpc-keepalive-min-time` (5 s by default): etcd
/// counts faster pings as abuse and, after three, closes the connection with GOAWAY
/// `too_many_pings`, breaking every watch and keepalive stream on it. With the former 2 s
/// interval, measured through a proxy, every connection was closed by the server after about
/// 8 s. A ping goes out only after `interval` without any frame from the server, counted
/// from the previous pong, so pings are always more than 5 s apart. Pings on idle
/// connections (no stream open) are always counted as abuse by etcd, so they are off: a
/// request opens a stream, which turns pinging on while it waits.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(5500);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Builder for an [`etcd_client::Client`] set up the way this crate's primitives want it.
///
/// Compared with `etcd_client::Client::connect`, it checks the endpoints before dialling (an
/// empty list or an unparsable address is an [`Error::InvalidArgument`] naming `endpoints`),
/// bounds the whole dial by [`dial_timeout`](Connect::dial_timeout) and proves the cluster
/// answers with one `Status` call, so an unreachable cluster is an error within that time and
/// never a hang. It also asks etcd to fail streams on members that have lost their raft leader
/// (`require leader`), so a partitioned member cannot keep a waiter hanging.
///
/// Endpoints are `host:port`, `http://host:port` or `https://host:port`. A `host:port` uses TLS
/// when a CA or client certificate is set.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> etcd_coord::Result<()> {
/// use std::time::Duration;
/// let client = etcd_coord::Connect::new(["http://127.0.0.1:2379"])
///     .dial_timeout(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connect {
    endpoints: Vec<String>,
    dial_timeout: Duration,
    user: Option<(String, String)>,
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl std::fmt::Debug for Connect {
    // Passwords and private keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("endpoints", &self.endpoints)
            .field("dial_timeout", &self.dial_timeout)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field(
                "tls",
                &(self.ca_pem.is_some() || self.identity_pem.is_some()),
            )
            .finish()
    }
}

impl Connect {
    /// Starts a builder for these endpoints.
    ///
    /// ```
    /// let c = etcd_coord::Connect::new(["127.0.0.1:2379", "127.0.0.1:22379"]);
    /// ```
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Connect {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            user: None,
            ca_pem: None,
            identity_pem: None,
            domain: None,
        }
    }

    /// Bounds the time to reach the cluster (default [`DEFAULT_DIAL_TIMEOUT`]).
    ///
    /// ```
    /// let c = etcd_coord::Connect::new(["127.0.0.1:2379"])
    ///     .dial_timeout(std::time::Duration::from_millis(500));
    /// ```
    pub fn dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Authenticates as this etcd user.
    ///
    /// ```
    /// let c = etcd_coord::Connect::new(["127.0.0.1:2379"]).user("app", "secret");
    /// ```
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// Trusts this certificate authority (PEM) for the servers' certificates; enables TLS.
    ///
    /// ```
    /// # fn f(pem: Vec<u8>) {
    /// let c = etcd_coord::Connect::new(["https://127.0.0.1:2379"]).ca_cert_pem(pem);
    /// # }
    /// ```
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this client certificate and private key (both PEM); enables TLS.
    ///
    /// ```
    /// # fn f(cert: Vec<u8>, key: Vec<u8>) {
    /// let c = etcd_coord::Connect::new(["https://127.0.0.1:2379"]).client_cert_pem(cert, key);
    /// # }
    /// ```
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity_pem = Some((cert.into(), key.into()));
        self
    }

    /// The name to check the server certificate against, when it differs from the endpoint's
    /// host (for example a certificate issued for `localhost` reached at `127.0.0.1`).
    ///
    /// ```
    /// let c = etcd_coord::Connect::new(["https://127.0.0.1:2379"]).tls_domain("localhost");
    /// ```
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    fn tls(&self) -> Option<TlsOptions> {
        if self.ca_pem.is_none() && self.identity_pem.is_none() {
            return None;
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity_pem {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Some(tls)
    }

    /// Checks the endpoints, dials, and proves the cluster answers.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`] naming `endpoints` or `dial_timeout` for bad input;
    /// - [`Error::Timeout`] or [`Error::Unavailable`] if no endpoint answers within the dial
    ///   timeout;
    /// - [`Error::PermissionDenied`] for a wrong user or password.
    ///
    /// ```no_run
    /// # async fn f() -> etcd_coord::Result<()> {
    /// let client = etcd_coord::Connect::new(["127.0.0.1:2379"]).connect().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(self) -> Result<Client> {
        if self.dial_timeout.is_zero() {
            return Err(Error::invalid("dial_timeout", "must be greater than zero"));
        }
        let tls = self.tls();
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e, tls.is_some()))
            .collect::<Result<Vec<_>>>()?;
        if endpoints.is_empty() {
            return Err(Error::invalid("endpoints", "the list is empty"));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.dial_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            // etcd forgets its auth tokens when it restarts (and expires idle simple tokens
            // after 5 minutes); without a refresh every later request, keepalive streams
            // included, fails with "invalid auth token" for good.
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        let dial = async {
            let mut client = Client::connect(&endpoints, Some(options)).await?;
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(self.dial_timeout, dial).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Err(Error::Timeout {
                operation: "connecting to etcd",
                after: self.dial_timeout,
            }),
        }
    }
}

/// Connects with default settings; see [`Connect`].
///
/// ```no_run
/// # async fn f() -> etcd_coord::Result<()> {
/// let client = etcd_coord::connect(["127.0.0.1:2379"]).await?;
/// # Ok(()) }
/// ```
pub async fn connect<I, S>(endpoints: I) -> Result<Client>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    Connect::new(endpoints).connect().await
}

/// Turns `host:port`, `http://host:port` or `https://host:port` into a URL, rejecting anything
/// else with an error that quotes the endpoint.
fn normalize_endpoint(endpoint: &str, tls: bool) -> Result<String> {
    let bad = |reason: &str| Error::invalid("endpoints", format!("{endpoint:?}: {reason}"));
    let trimmed = endpoint.trim();
    let (scheme, rest) = match trimmed.split_once("://") {
        Some(("http", rest)) if tls => {
            return Err(bad(&format!(
                "TLS is configured, so use https:// (not http://{rest})"
            )))
        }
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some((other, _)) => return Err(bad(&format!("unsupported scheme {other:?}"))),
        None if tls => ("https", trimmed),
        None => ("http", trimmed),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') {
        return Err(bad("has a path; expected host:port"));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("has no port; expected host:port"))?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("{scheme}://{authority}")),
        _ => Err(bad("has no valid port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised_or_rejected() {
        assert_eq!(
            normalize_endpoint("127.0.0.1:2379", false).unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_endpoint("localhost:2379", true).unwrap(),
            "https://localhost:2379"
        );
        assert_eq!(
            normalize_endpoint("http://[::1]:2379/", false).unwrap(),
            "http://[::1]:2379"
        );
        for bad in [
            "",
            "localhost",
            "http://h:notaport",
            "ftp://h:1",
            "h:0",
            "h:70000",
            "http://h:1/path",
        ] {
            assert!(
                matches!(
                    normalize_endpoint(bad, false),
                    Err(Error::InvalidArgument {
                        name: "endpoints",
                        ..
                    })
                ),
                "{bad:?} was accepted"
            );
        }
        assert!(normalize_endpoint("http://h:1", true).is_err());
    }
}
