//! JSON text read the way serde_json reads it, without building anything: a scanner that checks
//! each value and hands it back as the text the runtime wrote, and writers that turn a JSON
//! string's text into exactly the bytes serde_json writes for the string it means (or into the
//! string itself).
//!
//! The Agent2UI rewrite reads every runtime frame with these in one pass. They accept and refuse
//! exactly what serde_json accepts and refuses (the property tests below hold them to it): the
//! same grammar, whitespace and escapes; keys and the strings a caller asks to be checked must
//! not hold an unpaired UTF-16 surrogate escape, as when serde_json reads a `String`; values
//! skipped over are only checked for syntax, as serde_json's `IgnoredAny` and `RawValue` do.

/// The text is not JSON as serde_json reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

pub type Result<T> = std::result::Result<T, Invalid>;

/// A JSON string: its text between the quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Str<'a> {
    pub inner: &'a str,
    /// It holds a backslash escape, so `inner` is not the string itself.
    pub escaped: bool,
    /// Its `\u` escapes pair up: serde_json would read it as a `String`.
    pub paired: bool,
    /// Where [`Scanner::value_writing`] wrote it, escaped as serde_json writes it (`start..end`
    /// of its sink; empty when not written).
    pub written: (u32, u32),
}

/// One value as the runtime wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value<'a> {
    /// The value's text, without the whitespace around it.
    pub text: &'a str,
    pub kind: Kind<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    Str(Str<'a>),
    /// An object or array; `multiline`: CR or LF between its tokens.
    Container {
        multiline: bool,
    },
    /// A number, `true`, `false` or `null`.
    Scalar,
}

