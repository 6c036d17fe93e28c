//! Writing to stdout without blocking the runtime (a stalled reader must not stall the
//! session's keepalive), and warnings on stderr.

use std::fmt::Display;

use tokio::io::AsyncWriteExt;

use crate::exit::Failure;

/// Writes `text` and a newline to stdout and flushes, so that a script reading line by line
/// sees it at once.
pub async fn line(text: &str) -> Result<(), Failure> {
    let mut out = tokio::io::stdout();
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    let written = async {
        out.write_all(&bytes).await?;
        out.flush().await
    };
    written
        .await
        .map_err(|e| Failure::new("writing to stdout", &e))
}

/// One warning line on stderr: something went wrong that does not change the outcome.
pub fn warn(message: impl Display) {
    eprintln!("etcd-coord: warning: {message}");
}

/// Bytes shown on one line: invalid UTF-8 replaced, control characters escaped.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_keeps_one_line() {
        assert_eq!(super::printable(b"a b\n\t\xff"), "a b\\n\\t\u{fffd}");
    }
}
