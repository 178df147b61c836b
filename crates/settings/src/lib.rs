//! The vocabulary every configuration section shares (docs/ARCHITECTURE.md §1, "config"): each
//! section of `voxloop.toml` lives beside the code it configures and checks itself with these
//! helpers, returning an [`InvalidSetting`] that names the dotted key, the value as written and
//! what is allowed. The runtime's `ConfigError::Invalid` and the music server's `LoadError`
//! carry it.

#![warn(missing_docs)]

use std::fmt::Display;
use std::ops::RangeInclusive;

/// A value of the right type but outside what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}` = {value} is not allowed: {allowed}")]
pub struct InvalidSetting {
    /// The dotted key, e.g. `llm.max_tokens` or `mcp_servers.music.url`.
    pub key: String,
    /// The value as written (strings quoted).
    pub value: String,
    /// What is allowed, with its unit.
    pub allowed: String,
}

impl InvalidSetting {
    /// An [`InvalidSetting`] for `key`, showing `value` as written and what is `allowed`.
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        allowed: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            allowed: allowed.into(),
        }
    }
}

/// `value` within `allowed` (inclusive), else an [`InvalidSetting`] saying "from A to B unit".
///
/// # Errors
/// [`InvalidSetting`] when `value` is outside `allowed`.
pub fn in_range<T: PartialOrd + Display>(
    key: &str,
    value: T,
    allowed: RangeInclusive<T>,
    unit: &str,
) -> Result<(), InvalidSetting> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(InvalidSetting::new(
        key,
        value.to_string(),
        format!("from {} to {} {unit}", allowed.start(), allowed.end()).trim_end(),
    ))
}

/// `value` one of `allowed`, else an [`InvalidSetting`] listing them.
///
/// # Errors
/// [`InvalidSetting`] when `value` is not in `allowed`.
pub fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), InvalidSetting> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(InvalidSetting::new(
        key,
        format!("{value:?}"),
        allowed.join(", "),
    ))
}

/// Every entry an origin with its scheme (`http://` or `https://`), as a browser sends it in
/// `Origin` (RFC 6454), else an [`InvalidSetting`] naming the first that is not.
///
/// # Errors
/// [`InvalidSetting`] for the first origin without a scheme.
pub fn origins(key: &str, origins: &[String]) -> Result<(), InvalidSetting> {
    match origins
        .iter()
        .find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
    {
        Some(origin) => Err(InvalidSetting::new(
            key,
            format!("{origin:?}"),
            "an origin with its scheme, e.g. \"https://app.example:443\"",
        )),
        None => Ok(()),
    }
}

/// `url` an `http://` or `https://` URL, else an [`InvalidSetting`] saying `allowed`.
///
/// # Errors
/// [`InvalidSetting`] for any other scheme.
pub fn http_url(key: &str, url: &str, allowed: &str) -> Result<(), InvalidSetting> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(());
    }
    Err(InvalidSetting::new(key, format!("{url:?}"), allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_names_the_key_the_value_and_the_range_with_its_unit() {
        assert_eq!(
            in_range("a.b", 5, 1..=4, "ms"),
            Err(InvalidSetting::new("a.b", "5", "from 1 to 4 ms"))
        );
        assert_eq!(in_range("a.b", 0.5, 0.0..=2.0, ""), Ok(()));
        let e = in_range("a.c", 3.0, 0.0..=2.0, "").unwrap_err();
        assert_eq!(e.allowed, "from 0 to 2");
        assert_eq!(
            e.to_string(),
            "config key `a.c` = 3 is not allowed: from 0 to 2"
        );
    }

    #[test]
    fn choices_and_origins_and_urls_name_what_is_wrong() {
        assert!(one_of("x.device", "cpu", &["auto", "cpu"]).is_ok());
        let e = one_of("x.device", "gpu", &["auto", "cpu"]).unwrap_err();
        assert_eq!(
            (e.value.as_str(), e.allowed.as_str()),
            ("\"gpu\"", "auto, cpu")
        );
        let list = vec!["https://a.example".to_string(), "b.example".to_string()];
        assert_eq!(origins("s.o", &list).unwrap_err().value, "\"b.example\"");
        assert!(origins("s.o", &list[..1]).is_ok());
        assert!(http_url("l.url", "ftp://x", "an http URL").is_err());
        assert!(http_url("l.url", "https://x/v1", "an http URL").is_ok());
    }
}
