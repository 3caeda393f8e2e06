//! Legacy's answer as the browser reads it: a body sent with a `Content-Encoding` (Express
//! `compression()` compresses whenever the request accepts it) is decoded as it streams, piece by
//! piece, before the observer judges it. The client's bytes are never touched: this only reads a
//! copy of what went by.

use std::io::Write;
use std::time::Duration;

use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};

use super::observer::StreamObserver;

/// Bytes a decoder writes to the observer at a time: a small compressed piece that expands a
/// thousandfold still passes through this much memory, never all of it at once.
const DECODED_PIECE: usize = 16 * 1024;

/// A content coding the observer can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: zlib-wrapped, as RFC 9110 says and Node's zlib sends; a raw deflate
    /// stream, which some servers send under the same name, is read too.
    Deflate,
    Brotli,
}

impl Coding {
    /// The coding a `Content-Encoding` value names; `None` for one not read here (or a chain of
    /// several).
    pub fn of(content_encoding: Option<&[u8]>) -> Option<Coding> {
        let Some(value) = content_encoding else {
            return Some(Coding::Identity);
        };
        let value = std::str::from_utf8(value).ok()?.trim();
        Some(match value.to_ascii_lowercase().as_str() {
            "" | "identity" => Coding::Identity,
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Brotli,
            _ => return None,
        })
    }
}

/// Where decoded bytes go: the observer, stamped with the time of the piece they came in.
#[derive(Debug, Default)]
struct Feed {
    observer: StreamObserver,
    at: Duration,
}

impl Write for Feed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.observer.feed(buf, self.at);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Plain(Feed),
    Gzip(Box<GzDecoder<Feed>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    DeflateStart(Vec<u8>, Feed),
    Zlib(Box<ZlibDecoder<Feed>>),
    RawDeflate(Box<DeflateDecoder<Feed>>),
    Brotli(Box<brotli::DecompressorWriter<Feed>>),
    /// Between states, and after a failure.
    Gone,
}

/// A [`StreamObserver`] behind the decoder of the body's content coding.
pub struct DecodingObserver {
    decoder: Decoder,
    /// What was seen before the decoder failed, kept to report the stream as failed.
    failed: Option<StreamObserver>,
}

impl std::fmt::Debug for DecodingObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodingObserver")
            .field("failed", &self.failed.is_some())
            .finish()
    }
}

