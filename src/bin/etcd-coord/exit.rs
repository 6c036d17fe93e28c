//! Exit statuses and the one-line error report.

use std::error::Error as StdError;
use std::fmt::Display;
use std::process::ExitStatus;

/// An error: etcd unreachable, permission denied, a session that ended while waiting, ...
pub const ERROR: u8 = 1;
/// Bad usage (clap uses the same status for what it rejects).
pub const USAGE: u8 = 2;
/// The lock, permit or leadership was lost while held; a running command was stopped.
/// (`EX_TEMPFAIL` of sysexits.h: running again later is the usual cure.)
pub const LOST: u8 = 75;
/// The command exists but could not be run (as shells report it).
pub const CANNOT_RUN: u8 = 126;
/// The command was not found (as shells report it).
pub const NOT_FOUND: u8 = 127;

/// The status that reports signal `signo`, as shells report a process killed by it.
pub fn signaled(signo: i32) -> u8 {
    (128 + signo.clamp(0, 127)) as u8
}

/// The status etcd-coord exits with after its command exited with `status`.
pub fn of_command(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signo)) => signaled(signo),
        (None, None) => ERROR,
    }
}

/// Why etcd-coord stops with a non-zero status, reported as one line on stderr.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    /// A failure with this message and [`ERROR`].
    pub fn msg(message: impl Display) -> Self {
        Failure {
            message: message.to_string(),
            code: ERROR,
        }
    }

    /// `context: error: its source: ...`, with [`ERROR`].
    pub fn new(context: impl Display, err: &(dyn StdError + 'static)) -> Self {
        Failure::msg(format!("{context}: {}", chain(err)))
    }

    /// Bad usage that clap could not see.
    pub fn usage(message: impl Display) -> Self {
        Failure::msg(message).code(USAGE)
    }

    pub fn code(mut self, code: u8) -> Self {
        self.code = code;
        self
    }

    /// Puts what was being done in front of the message.
    pub fn context(mut self, context: impl Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl From<etcd_coord::Error> for Failure {
    fn from(e: etcd_coord::Error) -> Self {
        let code = match e {
            etcd_coord::Error::InvalidArgument { .. } => USAGE,
            _ => ERROR,
        };
        Failure::msg(chain(&e)).code(code)
    }
}

/// An error and its sources joined by ": ". A source whose text the line already shows (many
/// errors repeat their source's message) is left out, so the line says each thing once.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let (text, next) = describe(e);
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = next;
    }
    // One line, whatever the server or the OS put in its messages.
    line.replace(['\n', '\r'], " ")
}

/// One link of a chain: its text and the next link. etcd-client's errors do not expose their
/// sources, and show a gRPC status with a debug dump of its source; this takes them apart.
fn describe<'a>(e: &'a (dyn StdError + 'static)) -> (String, Option<&'a (dyn StdError + 'static)>) {
    use etcd_coord::etcd_client::Error as ClientError;
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::GRpcStatus(status)) => (status.message().to_owned(), status.source()),
        Some(ClientError::TransportError(t)) => (t.to_string(), t.source()),
        Some(ClientError::IoError(io)) => (io.to_string(), io.source()),
        _ => (e.to_string(), e.source()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for E {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn chains_are_one_line_without_repeats() {
        let e = E(
            "etcd is unavailable: transport error",
            Some(Box::new(E(
                "transport error",
                Some(Box::new(E("tcp connect error\nrefused", None))),
            ))),
        );
        assert_eq!(
            chain(&e),
            "etcd is unavailable: transport error: tcp connect error refused"
        );
    }

    #[test]
    fn statuses_follow_the_shell() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(of_command(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(of_command(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(signaled(libc::SIGTERM), 143);
    }
}
