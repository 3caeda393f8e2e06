//! A strict incremental validator of a chunked request body (RFC 9112 §7.1), fed the bytes as
//! they arrive in pieces of any size.
//!
//! Pingora decodes chunked bodies with `httparse::parse_chunk_size`, which takes a size line
//! with no digits (`\r\n`, ` `, `;x`) for the last chunk: a body that ends early for the proxy
//! and goes on for the upstream, i.e. a smuggled request. The front door runs every chunked
//! request body through this validator first, and the bytes only reach Pingora once they are
//! known to be well framed, so Pingora's lenient decoder only ever sees input both agree on.
//!
//! Accepted: `1*HEXDIG` sizes up to 2^63 - 1, extensions `;name` or `;name=value` (token or
//! quoted-string, no whitespace), CRLF line ends, trailer fields `name:value` and the final
//! CRLF. Everything else, bare LF included, is refused.

/// Longest size line (digits and extensions) before its CRLF.
pub const MAX_SIZE_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk (Pingora itself allows 64 KiB).
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body was refused; `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    /// A size line without hex digits, or with a byte that is neither a digit nor an extension.
    BadSize,
    /// A size above 2^63 - 1.
    SizeOverflow,
    /// A malformed chunk extension.
    BadExtension,
    /// A size line longer than `MAX_SIZE_LINE`.
    LineTooLong,
    /// A chunk's data not followed by CRLF, or a CR not followed by LF.
    BadLineEnd,
    /// A malformed trailer field.
    BadTrailer,
    /// More trailer bytes than `MAX_TRAILER_BYTES`.
    TrailersTooLarge,
}

impl ChunkedError {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkedError::BadSize => "chunk_size",
            ChunkedError::SizeOverflow => "chunk_size",
            ChunkedError::BadExtension => "chunk_extension",
            ChunkedError::LineTooLong => "chunk_size",
            ChunkedError::BadLineEnd => "chunk_framing",
            ChunkedError::BadTrailer => "chunk_trailer",
            ChunkedError::TrailersTooLarge => "chunk_trailer",
        }
    }
}

impl std::fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid chunked request body ({self:?})")
    }
}

impl std::error::Error for ChunkedError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the size digits; `digits` read so far.
    Size {
        digits: usize,
    },
    /// After `;`: the first byte of an extension name.
    ExtNameStart,
    ExtName,
    /// After `=`: the first byte of a value.
    ExtValueStart,
    ExtToken,
    ExtQuoted,
    /// After `\` inside a quoted string.
    ExtQuotedPair,
    /// After the closing quote: `;` or CR.
    ExtAfterQuoted,
    /// Read the size line's CR.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    TrailerName,
    TrailerValue,
    /// The CR of a trailer line.
    TrailerLf,
    /// The CR of the final empty line.
    FinalLf,
    Done,
}

/// The validator for one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedValidator {
    state: State,
    size: u64,
    /// Data bytes left in the current chunk.
    remaining: u64,
    line_len: usize,
    trailer_bytes: usize,
}

impl Default for ChunkedValidator {
    fn default() -> Self {
        Self::new()
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_qdtext(b: u8) -> bool {
    b == b'\t'
        || b == b' '
        || b == 0x21
        || (0x23..=0x5B).contains(&b)
        || (0x5D..=0x7E).contains(&b)
        || b >= 0x80
}

fn is_field_vchar(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7E).contains(&b) || b >= 0x80
}

impl ChunkedValidator {
    pub fn new() -> Self {
        ChunkedValidator {
            state: State::Size { digits: 0 },
            size: 0,
            remaining: 0,
            line_len: 0,
            trailer_bytes: 0,
        }
    }

    /// The whole body, trailers and final CRLF included, has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Validate the next bytes. Returns how many belong to the body: all of `input` unless the
    /// body ends inside it (the rest is the next request's). An error is final.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Done {
                return Ok(i);
            }
            if self.state == State::Data {
                // Chunk data is opaque: skip it in one step.
                let take = (self.remaining.min((input.len() - i) as u64)) as usize;
                self.remaining -= take as u64;
                i += take;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn size_line_byte(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > MAX_SIZE_LINE {
            return Err(ChunkedError::LineTooLong);
        }
        Ok(())
    }

    fn trailer_byte(&mut self) -> Result<(), ChunkedError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(ChunkedError::TrailersTooLarge);
        }
        Ok(())
    }

    /// The size line ended (its CR was read).
    fn end_size_line(&mut self) {
        self.state = State::SizeLf;
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkedError> {
        use State::*;
        match self.state {
            Size { digits } => {
                self.size_line_byte()?;
                if let Some(d) = (b as char).to_digit(16) {
                    let next = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(d as u64))
                        .filter(|s| *s <= i64::MAX as u64)
                        .ok_or(ChunkedError::SizeOverflow)?;
                    self.size = next;
                    self.state = Size { digits: digits + 1 };
                } else if digits == 0 {
                    return Err(ChunkedError::BadSize);
                } else if b == b';' {
                    self.state = ExtNameStart;
                } else if b == b'\r' {
                    self.end_size_line();
                } else {
                    return Err(ChunkedError::BadSize);
                }
            }
            ExtNameStart => {
                self.size_line_byte()?;
                if !is_tchar(b) {
                    return Err(ChunkedError::BadExtension);
                }
                self.state = ExtName;
            }
            ExtName => {
                self.size_line_byte()?;
                match b {
                    b';' => self.state = ExtNameStart,
                    b'=' => self.state = ExtValueStart,
                    b'\r' => self.end_size_line(),
                    b if is_tchar(b) => {}
                    _ => return Err(ChunkedError::BadExtension),
                }
            }
            ExtValueStart => {
                self.size_line_byte()?;
                match b {
                    b'"' => self.state = ExtQuoted,
                    b if is_tchar(b) => self.state = ExtToken,
                    _ => return Err(ChunkedError::BadExtension),
                }
            }
            ExtToken => {
                self.size_line_byte()?;
                match b {
                    b';' => self.state = ExtNameStart,
                    b'\r' => self.end_size_line(),
                    b if is_tchar(b) => {}
                    _ => return Err(ChunkedError::BadExtension),
                }
            }
            ExtQuoted => {
                self.size_line_byte()?;
                match b {
                    b'"' => self.state = ExtAfterQuoted,
                    b'\\' => self.state = ExtQuotedPair,
                    b if is_qdtext(b) => {}
                    _ => return Err(ChunkedError::BadExtension),
                }
            }
            ExtQuotedPair => {
                self.size_line_byte()?;
                if !is_field_vchar(b) {
                    return Err(ChunkedError::BadExtension);
                }
                self.state = ExtQuoted;
            }
            ExtAfterQuoted => {
                self.size_line_byte()?;
                match b {
                    b';' => self.state = ExtNameStart,
                    b'\r' => self.end_size_line(),
                    _ => return Err(ChunkedError::BadExtension),
                }
            }
            SizeLf => {
                if b != b'\n' {
                    return Err(ChunkedError::BadLineEnd);
                }
                self.line_len = 0;
                if self.size == 0 {
                    self.state = TrailerStart;
                } else {
                    self.remaining = self.size;
                    self.state = Data;
                }
            }
            Data => unreachable!("chunk data is skipped in feed"),
            DataCr => {
                if b != b'\r' {
                    return Err(ChunkedError::BadLineEnd);
                }
                self.state = DataLf;
            }
            DataLf => {
                if b != b'\n' {
                    return Err(ChunkedError::BadLineEnd);
                }
                self.size = 0;
                self.state = Size { digits: 0 };
            }
            TrailerStart => {
                if b == b'\r' {
                    self.state = FinalLf;
                } else {
                    self.trailer_byte()?;
                    if !is_tchar(b) {
                        return Err(ChunkedError::BadTrailer);
                    }
                    self.state = TrailerName;
                }
            }
            TrailerName => {
                self.trailer_byte()?;
                match b {
                    b':' => self.state = TrailerValue,
                    b if is_tchar(b) => {}
                    _ => return Err(ChunkedError::BadTrailer),
                }
            }
            TrailerValue => {
                self.trailer_byte()?;
                match b {
                    b'\r' => self.state = TrailerLf,
                    b if is_field_vchar(b) => {}
                    _ => return Err(ChunkedError::BadTrailer),
                }
            }
            TrailerLf => {
                self.trailer_byte()?;
                if b != b'\n' {
                    return Err(ChunkedError::BadLineEnd);
                }
                self.state = TrailerStart;
            }
            FinalLf => {
                if b != b'\n' {
                    return Err(ChunkedError::BadLineEnd);
                }
                self.state = Done;
            }
            Done => unreachable!("feed stops at the end of the body"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feed `input` whole: `Ok(body length)` once the body ends, `Err(None)` if it is unfinished.
    fn run(input: &[u8]) -> Result<usize, Option<ChunkedError>> {
        let mut v = ChunkedValidator::new();
        let n = v.feed(input).map_err(Some)?;
        if v.is_done() {
            Ok(n)
        } else {
            Err(None)
        }
    }

    #[test]
    fn well_framed_bodies_end_where_the_final_crlf_does() {
        for body in [
            &b"0\r\n\r\n"[..],
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5;name\r\nhello\r\n0\r\n\r\n",
            b"5;a=b;c=\"x y\\\"z\"\r\nhello\r\n0;last\r\n\r\n",
            b"000A\r\n0123456789\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nExpires:never\r\nX-Sum: 1\r\n\r\n",
            b"7fffffffffffffff\r\n",
        ] {
            if body.ends_with(b"\r\n\r\n") {
                assert_eq!(run(body), Ok(body.len()), "{}", body.escape_ascii());
                let mut next = body.to_vec();
                next.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(run(&next), Ok(body.len()), "{}", body.escape_ascii());
            } else {
                assert_eq!(run(body), Err(None), "{}", body.escape_ascii());
            }
        }
    }

    #[test]
    fn the_smuggling_body_is_refused_at_its_empty_size_line() {
        let body = b"5\r\nhello\r\n\r\n31\r\nX: y\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: example\r\n\r\n\r\n0\r\n\r\n";
        let mut v = ChunkedValidator::new();
        assert_eq!(v.feed(&body[..10]), Ok(10));
        assert_eq!(v.feed(&body[10..]), Err(ChunkedError::BadSize));
    }

    #[test]
    fn hostile_size_lines_and_framing_are_refused() {
        use ChunkedError::*;
        for (body, want) in [
            (&b"\r\n\r\n"[..], BadSize),
            (b" \r\n\r\n", BadSize),
            (b"\t\r\n\r\n", BadSize),
            (b";x\r\n\r\n", BadSize),
            (b"5 \r\nhello\r\n0\r\n\r\n", BadSize),
            (b" 5\r\nhello\r\n0\r\n\r\n", BadSize),
            (b"0x5\r\nhello\r\n0\r\n\r\n", BadSize),
            (b"+5\r\nhello\r\n0\r\n\r\n", BadSize),
            (b"5\nhello\r\n0\r\n\r\n", BadSize),
            (b"5\r\nhello\n0\r\n\r\n", BadLineEnd),
            (b"5\r\nhelloX\r\n0\r\n\r\n", BadLineEnd),
            (b"5\r\rhello\r\n0\r\n\r\n", BadLineEnd),
            (b"0\r\n\n", BadTrailer),
            (b"0\r\n\r\r", BadLineEnd),
            (b"8000000000000000\r\n", SizeOverflow),
            (b"ffffffffffffffffff\r\n", SizeOverflow),
            (b"5; a\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"5;a =b\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"5;=b\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"5;a=\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"5;a=\"b\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"5;a=\"b\"c\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"5;\r\nhello\r\n0\r\n\r\n", BadExtension),
            (b"0\r\nX : y\r\n\r\n", BadTrailer),
            (b"0\r\n: y\r\n\r\n", BadTrailer),
            (b"0\r\n y\r\n\r\n", BadTrailer),
            (b"0\r\nX: \x01\r\n\r\n", BadTrailer),
            (b"0\r\nX: y\n\r\n", BadTrailer),
        ] {
            assert_eq!(run(body), Err(Some(want)), "{}", body.escape_ascii());
        }
    }

    #[test]
    fn size_lines_and_trailers_are_bounded() {
        let mut line = b"5;".to_vec();
        line.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE));
        assert_eq!(run(&line), Err(Some(ChunkedError::LineTooLong)));
        let mut zeros = vec![b'0'; MAX_SIZE_LINE + 1];
        zeros.extend_from_slice(b"5\r\n");
        assert_eq!(run(&zeros), Err(Some(ChunkedError::LineTooLong)));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILER_BYTES / 8 + 1 {
            trailers.extend_from_slice(b"X:abcd\r\n");
        }
        assert_eq!(run(&trailers), Err(Some(ChunkedError::TrailersTooLarge)));
    }

    /// A valid body and the offsets of its structural LFs (outside chunk data).
    fn valid_body() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        let chunk = (
            proptest::collection::vec(any::<u8>(), 1..40),
            proptest::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
            0usize..3,
        );
        (
            proptest::collection::vec(chunk, 0..6),
            proptest::collection::vec("[A-Za-z-]{1,8}: ?[ -~]{0,12}", 0..3),
        )
            .prop_map(|(chunks, trailers)| {
                let mut out = Vec::new();
                let mut lfs = Vec::new();
                let mut crlf = |out: &mut Vec<u8>| {
                    out.extend_from_slice(b"\r\n");
                    lfs.push(out.len() - 1);
                };
                for (data, ext, zeros) in chunks {
                    out.extend(std::iter::repeat_n(b'0', zeros));
                    out.extend_from_slice(format!("{:x}", data.len()).as_bytes());
                    if let Some(e) = ext {
                        out.push(b';');
                        out.extend_from_slice(e.as_bytes());
                    }
                    crlf(&mut out);
                    out.extend_from_slice(&data);
                    crlf(&mut out);
                }
                out.extend_from_slice(b"0");
                crlf(&mut out);
                for t in trailers {
                    out.extend_from_slice(t.as_bytes());
                    crlf(&mut out);
                }
                crlf(&mut out);
                (out, lfs)
            })
    }

    proptest! {
        #[test]
        fn any_split_of_a_valid_body_is_accepted_and_ends_at_its_end(
            (body, _) in valid_body(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            next in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut input = body.clone();
            input.extend_from_slice(&next);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            cuts.sort();
            let mut v = ChunkedValidator::new();
            let (mut at, mut consumed) = (0, 0);
            for cut in cuts.into_iter().chain([input.len()]) {
                if v.is_done() {
                    break;
                }
                consumed += v.feed(&input[at..cut]).unwrap();
                at = cut;
            }
            prop_assert!(v.is_done());
            prop_assert_eq!(consumed, body.len());
        }

        #[test]
        fn a_corrupted_line_end_is_refused(
            (body, lfs) in valid_body(),
            pick in any::<prop::sample::Index>(),
            by in prop::sample::select(vec![b' ', b'\r', b'x', b'\t']),
        ) {
            let mut bad = body.clone();
            bad[lfs[pick.index(lfs.len())]] = by;
            prop_assert!(ChunkedValidator::new().feed(&bad).is_err());
        }
    }
}
