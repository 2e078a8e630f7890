//! Why a DNS payload was not usable.

/// A DNS payload the daemon could not use. Every variant says what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("DNS message {id:#06x} is a query (QR=0), expected a response")]
    NotAResponse { id: u16 },
    #[error("DNS message {id:#06x} is a response (QR=1), expected a query")]
    NotAQuery { id: u16 },
    #[error("DNS message has {count} questions, expected exactly 1")]
    QuestionCount { count: usize },
    /// hickory-proto's decoder rejected the bytes; `reason` is its message.
    #[error("malformed DNS message: {reason}")]
    Malformed { reason: String },
    #[error("DNS message is {len} bytes long, more than the 65535 a DNS message can have")]
    TooLarge { len: usize },
}