/// Reads one JSON document from its start; positions are byte offsets into `text`.
pub struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Self {
        Scanner { text, pos: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// Skip whitespace; the next byte, if any.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.bytes();
        while let Some(&b) = bytes.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    /// Like [`Scanner::peek`], noting CR or LF skipped.
    #[inline]
    fn peek_noting_lines(&mut self, lines: &mut bool) -> Option<u8> {
        let bytes = self.bytes();
        while let Some(&b) = bytes.get(self.pos) {
            match b {
                b' ' | b'\t' => {}
                b'\n' | b'\r' => *lines = true,
                _ => return Some(b),
            }
            self.pos += 1;
        }
        None
    }

    #[inline]
    fn expect(&mut self, byte: u8) -> Result<()> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    /// Only whitespace is left.
    #[inline]
    pub fn end(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Invalid),
        }
    }

    /// The next value is `null` (consumed), as serde_json's `Option` reads it.
    #[inline]
    pub fn null(&mut self) -> Result<bool> {
        if self.peek() != Some(b'n') {
            return Ok(false);
        }
        self.literal(b"null")?;
        Ok(true)
    }

    /// Enter the object that must come next.
    #[inline]
    pub fn object(&mut self) -> Result<Object> {
        self.expect(b'{')?;
        Ok(Object { first: true })
    }

    /// Enter the array that must come next.
    pub fn array(&mut self) -> Result<Array> {
        self.expect(b'[')?;
        Ok(Array { first: true })
    }

    /// Read one value, checking it as serde_json's `IgnoredAny` does; an object or array nested
    /// deeper than `max_depth` is refused. Never recursive: any depth is safe to read.
    #[inline]
    pub fn value(&mut self, max_depth: usize) -> Result<Value<'a>> {
        self.value_into(max_depth, None)
    }

    /// [`Scanner::value`], and a string with escapes is written to `sink` on the way, quoted and
    /// escaped as serde_json writes the string it stands for (see [`Str::written`]): what
    /// [`write_str`] would write, without a second pass over its escapes. Whatever it writes
    /// for a string whose escapes do not pair up is of no use.
    #[inline]
    pub fn value_writing(&mut self, max_depth: usize, sink: &mut Vec<u8>) -> Result<Value<'a>> {
        self.value_into(max_depth, Some(sink))
    }

    #[inline(always)]
    fn value_into(&mut self, max_depth: usize, sink: Option<&mut Vec<u8>>) -> Result<Value<'a>> {
        let first = self.peek().ok_or(Invalid)?;
        let start = self.pos;
        let kind = match first {
            b'"' => {
                self.pos += 1;
                Kind::Str(self.string(sink)?)
            }
            b'[' | b'{' => Kind::Container {
                multiline: self.container(max_depth)?,
            },
            _ => {
                self.scalar(first)?;
                Kind::Scalar
            }
        };
        Ok(Value {
            text: &self.text[start..self.pos],
            kind,
        })
    }

    fn scalar(&mut self, first: u8) -> Result<()> {
        match first {
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Invalid),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<()> {
        if self.bytes()[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    fn digits(&mut self) -> usize {
        let bytes = self.bytes();
        let start = self.pos;
        while bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<()> {
        let bytes = self.bytes();
        if bytes[self.pos] == b'-' {
            self.pos += 1;
        }
        match bytes.get(self.pos) {
            Some(b'0') => {
                self.pos += 1;
                if bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
                    return Err(Invalid);
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(Invalid),
        }
        if bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(Invalid);
            }
        }
        if matches!(bytes.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(bytes.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(Invalid);
            }
        }
        Ok(())
    }

    /// The rest of a string whose opening quote was read (written to `sink` if it has escapes).
    #[inline(always)]
    fn string(&mut self, sink: Option<&mut Vec<u8>>) -> Result<Str<'a>> {
        let bytes = self.bytes();
        let start = self.pos;
        let at = start + special(&bytes[start..]).ok_or(Invalid)?;
        if bytes[at] != b'"' {
            return self.escaped_string(start, at, sink);
        }
        self.pos = at + 1;
        Ok(Str {
            inner: self.text.get(start..at).ok_or(Invalid)?,
            escaped: false,
            paired: true,
            written: (0, 0),
        })
    }

    /// The rest of a string from `at`, its first backslash or control character.
    #[inline(never)]
    fn escaped_string(
        &mut self,
        start: usize,
        mut at: usize,
        mut sink: Option<&mut Vec<u8>>,
    ) -> Result<Str<'a>> {
        let bytes = self.bytes();
        let mut paired = true;
        // The last escape was a leading surrogate (this one): the next bytes must be its
        // trailing one.
        let mut want_trail = None;
        let begin = sink.as_ref().map_or(0, |sink| sink.len());
        if let Some(sink) = sink.as_deref_mut() {
            // The string, written, is no longer than it is in the frame (an escape never
            // becomes longer) and ends before the frame does: no growing on the way.
            sink.reserve(bytes.len() - start + 2);
            sink.push(b'"');
            sink.extend_from_slice(&bytes[start..at]);
        }
        loop {
            // The usual escaped text, a run of `\uXXXX` of CJK (BMP beyond Latin, no
            // surrogate), goes in three bytes of UTF-8 each without the general case's checks.
            if want_trail.is_none() {
                while let Some([b'\\', b'u', digits @ ..]) = bytes.get(at..at + 6) {
                    let Ok(unit @ 0x800..0xD800) = hex4(digits) else {
                        break;
                    };
                    at += 6;
                    if let Some(sink) = sink.as_deref_mut() {
                        sink.extend_from_slice(&[
                            0xE0 | (unit >> 12) as u8,
                            0x80 | (unit >> 6 & 0x3F) as u8,
                            0x80 | (unit & 0x3F) as u8,
                        ]);
                    }
                }
            }
            // Plain text up to the next escape, quote or control character.
            if bytes.get(at) != Some(&b'\\') {
                let run = special(&bytes[at..]).ok_or(Invalid)?;
                if run > 0 {
                    paired &= want_trail.is_none();
                    want_trail = None;
                    if let Some(sink) = sink.as_deref_mut() {
                        sink.extend_from_slice(&bytes[at..at + run]);
                    }
                }
                at += run;
            }
            match bytes[at] {
                b'\\' => {}
                b'"' => {
                    self.pos = at + 1;
                    let end = sink.map_or(0, |sink| {
                        sink.push(b'"');
                        sink.len()
                    });
                    return Ok(Str {
                        inner: self.text.get(start..at).ok_or(Invalid)?,
                        escaped: true,
                        paired: paired && want_trail.is_none(),
                        written: (
                            u32::try_from(begin).map_err(|_| Invalid)?,
                            u32::try_from(end).map_err(|_| Invalid)?,
                        ),
                    });
                }
                // A control character.
                _ => return Err(Invalid),
            }
            let kind = *bytes.get(at + 1).ok_or(Invalid)?;
            if kind == b'u' {
                let unit = hex4(bytes.get(at + 2..at + 6).ok_or(Invalid)?)?;
                at += 6;
                if unit & 0xF800 != 0xD800 {
                    paired &= want_trail.is_none();
                    want_trail = None;
                    if let Some(sink) = sink.as_deref_mut() {
                        push_unit(sink, unit);
                    }
                } else if unit < 0xDC00 {
                    paired &= want_trail.is_none();
                    want_trail = Some(unit);
                } else if let Some(lead) = want_trail.take() {
                    if let Some(sink) = sink.as_deref_mut() {
                        let c = 0x10000 + ((lead - 0xD800) << 10) + (unit - 0xDC00);
                        push_escaped_char(sink, char::from_u32(c).ok_or(Invalid)?);
                    }
                } else {
                    paired = false;
                }
            } else if matches!(kind, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') {
                at += 2;
                paired &= want_trail.is_none();
                want_trail = None;
                if let Some(sink) = sink.as_deref_mut() {
                    // serde_json writes these back the same way, but for `/`.
                    if kind == b'/' {
                        sink.push(b'/');
                    } else {
                        sink.extend_from_slice(&[b'\\', kind]);
                    }
                }
            } else {
                return Err(Invalid);
            }
        }
    }

    /// An object or array, to its closing bracket; whether CR or LF came between its tokens.
    fn container(&mut self, max_depth: usize) -> Result<bool> {
        let mut lines = false;
        let mut open = Open::default();
        loop {
            // A value is due.
            let b = self.peek_noting_lines(&mut lines).ok_or(Invalid)?;
            match b {
                b'[' | b'{' => {
                    self.pos += 1;
                    open.push(b == b'{');
                    if open.depth > max_depth {
                        return Err(Invalid);
                    }
                    let close = if b == b'{' { b'}' } else { b']' };
                    match self.peek_noting_lines(&mut lines) {
                        // Empty: closed below, as after a value.
                        Some(c) if c == close => {}
                        Some(_) if b == b'{' => {
                            self.key_colon(&mut lines)?;
                            continue;
                        }
                        Some(_) => continue,
                        None => return Err(Invalid),
                    }
                }
                b'"' => {
                    self.pos += 1;
                    self.string(None)?;
                }
                _ => self.scalar(b)?,
            }
            // A value ended: a comma, or closing brackets.
            loop {
                if open.depth == 0 {
                    return Ok(lines);
                }
                let in_object = open.innermost_is_object();
                match self.peek_noting_lines(&mut lines) {
                    Some(b',') => {
                        self.pos += 1;
                        if in_object {
                            self.key_colon(&mut lines)?;
                        }
                        break;
                    }
                    Some(b'}') if in_object => {}
                    Some(b']') if !in_object => {}
                    _ => return Err(Invalid),
                }
                self.pos += 1;
                open.pop();
            }
        }
    }

    /// `"key" :` inside a skipped object (the key is only checked for syntax).
    fn key_colon(&mut self, lines: &mut bool) -> Result<()> {
        if self.peek_noting_lines(lines) != Some(b'"') {
            return Err(Invalid);
        }
        self.pos += 1;
        self.string(None)?;
        if self.peek_noting_lines(lines) != Some(b':') {
            return Err(Invalid);
        }
        self.pos += 1;
        Ok(())
    }
}

