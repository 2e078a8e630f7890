//! Newline-delimited JSON framing, blocking (the CLI) and async (the daemon).
//!
//! A frame is one JSON value on one line. The reader never buffers more than
//! [`MAX_FRAME`] bytes of a line: a longer one fails with
//! [`ProtoError::FrameTooLarge`], after which the stream is out of step and
//! should be closed. A last line without its newline still counts as a frame.

use std::io::{self, BufRead, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame, in bytes, not counting its newline.
/// Large enough for a status report of thousands of workloads; requests are far smaller.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// Largest request the daemon reads, in bytes, not counting its newline: the longest
/// request (a mode switch naming a workload) is under 200 bytes, so each client costs the
/// daemon at most this much buffer.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What can go wrong reading or writing a frame. Every message is complete in
/// its `Display`.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket failed (including read timeouts).
    #[error("control socket: {0}")]
    Io(io::Error),
    /// A line longer than [`MAX_FRAME`] bytes (or the reader's own limit), read or about
    /// to be written.
    #[error("frame longer than {limit} bytes")]
    FrameTooLarge { limit: usize },
    /// The line is not valid JSON for the expected type; carries serde's message.
    #[error("malformed frame: {0}")]
    Malformed(serde_json::Error),
    /// The value cannot be serialized (e.g. a map with non-string keys).
    #[error("cannot encode frame: {0}")]
    Encode(serde_json::Error),
}

impl From<io::Error> for ProtoError {
    fn from(err: io::Error) -> Self {
        ProtoError::Io(err)
    }
}

/// Serializes `value` as one line, newline included, checking its size.
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtoError> {
    // Compact JSON escapes control characters, so the frame holds no newline.
    let mut line = serde_json::to_vec(value).map_err(ProtoError::Encode)?;
    if line.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge { limit: MAX_FRAME });
    }
    line.push(b'\n');
    Ok(line)
}

fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(line).map_err(ProtoError::Malformed)
}

/// Moves the next part of a line from `available` into `line`. Returns how many
/// bytes to consume and whether the line is complete (its newline consumed).
fn scan(line: &mut Vec<u8>, available: &[u8], limit: usize) -> Result<(usize, bool), ProtoError> {
    let (part, consumed, complete) = match available.iter().position(|&b| b == b'\n') {
        Some(newline) => (&available[..newline], newline + 1, true),
        None => (available, available.len(), false),
    };
    if line.len() + part.len() > limit {
        return Err(ProtoError::FrameTooLarge { limit });
    }
    line.extend_from_slice(part);
    Ok((consumed, complete))
}

/// Writes `value` as one frame and flushes.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, value: &T) -> Result<(), ProtoError> {
    writer.write_all(&encode(value)?)?;
    writer.flush()?;
    Ok(())
}

/// Reads the next frame; `Ok(None)` on a clean end of stream.
pub fn read_frame<R: BufRead, T: DeserializeOwned>(
    reader: &mut R,
) -> Result<Option<T>, ProtoError> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err.into()),
        };
        if available.is_empty() {
            return finish(&line);
        }
        let (consumed, complete) = scan(&mut line, available, MAX_FRAME)?;
        reader.consume(consumed);
        if complete {
            return decode(&line).map(Some);
        }
    }
}

/// Writes `value` as one frame and flushes.
pub async fn write_frame_async<W, T>(writer: &mut W, value: &T) -> Result<(), ProtoError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    writer.write_all(&encode(value)?).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads the next frame; `Ok(None)` on a clean end of stream.
///
/// Not cancel-safe: if the future is dropped mid-frame, the part of the line
/// already read is lost, so only cancel it when abandoning the connection.
pub async fn read_frame_async<R, T>(reader: &mut R) -> Result<Option<T>, ProtoError>
where
    R: AsyncBufRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_async_limited(reader, MAX_FRAME).await
}

/// [`read_frame_async`] with a smaller limit than [`MAX_FRAME`] (the daemon reads requests
/// with [`MAX_REQUEST`]): a longer line fails with [`ProtoError::FrameTooLarge`] once
/// `limit` bytes are buffered, however much the peer sends.
pub async fn read_frame_async_limited<R, T>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<T>, ProtoError>
where
    R: AsyncBufRead + Unpin,
    T: DeserializeOwned,
{
    let limit = limit.min(MAX_FRAME);
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return finish(&line);
        }
        let (consumed, complete) = scan(&mut line, available, limit)?;
        reader.consume(consumed);
        if complete {
            return decode(&line).map(Some);
        }
    }
}

