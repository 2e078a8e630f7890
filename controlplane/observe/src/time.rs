//! Timestamps: RFC 3339 text for people and JSON, `--since` parsing.

use std::time::{Duration, SystemTime};

use crate::error::ObserveError;

/// 9999-12-31T23:59:59Z, the last instant RFC 3339 can write.
const MAX_RFC3339_SECS: u64 = 253_402_300_799;

/// Clamps into what RFC 3339 can express (the epoch .. year 9999).
fn clamp(time: SystemTime) -> SystemTime {
    let max = SystemTime::UNIX_EPOCH + Duration::from_secs(MAX_RFC3339_SECS);
    time.clamp(SystemTime::UNIX_EPOCH, max)
}

/// `2024-05-01T12:00:00Z` (whole seconds, UTC); times outside the epoch .. year 9999
/// are clamped.
pub fn format_rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(clamp(time)).to_string()
}

/// `--since`: a duration back from `now` (`72h`, `30m`, `7days`, `1h 30m`) or an
/// RFC 3339 timestamp (`2024-05-01T00:00:00Z`).
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, ObserveError> {
    let trimmed = text.trim();
    let invalid = |reason: String| ObserveError::InvalidSince {
        text: text.to_owned(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(invalid("empty".to_owned()));
    }
    if trimmed.contains('T') || trimmed.contains(':') {
        return humantime::parse_rfc3339_weak(trimmed).map_err(|e| invalid(e.to_string()));
    }
    let duration = humantime::parse_duration(trimmed).map_err(|e| invalid(e.to_string()))?;
    Ok(now
        .checked_sub(duration)
        .map_or(SystemTime::UNIX_EPOCH, |since| {
            since.max(SystemTime::UNIX_EPOCH)
        }))
}

/// `#[serde(with = "crate::time::rfc3339")]`: RFC 3339 with milliseconds (the store's
/// precision), so a store's observations survive a JSON round trip unchanged.
pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        time: &SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(super::clamp(*time)))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&text).map_err(|e| {
            serde::de::Error::custom(format!("invalid RFC 3339 timestamp {text:?}: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn formats_utc_seconds_and_clamps() {
        assert_eq!(format_rfc3339(at(1_714_564_800)), "2024-05-01T12:00:00Z");
        assert_eq!(
            format_rfc3339(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(format_rfc3339(at(u64::MAX / 4)), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn since_accepts_durations_and_timestamps() {
        let now = at(1_000_000);
        assert_eq!(
            parse_since("72h", now).expect("72h"),
            at(1_000_000 - 72 * 3600)
        );
        assert_eq!(
            parse_since(" 30m ", now).expect("30m"),
            at(1_000_000 - 1800)
        );
        assert_eq!(
            parse_since("1h 30m", now).expect("1h 30m"),
            at(1_000_000 - 5400)
        );
        assert_eq!(
            parse_since("100days", now).expect("far back"),
            SystemTime::UNIX_EPOCH
        );
        assert_eq!(
            parse_since("2024-05-01T12:00:00Z", now).expect("timestamp"),
            at(1_714_564_800)
        );
    }

    #[test]
    fn invalid_since_names_the_input() {
        for text in ["", "soon", "72", "2024-13-01T00:00:00Z"] {
            let error = parse_since(text, at(0)).expect_err(text).to_string();
            assert!(error.contains(&format!("{text:?}")), "{error}");
            assert!(error.contains("72h"), "{error}");
        }
    }
}