/// Inside an object, as serde_json's map access walks it.
pub struct Object {
    first: bool,
}

impl Object {
    /// The next key (then its colon), or `None` at the closing brace. Keys are read as
    /// serde_json reads a map's keys: as strings, so their escapes must pair up.
    #[inline(always)]
    pub fn next_key<'a>(&mut self, s: &mut Scanner<'a>) -> Result<Option<Str<'a>>> {
        match s.peek() {
            Some(b'}') => {
                s.pos += 1;
                return Ok(None);
            }
            Some(b',') if !self.first => {
                s.pos += 1;
                if s.peek() != Some(b'"') {
                    return Err(Invalid);
                }
            }
            Some(b'"') if self.first => {}
            _ => return Err(Invalid),
        }
        self.first = false;
        s.pos += 1;
        let key = s.string(None)?;
        if !key.paired {
            return Err(Invalid);
        }
        s.expect(b':')?;
        Ok(Some(key))
    }

    /// [`Object::next_key`], telling which of `listed` (plain ASCII names) it is. A listed key
    /// written as the runtime writes it (`, "name": `) is matched as it stands, without reading
    /// it as a string; any other spelling is read and compared in full, to the same effect.
    #[inline(always)]
    pub fn next_key_among<'a>(
        &mut self,
        s: &mut Scanner<'a>,
        listed: &[&str],
    ) -> Result<Option<Key<'a>>> {
        let bytes = s.bytes();
        let mut at = s.pos;
        let plain = if self.first {
            true
        } else if bytes.get(at) == Some(&b',') {
            at += 1;
            at += usize::from(bytes.get(at) == Some(&b' '));
            true
        } else {
            false
        };
        if plain && bytes.get(at) == Some(&b'"') {
            let rest = &bytes[at + 1..];
            for (i, name) in listed.iter().enumerate() {
                let n = name.len();
                if rest.get(..n) == Some(name.as_bytes()) && rest.get(n..n + 2) == Some(b"\":") {
                    s.pos = at + 1 + n + 2;
                    self.first = false;
                    return Ok(Some(Key::Listed(i)));
                }
            }
        }
        let Some(key) = self.next_key(s)? else {
            return Ok(None);
        };
        let text = unescape(key)?;
        Ok(Some(
            listed
                .iter()
                .position(|name| *name == text)
                .map_or(Key::Other(key), Key::Listed),
        ))
    }
}