/// End of stream: nothing pending is a clean end, anything else a last frame.
fn finish<T: DeserializeOwned>(line: &[u8]) -> Result<Option<T>, ProtoError> {
    if line.is_empty() {
        Ok(None)
    } else {
        decode(line).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Cursor};

    use super::*;
    use crate::messages::tests::{all_requests, all_responses, sample_event};
    use crate::{Request, Response};

    fn frames<T: Serialize>(values: &[T]) -> Vec<u8> {
        let mut out = Vec::new();
        for value in values {
            write_frame(&mut out, value).expect("write");
        }
        out
    }

    #[test]
    fn requests_and_responses_round_trip_through_frames() {
        let requests = all_requests();
        let mut reader = Cursor::new(frames(&requests));
        for request in &requests {
            let got: Option<Request> = read_frame(&mut reader).expect("read");
            assert_eq!(got.as_ref(), Some(request));
        }
        assert_eq!(read_frame::<_, Request>(&mut reader).expect("eof"), None);

        let responses = all_responses();
        // A tiny buffer forces frames to span many fill_buf calls.
        let mut reader = BufReader::with_capacity(7, Cursor::new(frames(&responses)));
        for response in &responses {
            let got: Option<Response> = read_frame(&mut reader).expect("read");
            assert_eq!(got.as_ref(), Some(response));
        }
        assert_eq!(read_frame::<_, Response>(&mut reader).expect("eof"), None);
    }

    #[test]
    fn one_frame_per_line() {
        let out = frames(&[Request::Status, Request::Reload]);
        assert_eq!(out, b"{\"request\":\"status\"}\n{\"request\":\"reload\"}\n");
        // Newlines inside strings are escaped, so they cannot split a frame.
        let mut event = sample_event();
        event.comm = "a\nb".into();
        let out = frames(&[Response::Event(event.clone())]);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let got: Option<Response> = read_frame(&mut Cursor::new(out)).expect("read");
        assert_eq!(got, Some(Response::Event(event)));
    }

    #[test]
    fn empty_stream_is_clean_eof() {
        let got: Option<Request> = read_frame(&mut Cursor::new(Vec::new())).expect("eof");
        assert_eq!(got, None);
    }

    #[test]
    fn frame_too_large_is_rejected_without_reading_it_all() {
        // A line that never ends: the reader must stop at MAX_FRAME.
        let mut reader = BufReader::with_capacity(1024, io::repeat(b' '));
        let err = read_frame::<_, Request>(&mut reader).expect_err("too large");
        assert!(
            matches!(err, ProtoError::FrameTooLarge { limit: MAX_FRAME }),
            "{err}"
        );

        // Exactly MAX_FRAME bytes is fine (padding is JSON whitespace).
        let mut line = br#"{"request":"status"}"#.to_vec();
        line.resize(MAX_FRAME, b' ');
        line.push(b'\n');
        let got: Option<Request> = read_frame(&mut Cursor::new(line.clone())).expect("fits");
        assert_eq!(got, Some(Request::Status));
        // One more is not.
        line.insert(0, b' ');
        let err = read_frame::<_, Request>(&mut Cursor::new(line)).expect_err("too large");
        assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
    }

    #[test]
    fn writing_a_frame_too_large_fails_before_writing() {
        let message = "x".repeat(MAX_FRAME);
        let mut out = Vec::new();
        let err = write_frame(&mut out, &Response::Done { message }).expect_err("too large");
        assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_frame_counts_if_it_is_valid_json() {
        let mut reader = Cursor::new(b"{\"request\":\"reload\"}".to_vec());
        let got: Option<Request> = read_frame(&mut reader).expect("last frame");
        assert_eq!(got, Some(Request::Reload));
        assert_eq!(read_frame::<_, Request>(&mut reader).expect("eof"), None);

        let mut reader = Cursor::new(b"{\"request\":\"status\"}\n{\"request\":\"rel".to_vec());
        let got: Option<Request> = read_frame(&mut reader).expect("first");
        assert_eq!(got, Some(Request::Status));
        let err = read_frame::<_, Request>(&mut reader).expect_err("truncated");
        assert!(matches!(err, ProtoError::Malformed(_)), "{err}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for garbage in [
            &b"hello\n"[..],
            b"\n",
            b"[]\n",
            b"{}\n",
            b"{\"request\":42}\n",
            b"{\"request\":\"set_mode\",\"mode\":\"loud\"}\n",
            b"\xff\xfe\x00\n",
            b"{\"request\":\"status\"} trailing\n",
        ] {
            let err = read_frame::<_, Request>(&mut Cursor::new(garbage.to_vec()))
                .expect_err("malformed");
            assert!(matches!(err, ProtoError::Malformed(_)), "{err}");
            let err = read_frame::<_, Response>(&mut Cursor::new(garbage.to_vec()))
                .expect_err("malformed");
            assert!(matches!(err, ProtoError::Malformed(_)), "{err}");
        }
    }

    #[test]
    fn unknown_request_kind_is_named() {
        let err = read_frame::<_, Request>(&mut Cursor::new(b"{\"request\":\"foo\"}\n".to_vec()))
            .expect_err("unknown kind");
        let message = err.to_string();
        assert!(message.contains("unknown variant `foo`"), "{message}");
        assert!(
            message.contains("set_mode"),
            "lists the known kinds: {message}"
        );
    }

    #[test]
    fn a_bad_frame_does_not_hide_the_next_one() {
        let mut reader = Cursor::new(b"nonsense\n{\"request\":\"status\"}\n".to_vec());
        assert!(read_frame::<_, Request>(&mut reader).is_err());
        let got: Option<Request> = read_frame(&mut reader).expect("next");
        assert_eq!(got, Some(Request::Status));
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn async_helpers_match_the_blocking_ones() {
        runtime().block_on(async {
            let responses = all_responses();
            let mut out = Vec::new();
            for response in &responses {
                write_frame_async(&mut out, response).await.expect("write");
            }
            assert_eq!(out, frames(&responses));

            let mut reader = tokio::io::BufReader::with_capacity(5, &out[..]);
            for response in &responses {
                let got: Option<Response> = read_frame_async(&mut reader).await.expect("read");
                assert_eq!(got.as_ref(), Some(response));
            }
            let end: Option<Response> = read_frame_async(&mut reader).await.expect("eof");
            assert_eq!(end, None);

            let mut truncated = &b"{\"request\":\"status\"}"[..];
            let got: Option<Request> = read_frame_async(&mut truncated).await.expect("last");
            assert_eq!(got, Some(Request::Status));

            let mut garbage = &b"{\"request\":\"foo\"}\n"[..];
            let err = read_frame_async::<_, Request>(&mut garbage)
                .await
                .expect_err("bad");
            assert!(err.to_string().contains("unknown variant `foo`"), "{err}");
        });
    }

    #[test]
    fn a_smaller_limit_stops_reading_sooner() {
        runtime().block_on(async {
            let mut line = br#"{"request":"status"}"#.to_vec();
            line.resize(MAX_REQUEST, b' ');
            line.push(b'\n');
            let got: Option<Request> = read_frame_async_limited(&mut &line[..], MAX_REQUEST)
                .await
                .expect("fits");
            assert_eq!(got, Some(Request::Status));
            line.insert(0, b' ');
            let err = read_frame_async_limited::<_, Request>(&mut &line[..], MAX_REQUEST)
                .await
                .expect_err("too large");
            assert!(
                matches!(err, ProtoError::FrameTooLarge { limit: MAX_REQUEST }),
                "{err}"
            );
        });
    }

    #[test]
    fn async_frame_too_large_is_rejected() {
        runtime().block_on(async {
            let (mut client, server) = tokio::io::duplex(4096);
            let writer = async move {
                // Write until the reader gives up and drops its end.
                let chunk = [b' '; 1024];
                while client.write_all(&chunk).await.is_ok() {}
            };
            let reader = async move {
                let mut server = tokio::io::BufReader::new(server);
                read_frame_async::<_, Request>(&mut server).await
            };
            let ((), result) = tokio::join!(writer, reader);
            let err = result.expect_err("too large");
            assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
        });
    }
}
