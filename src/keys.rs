//! Key layout shared by every primitive: validated names, prefixes and per-attempt unique keys.
//!
//! A primitive called `NAME` keeps all its keys under `NAME/`. A participant's key is
//! `NAME/<lease id in lower-case hex>` — the layout of Go's `concurrency` package, which
//! `etcdctl lock` and `etcdctl elect` use — followed by `_<16 random hex digits>` so that two
//! attempts on one session never share a key (Go's attempts do, and then both "hold").
//! Go's participants order every key under the prefix by create revision and ignore the rest
//! of the name, so they and ours exclude each other.

use crate::error::{Error, Result};

/// The longest name accepted, in bytes. etcd keys may be longer, but a name this long is almost
/// certainly a bug, and keeping names short keeps every request small.
pub const MAX_NAME_LEN: usize = 1024;

/// Checks a primitive's name.
///
/// A valid name is non-empty, at most [`MAX_NAME_LEN`] bytes, has no control characters
/// (so no NUL, newline or tab) and does not end with `/` (the primitive appends it). Slashes
/// inside are fine and usual (`jobs/nightly-report`). Two names where one plus `/` is a prefix
/// of the other (`a` and `a/b`) share keys: do not use both.
pub(crate) fn validate_name(arg: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(arg, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            arg,
            format!("is {} bytes long; the limit is {MAX_NAME_LEN}", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(
            arg,
            format!("contains the control character {c:?}"),
        ));
    }
    if name.ends_with('/') {
        return Err(Error::invalid(
            arg,
            "must not end with '/' (it is appended to form the key prefix)",
        ));
    }
    Ok(())
}

/// `NAME/`: the prefix every key of the primitive `name` lives under.
pub(crate) fn prefix(name: &str) -> String {
    format!("{name}/")
}

/// A fresh participant key: `PREFIX<lease hex>_<random>`.
pub(crate) fn participant_key(prefix: &str, lease: i64) -> String {
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    format!("{prefix}{lease:x}_{random:016x}")
}

/// The smallest key greater than every key that starts with `prefix` (etcd's range end for a
/// prefix). An all-`0xff` prefix has no such key; etcd's convention for "to the end" is `\0`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Renders a key for errors and tracing without failing on non-UTF-8 bytes.
pub(crate) fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_with_the_argument_named() {
        for bad in ["", "a/", "a\0b", "line\nbreak"] {
            match validate_name("name", bad) {
                Err(Error::InvalidArgument { name: "name", .. }) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        assert!(validate_name("name", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        for good in ["a", "jobs/nightly", "ünïcödé", &"x".repeat(MAX_NAME_LEN)] {
            validate_name("name", good).unwrap();
        }
    }

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn participant_keys_follow_go_layout_and_are_unique() {
        let a = participant_key("lock/", 0x694d_8c2b_21ab_f00d);
        let b = participant_key("lock/", 0x694d_8c2b_21ab_f00d);
        assert!(a.starts_with("lock/694d8c2b21abf00d_"), "{a}");
        assert_eq!(a.len(), "lock/694d8c2b21abf00d_".len() + 16);
        assert_ne!(a, b);
    }
}