/// A key read by [`Object::next_key_among`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// The key is `listed[i]`.
    Listed(usize),
    Other(Str<'a>),
}

/// Inside an array.
pub struct Array {
    first: bool,
}

impl Array {
    /// Whether another element follows (its value is read next), or the array closed.
    pub fn next(&mut self, s: &mut Scanner) -> Result<bool> {
        match s.peek() {
            Some(b']') => {
                s.pos += 1;
                return Ok(false);
            }
            Some(b',') if !self.first => {
                s.pos += 1;
            }
            Some(_) if self.first => {}
            _ => return Err(Invalid),
        }
        self.first = false;
        Ok(true)
    }
}

/// The containers open around the scanner: one bit each (set for an object), the innermost 64
/// in a register and any deeper ones spilled, so that no nesting needs recursion.
#[derive(Default)]
struct Open {
    depth: usize,
    bits: u64,
    spilled: Vec<u64>,
}

impl Open {
    fn push(&mut self, object: bool) {
        if self.depth > 0 && self.depth % 64 == 0 {
            self.spilled.push(self.bits);
            self.bits = 0;
        }
        self.bits = self.bits << 1 | u64::from(object);
        self.depth += 1;
    }

    fn pop(&mut self) {
        self.depth -= 1;
        self.bits >>= 1;
        if self.depth > 0 && self.depth % 64 == 0 {
            self.bits = self.spilled.pop().expect("spilled with the 65th level");
        }
    }

    fn innermost_is_object(&self) -> bool {
        self.bits & 1 == 1
    }
}