impl DecodingObserver {
    pub fn new(coding: Coding) -> Self {
        let feed = Feed::default();
        let decoder = match coding {
            Coding::Identity => Decoder::Plain(feed),
            Coding::Gzip => Decoder::Gzip(Box::new(GzDecoder::new(feed))),
            Coding::Deflate => Decoder::DeflateStart(Vec::new(), feed),
            Coding::Brotli => Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(
                feed,
                DECODED_PIECE,
            ))),
        };
        DecodingObserver {
            decoder,
            failed: None,
        }
    }

    /// Look at the next bytes of the body, `at` since the request started.
    pub fn feed(&mut self, bytes: &[u8], at: Duration) {
        if self.failed.is_some() || bytes.is_empty() {
            return;
        }
        if let Decoder::Plain(feed) = &mut self.decoder {
            feed.observer.feed(bytes, at);
            return;
        }
        if let Decoder::DeflateStart(seen, feed) = &mut self.decoder {
            seen.extend_from_slice(bytes);
            if seen.len() < 2 {
                return;
            }
            let seen = std::mem::take(seen);
            let feed = std::mem::take(feed);
            self.decoder = if is_zlib_header(seen[0], seen[1]) {
                Decoder::Zlib(Box::new(ZlibDecoder::new(feed)))
            } else {
                Decoder::RawDeflate(Box::new(DeflateDecoder::new(feed)))
            };
            return self.decode(&seen, at);
        }
        self.decode(bytes, at);
    }

    fn decode(&mut self, bytes: &[u8], at: Duration) {
        let written = match &mut self.decoder {
            Decoder::Gzip(d) => write_through(d.as_mut(), |d| d.get_mut(), bytes, at),
            Decoder::Zlib(d) => write_through(d.as_mut(), |d| d.get_mut(), bytes, at),
            Decoder::RawDeflate(d) => write_through(d.as_mut(), |d| d.get_mut(), bytes, at),
            Decoder::Brotli(d) => write_through(d.as_mut(), |d| d.get_mut(), bytes, at),
            Decoder::Plain(_) | Decoder::DeflateStart(..) | Decoder::Gone => Ok(()),
        };
        if written.is_err() {
            let observer = match std::mem::replace(&mut self.decoder, Decoder::Gone) {
                Decoder::Gzip(mut d) => take_observer(d.get_mut()),
                Decoder::Zlib(mut d) => take_observer(d.get_mut()),
                Decoder::RawDeflate(mut d) => take_observer(d.get_mut()),
                Decoder::Brotli(mut d) => take_observer(d.get_mut()),
                Decoder::Plain(mut f) | Decoder::DeflateStart(_, mut f) => take_observer(&mut f),
                Decoder::Gone => StreamObserver::new(),
            };
            self.failed = Some(observer);
        }
    }

    /// The body could not be decoded (corrupt, or cut inside the coding's framing).
    pub fn undecodable(&self) -> bool {
        self.failed.is_some()
    }

    /// What was read of the decoded stream so far.
    pub fn observer(&self) -> &StreamObserver {
        if let Some(o) = &self.failed {
            return o;
        }
        match &self.decoder {
            Decoder::Plain(f) | Decoder::DeflateStart(_, f) => &f.observer,
            Decoder::Gzip(d) => &d.get_ref().observer,
            Decoder::Zlib(d) => &d.get_ref().observer,
            Decoder::RawDeflate(d) => &d.get_ref().observer,
            Decoder::Brotli(d) => &d.get_ref().observer,
            Decoder::Gone => unreachable!("a failed decoder keeps its observer in `failed`"),
        }
    }

    /// A decoded stream that succeeded: `done` last, no `error`, and decodable throughout.
    pub fn succeeded(&self) -> bool {
        !self.undecodable() && self.observer().succeeded()
    }
}

/// Write `bytes` through a decoder and flush it, so that every event decodable from what
/// arrived reaches the observer now, stamped `at`.
fn write_through<W: Write>(
    decoder: &mut W,
    feed: impl Fn(&mut W) -> &mut Feed,
    bytes: &[u8],
    at: Duration,
) -> std::io::Result<()> {
    feed(decoder).at = at;
    for piece in bytes.chunks(DECODED_PIECE) {
        decoder.write_all(piece)?;
    }
    decoder.flush()
}

fn take_observer(feed: &mut Feed) -> StreamObserver {
    std::mem::take(&mut feed.observer)
}

