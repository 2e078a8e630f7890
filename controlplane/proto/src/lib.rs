//! The control socket between `egressctl` and `egressd`: wire types and framing.
//!
//! The protocol is newline-delimited JSON over a Unix stream socket: the client
//! writes one [`Request`] per line, the daemon answers with one or more
//! [`Response`] lines (a stream of [`Response::Event`] ended by
//! [`Response::EndOfEvents`] for [`Request::Events`], a large [`Response::Dns`] preceded
//! by [`Response::DnsNames`] parts, one frame otherwise).
//! A frame is at most [`MAX_FRAME`] bytes (8 MiB), newline excluded.
//!
//! This crate must stay small: the CLI depends on it and must never compile aya.
#![forbid(unsafe_code)]

mod dns_frames;
mod frame;
mod messages;

pub use dns_frames::DNS_PART_BUDGET;
pub use frame::{
    MAX_FRAME, MAX_REQUEST, ProtoError, read_frame, read_frame_async, read_frame_async_limited,
    write_frame, write_frame_async,
};
pub use messages::*;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/egressd/egressd.sock";