/// Offset of the first `"`, `\` or control character (none may stand in a string as it is).
/// Strings are mostly short, so the first 64 bytes are looked at eight at a time; past them (a
/// long answer) the search is vectorised.
#[inline(always)]
fn special(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    // High bit set in each byte below `n` (exact up to the first such byte, which is all we use).
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGHS;
    let mut at = 0;
    while at < 64 {
        let Some(word) = bytes.get(at..at + 8) else {
            return bytes[at..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .map(|i| at + i);
        };
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let hits = below(w, 0x20) | below(w ^ QUOTES, 1) | below(w ^ BACKSLASHES, 1);
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    long_special(&bytes[at..]).map(|i| at + i)
}

/// [`special`] past the first 64 bytes.
#[inline(never)]
fn long_special(bytes: &[u8]) -> Option<usize> {
    let Some(end) = memchr::memchr2(b'"', b'\\', bytes) else {
        return bytes.iter().position(|&b| b < 0x20);
    };
    let run = &bytes[..end];
    // Without an early exit the compiler checks sixteen bytes at a time.
    if run.iter().fold(false, |seen, &b| seen | (b < 0x20)) {
        return run.iter().position(|&b| b < 0x20);
    }
    Some(end)
}

/// Each byte's value as a hex digit, or 0xFF.
static HEX_VALUE: [u8; 256] = {
    let mut table = [0xFF; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Four hex digits (either case).
#[inline]
fn hex4(digits: &[u8]) -> Result<u32> {
    let [a, b, c, d] = digits else {
        return Err(Invalid);
    };
    let [a, b, c, d] = [a, b, c, d].map(|&x| u32::from(HEX_VALUE[usize::from(x)]));
    if (a | b | c | d) > 0xF {
        return Err(Invalid);
    }
    Ok(a << 12 | b << 8 | c << 4 | d)
}

/// The code point of the `\uXXXX` (or surrogate pair) at the start of `rest` (just after the
/// `\u`), and how many bytes it took; `Invalid` for an unpaired surrogate.
#[inline]
fn code_point(rest: &[u8]) -> Result<(char, usize)> {
    let unit = hex4(rest.get(..4).ok_or(Invalid)?)?;
    let (cp, used) = match unit {
        0xD800..=0xDBFF => {
            let tail = rest.get(4..10).ok_or(Invalid)?;
            if &tail[..2] != b"\\u" {
                return Err(Invalid);
            }
            let low = hex4(&tail[2..])?;
            if !(0xDC00..=0xDFFF).contains(&low) {
                return Err(Invalid);
            }
            (0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00), 10)
        }
        0xDC00..=0xDFFF => return Err(Invalid),
        unit => (unit, 4),
    };
    Ok((char::from_u32(cp).ok_or(Invalid)?, used))
}

/// The character a simple (non-`u`) escape stands for.
#[inline]
fn simple_escape(kind: u8) -> Result<char> {
    Ok(match kind {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        _ => return Err(Invalid),
    })
}

/// Append the character of a `\uXXXX` escape that is no surrogate, as serde_json writes it.
#[inline]
fn push_unit(out: &mut Vec<u8>, unit: u32) {
    match unit {
        0x800.. => out.extend_from_slice(&[
            0xE0 | (unit >> 12) as u8,
            0x80 | (unit >> 6 & 0x3F) as u8,
            0x80 | (unit & 0x3F) as u8,
        ]),
        0x80.. => out.extend_from_slice(&[0xC0 | (unit >> 6) as u8, 0x80 | (unit & 0x3F) as u8]),
        _ => push_escaped_char(out, char::from(unit as u8)),
    }
}

/// Append `c` as serde_json writes it inside a string: `"`, `\` and control characters escaped
/// (`\b \t \n \f \r`, else `\u00xx`), everything else as UTF-8.
#[inline]
fn push_escaped_char(out: &mut Vec<u8>, c: char) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let cp = c as u32;
    if cp >= 0x80 {
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        return;
    }
    let b = cp as u8;
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        b'\t' => out.extend_from_slice(b"\\t"),
        b'\n' => out.extend_from_slice(b"\\n"),
        0x0C => out.extend_from_slice(b"\\f"),
        b'\r' => out.extend_from_slice(b"\\r"),
        0..=0x1F => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0xF)],
        ]),
        _ => out.push(b),
    }
}

/// Append, quoted, the bytes serde_json writes for the string `s` stands for: the same as
/// `serde_json::to_writer(out, &unescaped)`, without unescaping it first. `Invalid` (with
/// part of it appended) for an unpaired surrogate escape.
pub fn write_str(out: &mut Vec<u8>, s: Str) -> Result<()> {
    out.reserve(s.inner.len() + 2);
    out.push(b'"');
    let mut rest = s.inner.as_bytes();
    if s.escaped {
        while let Some(at) = memchr::memchr(b'\\', rest) {
            // Between escapes there is nothing serde_json would escape: no quote, backslash or
            // control character survives the scanner unescaped.
            out.extend_from_slice(&rest[..at]);
            rest = &rest[at..];
            // Escapes come in runs: take them one after another.
            while let [b'\\', kind, tail @ ..] = rest {
                rest = tail;
                if *kind != b'u' {
                    push_escaped_char(out, simple_escape(*kind)?);
                    continue;
                }
                // The usual one, a character of the BMP beyond Latin (CJK): three bytes of UTF-8.
                if let Ok(unit @ (0x800..=0xD7FF | 0xE000..=0xFFFF)) =
                    hex4(rest.get(..4).ok_or(Invalid)?)
                {
                    out.extend_from_slice(&[
                        0xE0 | (unit >> 12) as u8,
                        0x80 | (unit >> 6 & 0x3F) as u8,
                        0x80 | (unit & 0x3F) as u8,
                    ]);
                    rest = &rest[4..];
                    continue;
                }
                let (c, used) = code_point(rest)?;
                rest = &rest[used..];
                push_escaped_char(out, c);
            }
        }
    }
    out.extend_from_slice(rest);
    out.push(b'"');
    Ok(())
}