/// RFC 1950: compression method 8 and a header checksum that divides by 31.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn event(kind: &str, content: &str) -> String {
        format!(
            "event: message\ndata: {}\n\n",
            serde_json::json!({"id": "m", "type": kind, "data": {"content": content}})
        )
    }

    const DONE: &str = "event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n";

    fn answer() -> String {
        format!(
            "{}{}{}{}{DONE}",
            event("thinking", "…"),
            event("text", "Legacy"),
            event("text", " answer 你好"),
            "event: heartbeat\ndata: null\n\n"
        )
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn br(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            e.write_all(data).unwrap();
        }
        out
    }

    fn encoded(coding: Coding, data: &[u8]) -> Vec<u8> {
        match coding {
            Coding::Identity => data.to_vec(),
            Coding::Gzip => gzip(data),
            Coding::Deflate => zlib(data),
            Coding::Brotli => br(data),
        }
    }

    #[test]
    fn codings_are_named_as_http_names_them() {
        assert_eq!(Coding::of(None), Some(Coding::Identity));
        assert_eq!(Coding::of(Some(b"GZIP")), Some(Coding::Gzip));
        assert_eq!(Coding::of(Some(b"x-gzip")), Some(Coding::Gzip));
        assert_eq!(Coding::of(Some(b" br ")), Some(Coding::Brotli));
        assert_eq!(Coding::of(Some(b"deflate")), Some(Coding::Deflate));
        assert_eq!(Coding::of(Some(b"zstd")), None);
        assert_eq!(Coding::of(Some(b"gzip, br")), None);
    }

    #[test]
    fn every_coding_is_read_as_the_plain_stream_is() {
        let plain = answer();
        for coding in [
            Coding::Identity,
            Coding::Gzip,
            Coding::Deflate,
            Coding::Brotli,
        ] {
            let mut o = DecodingObserver::new(coding);
            o.feed(&encoded(coding, plain.as_bytes()), MS);
            assert!(o.succeeded(), "{coding:?}");
            let seen = o.observer();
            assert_eq!(seen.events, 5, "{coding:?}");
            assert_eq!(seen.text_chars, 16, "{coding:?}");
            assert_eq!(seen.first_content, Some(MS), "{coding:?}");
        }
        let mut raw = DecodingObserver::new(Coding::Deflate);
        raw.feed(&raw_deflate(plain.as_bytes()), MS);
        assert!(raw.succeeded(), "raw deflate under the name deflate");
    }

    /// The stream compressed with a sync flush after each event, as a compressor that flushes
    /// per event sends it: each event is read when its own piece arrives, not at the end.
    #[test]
    fn flushed_events_are_read_when_they_arrive() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut pieces = Vec::new();
        for ev in [event("thinking", "…"), event("text", "a"), DONE.to_string()] {
            e.write_all(ev.as_bytes()).unwrap();
            e.flush().unwrap();
            pieces.push(std::mem::take(e.get_mut()));
        }
        pieces.push(e.finish().unwrap());
        let mut o = DecodingObserver::new(Coding::Gzip);
        for (i, p) in pieces.iter().enumerate() {
            o.feed(p, MS * (i as u32 + 1));
        }
        let seen = o.observer();
        assert_eq!(
            seen.first_event,
            Some(MS),
            "the thinking event, at its piece"
        );
        assert_eq!(
            seen.first_content,
            Some(MS * 2),
            "the text, at its own piece"
        );
        assert!(o.succeeded());
    }

    #[test]
    fn a_corrupt_body_is_undecodable_and_fails() {
        // A gzip header, then a deflate block of the reserved type 3: no decoder reads past it.
        let mut body = gzip(answer().as_bytes())[..10].to_vec();
        body.extend_from_slice(&[0xff; 16]);
        let mut o = DecodingObserver::new(Coding::Gzip);
        o.feed(&body, MS);
        assert!(o.undecodable());
        assert!(!o.succeeded());
        o.feed(&gzip(answer().as_bytes()), MS);
        assert!(o.undecodable() && !o.succeeded(), "stays failed");
        // Garbled in the middle: whatever the decoder makes of it, no `done` is read.
        let mut body = gzip(answer().as_bytes());
        let half = body.len() / 2;
        body[half..].iter_mut().for_each(|b| *b = !*b);
        let mut o = DecodingObserver::new(Coding::Gzip);
        o.feed(&body, MS);
        assert!(!o.succeeded());
        let mut o = DecodingObserver::new(Coding::Brotli);
        o.feed(b"\xff\xff\xff\xff not brotli at all", MS);
        assert!(!o.succeeded());
    }

    #[test]
    fn a_bomb_passes_through_in_bounded_pieces() {
        let mut data = event("text", &"x".repeat(1000));
        data = data.repeat(4000);
        data.push_str(DONE);
        let small = gzip(data.as_bytes());
        assert!(small.len() < data.len() / 50);
        let mut o = DecodingObserver::new(Coding::Gzip);
        o.feed(&small, MS);
        assert!(o.succeeded());
        assert_eq!(o.observer().text_chars, 4_000_000);
    }

    proptest! {
        #[test]
        fn any_cut_of_an_encoded_stream_reads_the_same(
            coding in prop_oneof![Just(Coding::Gzip), Just(Coding::Deflate), Just(Coding::Brotli)],
            cuts in proptest::collection::vec(0usize..2000, 0..16),
        ) {
            let plain = answer().repeat(3);
            let body = encoded(coding, plain.as_bytes());
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            points.sort_unstable();
            let mut o = DecodingObserver::new(coding);
            let mut from = 0;
            for p in points.into_iter().chain([body.len()]) {
                o.feed(&body[from..p], MS);
                from = p;
            }
            prop_assert!(o.succeeded());
            prop_assert_eq!(o.observer().events, 15);
            prop_assert_eq!(o.observer().text_chars, 48);
        }
    }
}
