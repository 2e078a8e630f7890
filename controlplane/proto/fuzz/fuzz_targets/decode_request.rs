//! Arbitrary bytes as what a client (or the daemon) wrote on the control socket: reading
//! frames until the end of the stream or the first error must never panic, as requests
//! and as responses. A decoded frame survives a write and read back unchanged, and a
//! small read buffer (frames spanning many reads) sees the same frames as one buffer.
//! The daemon's own reader (async, at most `MAX_REQUEST` bytes a request) reads the same
//! requests as the blocking one, up to the first line longer than its limit, which it
//! refuses as too large (`-max_len=70000` lets libFuzzer try such lines).
#![no_main]

use std::fmt::Debug;
use std::io::{BufRead, BufReader, Cursor};

use std::sync::OnceLock;

use egressd_proto::{
    MAX_REQUEST, ProtoError, Request, Response, read_frame, read_frame_async_limited, write_frame,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the small buffer's capacity; the whole input is the stream.
    let capacity = data.first().map_or(1, |&b| usize::from(b % 16) + 1);
    decode_all::<Request>(data, capacity);
    decode_all::<Response>(data, capacity);
    daemon_reads_the_same(data, capacity);
});

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// The daemon's reader against the blocking one.
fn daemon_reads_the_same(data: &[u8], capacity: usize) {
    let blocking = read_all::<_, Request>(&mut Cursor::new(data), data.len());
    let daemon = runtime().block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(capacity, data);
        let mut outcomes = Vec::new();
        for _ in 0..=data.len() {
            match read_frame_async_limited::<_, Request>(&mut reader, MAX_REQUEST).await {
                Ok(Some(value)) => outcomes.push(Outcome::Frame(value)),
                Ok(None) => {
                    outcomes.push(Outcome::End);
                    return outcomes;
                }
                Err(error) => {
                    assert!(
                        !matches!(error, ProtoError::Io(_) | ProtoError::Encode(_)),
                        "reading from memory failed: {error:?}"
                    );
                    outcomes.push(Outcome::Error(error.to_string()));
                    return outcomes;
                }
            }
        }
        panic!(
            "more than {} frames in {} bytes",
            data.len() + 1,
            data.len()
        );
    });
    let too_long = data
        .split(|&b| b == b'\n')
        .position(|line| line.len() > MAX_REQUEST);
    // One outcome per line until the first error: where the blocking reader reaches a line
    // over the daemon's limit, the daemon refuses it and stops there.
    match too_long {
        Some(line) if blocking.len() > line => {
            assert_eq!(daemon.len(), line + 1, "{daemon:?}");
            assert_eq!(
                daemon[..line],
                blocking[..line],
                "the requests before it agree"
            );
            assert_eq!(
                daemon[line],
                Outcome::Error(format!("frame longer than {MAX_REQUEST} bytes")),
                "a line over the limit is refused as too large"
            );
        }
        _ => assert_eq!(daemon, blocking, "the daemon reads other requests"),
    }
}

/// What one read gave: a frame, the end of the stream, or an error (as text).
#[derive(Debug, PartialEq)]
enum Outcome<T> {
    Frame(T),
    End,
    Error(String),
}

fn decode_all<T>(data: &[u8], capacity: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let whole = read_all::<_, T>(&mut Cursor::new(data), data.len());
    let small = read_all::<_, T>(
        &mut BufReader::with_capacity(capacity, Cursor::new(data)),
        data.len(),
    );
    assert_eq!(whole, small, "buffer size changed what was read");
    for outcome in &whole {
        if let Outcome::Frame(value) = outcome {
            round_trip(value);
        }
    }
}

/// Reads frames until the end of the stream or an error; every frame consumes at least
/// one byte, so more than `len + 1` reads would be a bug.
fn read_all<R: BufRead, T: DeserializeOwned>(reader: &mut R, len: usize) -> Vec<Outcome<T>> {
    let mut outcomes = Vec::new();
    for _ in 0..=len {
        match read_frame::<_, T>(reader) {
            Ok(Some(value)) => outcomes.push(Outcome::Frame(value)),
            Ok(None) => {
                outcomes.push(Outcome::End);
                return outcomes;
            }
            Err(error) => {
                assert!(
                    !matches!(error, ProtoError::Io(_) | ProtoError::Encode(_)),
                    "reading from memory failed: {error:?}"
                );
                outcomes.push(Outcome::Error(error.to_string()));
                return outcomes;
            }
        }
    }
    panic!("more than {} frames in {len} bytes", len + 1);
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
    let mut line = Vec::new();
    write_frame(&mut line, value).expect("a decoded frame can be written");
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(
        line.iter().filter(|&&b| b == b'\n').count(),
        1,
        "one frame, one line"
    );
    let mut reader = Cursor::new(&line);
    let back: Option<T> = read_frame(&mut reader).expect("a written frame can be read");
    assert_eq!(back.as_ref(), Some(value), "frame changed in a round trip");
    assert!(matches!(read_frame::<_, T>(&mut reader), Ok(None)));
}