/// Append the string `s` stands for, unescaped (what serde_json reads it as).
pub fn unescape_into(out: &mut String, s: Str) -> Result<()> {
    out.reserve(s.inner.len());
    let mut rest = s.inner;
    if s.escaped {
        while let Some(at) = memchr::memchr(b'\\', rest.as_bytes()) {
            out.push_str(&rest[..at]);
            rest = &rest[at..];
            while let [b'\\', kind, ..] = rest.as_bytes() {
                let (c, used) = if *kind == b'u' {
                    code_point(&rest.as_bytes()[2..])?
                } else {
                    (simple_escape(*kind)?, 0)
                };
                out.push(c);
                rest = &rest[2 + used..];
            }
        }
    }
    out.push_str(rest);
    Ok(())
}

/// The string `s` stands for.
#[inline(always)]
pub fn unescape(s: Str<'_>) -> Result<std::borrow::Cow<'_, str>> {
    if !s.escaped {
        return Ok(std::borrow::Cow::Borrowed(s.inner));
    }
    unescape_owned(s).map(std::borrow::Cow::Owned)
}

#[inline(never)]
fn unescape_owned(s: Str<'_>) -> Result<String> {
    let mut text = String::with_capacity(s.inner.len());
    unescape_into(&mut text, s)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::IgnoredAny;

    /// What the scanner makes of a whole document: valid with this value, or not.
    fn scan(text: &str, max_depth: usize) -> Result<Value<'_>> {
        let mut s = Scanner::new(text);
        let v = s.value(max_depth)?;
        s.end()?;
        Ok(v)
    }

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<IgnoredAny>(text).is_ok()
    }

    fn str_of(text: &str) -> Str<'_> {
        match scan(text, usize::MAX).expect("valid").kind {
            Kind::Str(s) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn scalars_strings_and_containers() {
        for (text, ok) in [
            ("null", true),
            ("nul", false),
            ("true", true),
            ("false", true),
            ("0", true),
            ("-0", true),
            ("01", false),
            ("-", false),
            ("1.", false),
            ("1.5e", false),
            ("1.5e+3", true),
            ("12345678901234567890123", true),
            ("\"a\\u00e9\\n\"", true),
            ("\"\\x\"", false),
            ("\"\\u12\"", false),
            ("\"tab\there\"", false),
            ("[]", true),
            ("[1,]", false),
            ("[,1]", false),
            ("{}", true),
            ("{\"a\":1,}", false),
            ("{\"a\" 1}", false),
            ("{1:2}", false),
            (" [ 1 , { \"a\" : [ ] } ] ", true),
            ("[1 2]", false),
            ("[1]]", false),
            ("{\"a\":1}}", false),
            ("", false),
        ] {
            assert_eq!(scan(text, usize::MAX).is_ok(), ok, "{text}");
            assert_eq!(serde_accepts(text), ok, "serde_json disagrees on {text}");
        }
    }

    #[test]
    fn runs_of_escapes_end_anywhere() {
        // Each escape run followed by plain text, another kind of escape, a surrogate pair or
        // the end of the string.
        for text in [
            "\"\\u4f60好\"",
            "\"\\u4f60\\u597d,\\n\\u4f60\"",
            "\"a\\u4f60\\ud83e\\udd80\\u0800\\ud7ff\\u07ff\"",
            "\"\\u4f60\\ud83e\"",
        ] {
            let mut sink = Vec::new();
            let scanned = Scanner::new(text).value_writing(usize::MAX, &mut sink);
            match serde_json::from_str::<String>(text) {
                Ok(string) => {
                    let Kind::Str(s) = scanned.unwrap().kind else {
                        panic!("{text}")
                    };
                    assert!(s.paired, "{text}");
                    assert_eq!(sink, serde_json::to_vec(&string).unwrap(), "{text}");
                }
                Err(_) => assert!(
                    matches!(
                        scanned,
                        Ok(Value {
                            kind: Kind::Str(Str { paired: false, .. }),
                            ..
                        })
                    ),
                    "{text}"
                ),
            }
        }
    }

    #[test]
    fn depth_is_limited_only_when_asked_and_never_recursive() {
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert!(scan(&deep, usize::MAX).is_ok());
        assert!(scan(&deep, 128).is_err());
        let ok = format!("{}1{}", "[{\"a\":".repeat(64), "}]".repeat(64));
        assert!(scan(&ok, 128).is_ok());
        let over = format!("[{ok}]");
        assert!(scan(&over, 128).is_err());
        assert!(scan(&over, 129).is_ok());
    }

    #[test]
    fn containers_note_line_breaks_between_tokens() {
        for (text, lines) in [
            ("{\"a\": [1,\n2]}", true),
            ("{\"a\":\r\"x\\n\"}", true),
            ("{\"a\": \"x\\n\"}", false),
        ] {
            assert_eq!(
                scan(text, 128).unwrap().kind,
                Kind::Container { multiline: lines },
                "{text}"
            );
        }
    }

    #[test]
    fn surrogates_pair_or_the_string_is_no_string() {
        for (text, paired) in [
            ("\"\\ud83e\\udd80\"", true),
            ("\"\\ud83e\"", false),
            ("\"\\udd80\"", false),
            ("\"\\ud83ex\\udd80\"", false),
            ("\"\\ud83e\\n\"", false),
            ("\"\\ud83e\\ud83e\\udd80\"", false),
            ("\"\\u00e9\\ud83e\\udd80\\u00e9\"", true),
        ] {
            let s = str_of(text);
            assert_eq!(s.paired, paired, "{text}");
            assert_eq!(
                serde_json::from_str::<String>(text).is_ok(),
                paired,
                "serde_json disagrees on {text}"
            );
        }
    }

    #[test]
    fn every_escaped_code_point_is_written_as_serde_json_writes_it() {
        let mut out = Vec::new();
        for cp in (0u32..0x3000)
            .chain(0xFFF0..0x10000)
            .chain([0x1F980, 0x10FFFF])
        {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let text = if cp > 0xFFFF {
                let mut units = [0u16; 2];
                let units = c.encode_utf16(&mut units);
                format!("\"\\u{:04X}\\u{:04x}\"", units[0], units[1])
            } else {
                format!("\"\\u{cp:04x}\"")
            };
            out.clear();
            write_str(&mut out, str_of(&text)).unwrap();
            assert_eq!(out, serde_json::to_vec(&c.to_string()).unwrap(), "{text}");
            assert_eq!(unescape(str_of(&text)).unwrap(), c.to_string());
        }
    }

    /// JSON-ish text: mostly valid documents, often broken by a byte or two.
    fn jsonish() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("fals".to_owned()),
            "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,2})?([eE][+-]?[0-9]{1,2})?",
            "-?0[0-9]",
            string_text(),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                prop::collection::vec((string_text(), inner), 0..5).prop_map(|entries| {
                    let body: Vec<String> =
                        entries.iter().map(|(k, v)| format!("{k}:\n{v}")).collect();
                    format!("{{{}}}", body.join(","))
                }),
            ]
        })
        .prop_flat_map(|doc| {
            let len = doc.len();
            (
                Just(doc),
                0..=len,
                prop::sample::select(vec!["", "", "", ",", "]", "}", "\"", "\\", " ", "\t", "x"]),
            )
        })
        .prop_map(|(doc, at, extra)| {
            let at = (0..=at)
                .rev()
                .find(|&i| doc.is_char_boundary(i))
                .unwrap_or(0);
            format!("{}{extra}{}", &doc[..at], &doc[at..])
        })
    }

    /// A string's JSON text: plain characters, every escape, surrogates paired or not, and now
    /// and then a raw control character.
    fn string_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[a-z 你好é🦀\u{7f}\u{2028}]{0,4}",
            1 => prop::sample::select(vec![
                "\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u0000", "\\u001F",
                "\\u0022", "\\u005c", "\\u00E9", "\\u4f60", "\\ud83e\\udd80", "\\ud83e",
                "\\udd80", "\\uDBFF\\uDFFF", "\\u12", "\\x", "\t", "\u{1}",
            ])
            .prop_map(str::to_owned),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|p| format!("\"{}\"", p.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn accepts_exactly_what_serde_json_accepts(text in jsonish()) {
            prop_assert_eq!(scan(&text, usize::MAX).is_ok(), serde_accepts(&text), "{}", text);
        }

        #[test]
        fn a_value_is_the_raw_value_serde_json_borrows(text in jsonish()) {
            if let Ok(raw) = serde_json::from_str::<&serde_json::value::RawValue>(&text) {
                prop_assert_eq!(scan(&text, usize::MAX).unwrap().text, raw.get());
            }
        }

        #[test]
        fn a_string_read_writing_is_written_as_write_str_writes_it(text in string_text()) {
            let mut sink = b"before".to_vec();
            let Ok(v) = Scanner::new(&text).value_writing(usize::MAX, &mut sink) else {
                return Ok(());
            };
            let Kind::Str(s) = v.kind else { panic!("{text}") };
            if s.escaped && s.paired {
                let mut expected = Vec::new();
                write_str(&mut expected, s).unwrap();
                let (start, end) = (s.written.0 as usize, s.written.1 as usize);
                prop_assert_eq!(&sink[..start], b"before");
                prop_assert_eq!(&sink[start..end], &expected[..]);
            } else if !s.escaped {
                prop_assert_eq!(s.written, (0, 0));
                prop_assert_eq!(&sink[..], b"before");
            }
        }

        #[test]
        fn listed_keys_are_told_apart_however_they_are_written(
            sep in prop::sample::select(vec![",", ", ", " ,  ", ",\n"]),
            key in prop::sample::select(vec!["event", "data", "timestamp", "ev\\u0065nt", "other", "dat"]),
        ) {
            let text = format!("{{\"x\": 1{sep}\"{key}\": 2}}");
            let mut s = Scanner::new(&text);
            let mut obj = s.object().unwrap();
            let listed = ["event", "data", "timestamp"];
            prop_assert_eq!(obj.next_key_among(&mut s, &listed).unwrap(), Some(Key::Other(Str {
                inner: "x", escaped: false, paired: true, written: (0, 0),
            })));
            s.value(usize::MAX).unwrap();
            let got = obj.next_key_among(&mut s, &listed).unwrap().unwrap();
            let expected = listed.iter().position(|n| *n == key.replace("\\u0065", "e"));
            match (got, expected) {
                (Key::Listed(i), Some(j)) => prop_assert_eq!(i, j),
                (Key::Other(k), None) => prop_assert_eq!(k.inner, key),
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert_eq!(s.value(usize::MAX).unwrap().text, "2");
            prop_assert_eq!(obj.next_key_among(&mut s, &listed).unwrap(), None);
            prop_assert!(s.end().is_ok());
        }

        #[test]
        fn strings_write_and_unescape_as_serde_json_reads_and_writes_them(text in string_text()) {
            let Ok(v) = scan(&text, usize::MAX) else {
                prop_assert!(serde_json::from_str::<IgnoredAny>(&text).is_err());
                return Ok(());
            };
            let Kind::Str(s) = v.kind else { panic!("{text}") };
            match serde_json::from_str::<String>(&text) {
                Ok(string) => {
                    prop_assert!(s.paired);
                    let mut out = Vec::new();
                    write_str(&mut out, s).unwrap();
                    prop_assert_eq!(out, serde_json::to_vec(&string).unwrap());
                    prop_assert_eq!(unescape(s).unwrap(), string);
                }
                Err(_) => {
                    prop_assert!(!s.paired, "{}", text);
                    prop_assert!(write_str(&mut Vec::new(), s).is_err());
                    prop_assert!(unescape(s).is_err());
                }
            }
        }
    }
}
