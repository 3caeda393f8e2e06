//! Maps the runtime orchestrator's SSE events (`{"event", "data", "timestamp"}` frames) onto the
//! Agent2UI events the web app reads, per the contract's "Runtime stream → Agent2UI" table: each
//! runtime event becomes zero or one whole, LF-framed client event with one-line JSON data.
//!
//! The table is data (`ROWS`), run through one function. A frame is read once, by
//! [`core::json`](crate::core::json)'s scanner, which checks it as serde_json would and borrows
//! each field as the runtime wrote it; nothing is parsed into a tree. The client event is then
//! written in one pass into the caller's buffer: a string goes from the runtime's JSON text
//! straight to the client's (never unescaped and escaped again), a nested value is copied as it
//! came, so keys keep their order and numbers their spelling.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use serde::de::{Deserialize, Deserializer, Error as _};
use serde_json::value::RawValue;

use crate::core::files::{self, FileSigner};
use crate::core::json::{self, Invalid, Key, Kind, Scanner, Str};
use crate::core::sse::SseEvent;

/// `executionMode` reported in the `done` event.
pub const EXECUTION_MODE: &str = "runtime_orchestrator";
/// `code` of an `error` event when the runtime's execution_error has none.
pub const DEFAULT_ERROR_CODE: &str = "SSE_STREAM_ERROR";
const DEFAULT_ERROR_MESSAGE: &str = "runtime execution failed";

/// What [`StreamMapper::map`] did with one runtime event.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// An Agent2UI `message` event of this type was written ("plan", "plan_step", "tool_call", ...).
    Message(&'static str),
    /// Valid event with nothing to send (text_chunk with empty content).
    Skipped,
    /// Runtime ping → `event: heartbeat\ndata: null\n\n` written.
    Heartbeat,
    /// execution_complete: nothing written yet. The relay saves the answer first, then writes
    /// `done` with [`done_event`] and the saved message's id.
    Complete(Completion),
    /// execution_error → `event: error` written.
    Failed { code: String, message: String },
    /// `[DONE]`: nothing written.
    End,
    /// Data not JSON / wrong shape: nothing written.
    Malformed,
    /// Event name not in the table: nothing written.
    Unknown,
}

/// What `execution_complete` says about the finished execution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completion {
    /// `final_response` as text (of an object, its `content`); empty when the runtime gave none.
    pub final_response: String,
    /// The runtime's token count, when it gives one.
    pub tokens: Option<u64>,
}

/// The `done` event's data (CONTRACT.md: `{sessionId, messageId, executionMode, usage}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneEvent<'x> {
    pub session_id: &'x str,
    pub message_id: &'x str,
    /// 0 when the runtime gave no count.
    pub tokens: u64,
    pub latency_ms: u64,
}

/// `event: done` with `usage: {tokens, latencyMs}`.
pub fn done_event(out: &mut Vec<u8>, done: &DoneEvent) {
    out.extend_from_slice(b"event: done\ndata: {\"sessionId\":");
    write_text(out, done.session_id);
    out.extend_from_slice(b",\"messageId\":");
    write_text(out, done.message_id);
    out.extend_from_slice(b",\"executionMode\":\"");
    out.extend_from_slice(EXECUTION_MODE.as_bytes());
    out.extend_from_slice(b"\",\"usage\":{\"tokens\":");
    out.extend_from_slice(itoa::Buffer::new().format(done.tokens).as_bytes());
    out.extend_from_slice(b",\"latencyMs\":");
    out.extend_from_slice(itoa::Buffer::new().format(done.latency_ms).as_bytes());
    out.extend_from_slice(b"}}\n\n");
}

/// How one stream's events are written, beyond the table itself.
#[derive(Debug, Clone)]
pub struct MapSettings {
    /// `limits.max_client_event_bytes`: a larger message is shortened to fit; 0 = no limit.
    pub max_client_event_bytes: usize,
    /// Signs `file` links for the stream's org. Without one a `file` message still goes out, its
    /// url the bare `/api/v1/runtime/files/{file_id}`, which the files route refuses (404): a
    /// link nobody can forge rather than one that leaks the runtime's address.
    pub files: Option<FileSigner>,
}

impl Default for MapSettings {
    /// The contract's defaults, no file signing.
    fn default() -> Self {
        MapSettings {
            max_client_event_bytes: 16 * 1024,
            files: None,
        }
    }
}

/// What every `message` event starts with, up to its id's counter.
const MESSAGE_HEAD: &str = "event: message\ndata: {\"id\":\"";

/// Per-stream state: the session id, the stream's messageId and the message counter.
#[derive(Debug)]
pub struct StreamMapper {
    settings: MapSettings,
    session_id: String,
    /// [`MESSAGE_HEAD`], the stream's messageId and `-`: each message's id is this counter on.
    head: String,
    counter: u64,
    /// The text streamed so far, when kept (see [`StreamMapper::keeping_text`]).
    text: Option<String>,
    clock: Clock,
    /// Kept between events for [`Payload::written`].
    scratch: Vec<u8>,
}

impl StreamMapper {
    /// session_id is the `done` event's; a fresh messageId (uuid v4) is made per stream.
    pub fn new(session_id: &str) -> Self {
        StreamMapper::with_settings(session_id, MapSettings::default())
    }

    pub fn with_settings(session_id: &str, settings: MapSettings) -> Self {
        let mut uuid = uuid::Uuid::encode_buffer();
        let message_id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut uuid);
        let mut head = String::with_capacity(MESSAGE_HEAD.len() + message_id.len() + 1);
        head.push_str(MESSAGE_HEAD);
        head.push_str(message_id);
        head.push('-');
        StreamMapper {
            settings,
            session_id: session_id.to_owned(),
            head,
            counter: 0,
            text: None,
            clock: Clock::default(),
            scratch: Vec::new(),
        }
    }

    /// Keep the streamed text, for an answer saved with an empty `final_response`.
    pub fn keeping_text(mut self) -> Self {
        self.text = Some(String::new());
        self
    }

    /// The text streamed so far (empty unless kept).
    pub fn take_text(&mut self) -> String {
        self.text.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The session the stream belongs to, for its `done` event.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    pub fn message_id(&self) -> &str {
        &self.head[MESSAGE_HEAD.len()..self.head.len() - 1]
    }

    /// Map one parsed runtime event, appending zero or more whole client events to `out`.
    pub fn map(&mut self, ev: &SseEvent, out: &mut Vec<u8>) -> Mapped {
        let text = ev.data.trim();
        if text == "[DONE]" {
            return Mapped::End;
        }
        let mut payload = Payload {
            written: std::mem::take(&mut self.scratch),
            ..Payload::default()
        };
        payload.written.clear();
        let mapped = self.map_frame(ev, text, &mut payload, out);
        // A frame with a huge escaped string leaves no huge buffer behind on a held stream.
        payload.written.shrink_to(SCRATCH_KEEP);
        self.scratch = payload.written;
        mapped
    }

    fn map_frame<'a>(
        &mut self,
        ev: &SseEvent,
        text: &'a str,
        payload: &mut Payload<'a>,
        out: &mut Vec<u8>,
    ) -> Mapped {
        let Ok(envelope) = Envelope::parse(text, payload) else {
            return Mapped::Malformed;
        };
        let name = match envelope.event.non_null() {
            Some(Field::Str(name)) => unescaped(*name),
            None => {
                let Some(name) = ev.event.as_deref() else {
                    return Mapped::Unknown;
                };
                // No envelope at all: the JSON object is the payload itself.
                if !envelope.has_data && payload.parse(text).is_err() {
                    return Mapped::Malformed;
                }
                Cow::Borrowed(name)
            }
            Some(_) => return Mapped::Unknown,
        };
        let Some(row) = row(&name) else {
            return Mapped::Unknown;
        };
        let start = out.len();
        match self.apply(row, payload, &envelope.timestamp, out) {
            Ok(mapped) => mapped,
            Err(Invalid) => {
                // Fields are checked as they are read, so this is not reached; if it were, the
                // frame would be dropped whole rather than half written.
                out.truncate(start);
                Mapped::Malformed
            }
        }
    }

    /// The one place a table row becomes client output.
    fn apply(
        &mut self,
        row: &Row,
        p: &Payload,
        ts: &Field,
        out: &mut Vec<u8>,
    ) -> json::Result<Mapped> {
        match row.shape {
            Shape::Message(fields) => {
                let stamp = self.stamp(ts);
                self.capped_message(out, row, fields, p, &stamp)
            }
            // Text is never shortened: it is what the user reads.
            Shape::NonEmpty(key, fields) => match p.get(key).non_null() {
                None => Ok(Mapped::Skipped),
                Some(Field::Str(s)) if s.inner.is_empty() => Ok(Mapped::Skipped),
                Some(field) => {
                    if let (Some(text), Field::Str(s)) = (self.text.as_mut(), field) {
                        json::unescape_into(text, *s)?;
                    }
                    let stamp = self.stamp(ts);
                    self.message(out, row.kind, &stamp, p, |out| {
                        write_obj(out, fields, p, &[])
                    })
                }
            },
            Shape::Plan => {
                let stamp = self.stamp(ts);
                self.message(out, row.kind, &stamp, p, |out| {
                    write_plan(out, p.get(K::Steps))
                })
            }
            Shape::File => {
                let url = p.get(K::FileId).json_text_non_null().map(|id| {
                    let id = &*id;
                    match &self.settings.files {
                        Some(signer) => {
                            let runtime_url = p.get(K::Url).json_text_non_null();
                            let now_unix = SystemTime::now()
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs());
                            signer.url(id, runtime_url.as_deref().unwrap_or(""), now_unix)
                        }
                        None => files::path(id),
                    }
                });
                let stamp = self.stamp(ts);
                self.message(out, row.kind, &stamp, p, |out| {
                    let mut obj = Obj::open(out);
                    if let Some(url) = &url {
                        obj.key("url");
                        write_text(obj.out, url);
                    }
                    for (name, key) in [
                        ("filename", K::Filename),
                        ("mimeType", K::MimeType),
                        ("size", K::Size),
                    ] {
                        if let Some(field) = p.get(key).present() {
                            obj.key(name);
                            field.write(obj.out, &p.written)?;
                        }
                    }
                    obj.close();
                    Ok(())
                })
            }
            Shape::Heartbeat => {
                heartbeat_event(out);
                Ok(Mapped::Heartbeat)
            }
            Shape::Done => {
                #[derive(serde::Deserialize)]
                struct Inner<'x> {
                    #[serde(borrow, default)]
                    content: Field<'x>,
                    #[serde(borrow, default)]
                    usage: Field<'x>,
                }
                let inner = match p.get(K::FinalResponse) {
                    Field::Raw { text, .. } if text.starts_with('{') => {
                        serde_json::from_str::<Inner>(text).ok()
                    }
                    _ => None,
                };
                let final_response = match (p.get(K::FinalResponse), &inner) {
                    (Field::Str(s), _) => unescaped(*s).into_owned(),
                    (
                        _,
                        Some(Inner {
                            content: Field::Str(s),
                            ..
                        }),
                    ) => unescaped(*s).into_owned(),
                    _ => String::new(),
                };
                let usage = p
                    .get(K::Usage)
                    .non_null()
                    .or_else(|| inner.as_ref().and_then(|i| i.usage.non_null()));
                Ok(Mapped::Complete(Completion {
                    final_response,
                    tokens: usage.and_then(token_count),
                }))
            }
            Shape::Error => {
                let code = match p.get(K::Code).to_text() {
                    Some(code) if !code.is_empty() => code,
                    _ => DEFAULT_ERROR_CODE.to_owned(),
                };
                let message = p
                    .get(K::Error)
                    .to_text()
                    .unwrap_or_else(|| DEFAULT_ERROR_MESSAGE.to_owned());
                error_head(out, &code, &message);
                for (name, key) in [
                    ("httpStatus", K::HttpStatus),
                    ("details", K::Details),
                    ("traceId", K::TraceId),
                ] {
                    if let Some(field) = p.get(key).non_null() {
                        out.extend_from_slice(b",\"");
                        out.extend_from_slice(name.as_bytes());
                        out.extend_from_slice(b"\":");
                        field.write(out, &p.written)?;
                    }
                }
                out.extend_from_slice(b"}\n\n");
                Ok(Mapped::Failed { code, message })
            }
        }
    }

    /// The runtime's timestamp when it sent one, else now.
    fn stamp<'a>(&mut self, ts: &Field<'a>) -> Stamp<'a> {
        match ts {
            Field::Str(ts) if !ts.inner.is_empty() => Stamp::Runtime(*ts),
            _ => Stamp::Now(self.clock.format(SystemTime::now())),
        }
    }

    /// Write the next message (a new id).
    fn message(
        &mut self,
        out: &mut Vec<u8>,
        kind: &'static str,
        stamp: &Stamp,
        p: &Payload,
        data: impl FnOnce(&mut Vec<u8>) -> json::Result<()>,
    ) -> json::Result<Mapped> {
        self.counter += 1;
        self.write_message(out, kind, stamp, p, data)?;
        Ok(Mapped::Message(kind))
    }

    /// Write a message with the current id: `{"id","type","data","timestamp"}`.
    fn write_message(
        &self,
        out: &mut Vec<u8>,
        kind: &'static str,
        stamp: &Stamp,
        p: &Payload,
        data: impl FnOnce(&mut Vec<u8>) -> json::Result<()>,
    ) -> json::Result<()> {
        out.extend_from_slice(self.head.as_bytes());
        out.extend_from_slice(itoa::Buffer::new().format(self.counter).as_bytes());
        out.extend_from_slice(b"\",\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"data\":");
        data(out)?;
        out.extend_from_slice(b",\"timestamp\":");
        match stamp {
            Stamp::Runtime(ts) => Field::Str(*ts).write(out, &p.written)?,
            Stamp::Now(now) => {
                out.push(b'"');
                out.extend_from_slice(now);
                out.push(b'"');
            }
        }
        out.extend_from_slice(b"}\n\n");
        Ok(())
    }

    /// A row's message, shortened to `max_client_event_bytes` when its data is larger: the first
    /// present of `result`, `arguments`, `params` becomes a string of the first characters of its
    /// JSON text ending in `…`, and the data gains `"truncated": true`.
    fn capped_message(
        &mut self,
        out: &mut Vec<u8>,
        row: &Row,
        fields: &'static [Out],
        p: &Payload,
        stamp: &Stamp,
    ) -> json::Result<Mapped> {
        let start = out.len();
        let mapped = self.message(out, row.kind, stamp, p, |out| {
            write_obj(out, fields, p, &[])
        })?;
        let cap = self.settings.max_client_event_bytes;
        if cap == 0 || data_len(&out[start..]) <= cap {
            return Ok(mapped);
        }
        let mut cuts: Vec<(K, String)> = Vec::new();
        let mut scratch = Vec::new();
        for key in [K::Result, K::Arguments, K::Params] {
            let Some(value) = p.get(key).non_null().filter(|_| copies(fields, key)) else {
                continue;
            };
            cuts.push((key, String::new()));
            scratch.clear();
            self.write_message(&mut scratch, row.kind, stamp, p, |out| {
                write_obj(out, fields, p, &cuts)
            })?;
            // What the value's string may take, escaped, beside everything else.
            let room = cap.saturating_sub(data_len(&scratch));
            let text = value.text();
            let cut = &mut cuts.last_mut().expect("just pushed").1;
            cut.push_str(prefix_within(&text, room.saturating_sub(ELLIPSIS.len())));
            cut.push_str(ELLIPSIS);
            if room >= ELLIPSIS.len() {
                break;
            }
        }
        if cuts.is_empty() {
            return Ok(mapped);
        }
        out.truncate(start);
        self.write_message(out, row.kind, stamp, p, |out| {
            write_obj(out, fields, p, &cuts)
        })?;
        Ok(mapped)
    }
}

const ELLIPSIS: &str = "…";

/// Length of the `data:` JSON of one whole client event.
fn data_len(event: &[u8]) -> usize {
    let start = event
        .windows(7)
        .position(|w| w == b"\ndata: ")
        .map_or(0, |i| i + 7);
    event.len().saturating_sub(start + 2)
}

/// The longest prefix of `text` that serde_json writes, escaped, in at most `room` bytes;
/// never cut inside a character.
fn prefix_within(text: &str, room: usize) -> &str {
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += match c {
            '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used > room {
            return &text[..i];
        }
    }
    text
}

/// A message's `timestamp`: the runtime's, or the time it was written.
enum Stamp<'a> {
    Runtime(Str<'a>),
    /// RFC 3339, milliseconds, UTC: `2026-02-09T10:11:12.345Z`.
    Now([u8; 24]),
}

/// Formats `now` as humantime's RFC 3339 with milliseconds, the date and time of day once per
/// second rather than per event.
#[derive(Debug, Default)]
struct Clock {
    /// The second `prefix` is, since the epoch (`None` before the first use).
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS`
    prefix: [u8; 19],
}

impl Clock {
    fn format(&mut self, now: SystemTime) -> [u8; 24] {
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let second = since.as_secs();
        if self.second != Some(second) {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            // `YYYY-MM-DDTHH:MM:SSZ`: humantime writes four-digit years only.
            self.prefix.copy_from_slice(&text.as_bytes()[..19]);
            self.second = Some(second);
        }
        let millis = since.subsec_millis();
        let mut stamp = [0u8; 24];
        stamp[..19].copy_from_slice(&self.prefix);
        stamp[19] = b'.';
        stamp[20] = b'0' + (millis / 100) as u8;
        stamp[21] = b'0' + (millis / 10 % 10) as u8;
        stamp[22] = b'0' + (millis % 10) as u8;
        stamp[23] = b'Z';
        stamp
    }
}

/// `event: error`, data `{"code","message"}`.
pub fn error_event(out: &mut Vec<u8>, code: &str, message: &str) {
    error_head(out, code, message);
    out.extend_from_slice(b"}\n\n");
}

/// An `error` event up to its message; the runtime's optional fields and `}` follow.
fn error_head(out: &mut Vec<u8>, code: &str, message: &str) {
    out.extend_from_slice(b"event: error\ndata: {\"code\":");
    write_text(out, code);
    out.extend_from_slice(b",\"message\":");
    write_text(out, message);
}

/// `event: heartbeat`, `data: null`.
pub fn heartbeat_event(out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: heartbeat\ndata: null\n\n");
}

/// A string of the proxy's own, as serde_json writes it (every control character escaped, CR and
/// LF included, so the data stays one line).
fn write_text(out: &mut Vec<u8>, text: &str) {
    // Serialising a str into a Vec cannot fail: no I/O.
    serde_json::to_writer(&mut *out, text).expect("JSON serialisation into memory failed");
}

/// A JSON object being written, entry by entry.
struct Obj<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Obj<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, first: true }
    }

    /// `"name":` (names are the table's own: plain ASCII, nothing to escape).
    fn key(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// A message's data: a row's entries filled from the payload, leaving out absent fields (null
/// ones stay null); fields in `cuts` are written as those strings, and then the data says
/// `"truncated": true`.
fn write_obj(
    out: &mut Vec<u8>,
    fields: &'static [Out],
    p: &Payload,
    cuts: &[(K, String)],
) -> json::Result<()> {
    let mut obj = Obj::open(out);
    write_entries(&mut obj, fields, p, cuts)?;
    if !cuts.is_empty() {
        obj.key("truncated");
        obj.out.extend_from_slice(b"true");
    }
    obj.close();
    Ok(())
}

fn write_entries(
    obj: &mut Obj,
    fields: &'static [Out],
    p: &Payload,
    cuts: &[(K, String)],
) -> json::Result<()> {
    for field in fields {
        match *field {
            Out::Copy(name, key) => {
                if let Some((_, cut)) = cuts.iter().find(|(k, _)| *k == key) {
                    obj.key(name);
                    write_text(obj.out, cut);
                    continue;
                }
                let value = p.get(key);
                if !matches!(value, Field::Absent) {
                    obj.key(name);
                    value.write(obj.out, &p.written)?;
                }
            }
            Out::Fixed(name, value) => {
                obj.key(name);
                obj.out.push(b'"');
                obj.out.extend_from_slice(value.as_bytes());
                obj.out.push(b'"');
            }
            Out::All(entries) => write_entries(obj, entries, p, cuts)?,
        }
    }
    Ok(())
}

/// `{steps:[{id,title,status:"pending"}], currentStep:""}`; steps that are not objects are
/// dropped, and so is every step when one of them cannot be read.
fn write_plan(out: &mut Vec<u8>, steps: &Field) -> json::Result<()> {
    #[derive(serde::Deserialize)]
    struct Step<'x> {
        #[serde(borrow, default)]
        id: Field<'x>,
        #[serde(borrow, default)]
        title: Field<'x>,
    }
    let items: Vec<Field> = match steps {
        Field::Raw { text, .. } if text.starts_with('[') => {
            serde_json::from_str(text).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    out.extend_from_slice(b"{\"steps\":[");
    let mut first = true;
    for item in &items {
        let Field::Raw { text, .. } = item else {
            continue;
        };
        if !text.starts_with('{') {
            continue;
        }
        let Ok(step) = serde_json::from_str::<Step>(text) else {
            continue;
        };
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        let mut obj = Obj::open(out);
        for (key, value) in [("id", &step.id), ("title", &step.title)] {
            if !matches!(value, Field::Absent) {
                obj.key(key);
                // Read with serde: nothing written ahead.
                value.write(obj.out, &[])?;
            }
        }
        obj.key("status");
        obj.out.extend_from_slice(b"\"pending\"");
        obj.close();
    }
    out.extend_from_slice(b"],\"currentStep\":\"\"}");
    Ok(())
}

/// The total of a runtime `usage` object: `total_tokens`, else input plus output
/// (`input_tokens`/`output_tokens` or `prompt_tokens`/`completion_tokens`); a bare number is
/// the count itself.
fn token_count(usage: &Field) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Counts {
        total_tokens: Option<u64>,
        #[serde(alias = "prompt_tokens")]
        input_tokens: Option<u64>,
        #[serde(alias = "completion_tokens")]
        output_tokens: Option<u64>,
    }
    let Field::Raw { text, .. } = usage else {
        return None;
    };
    if let Ok(n) = serde_json::from_str::<u64>(text) {
        return Some(n);
    }
    let c = serde_json::from_str::<Counts>(text).ok()?;
    c.total_tokens.or(match (c.input_tokens, c.output_tokens) {
        (None, None) => None,
        (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
    })
}

// ---- the table ---------------------------------------------------------------------------------

/// One row of the contract's "Runtime stream → Agent2UI" table.
struct Row {
    /// The runtime's event name.
    event: &'static str,
    /// Agent2UI `type` of the `message` written ("" for rows that write no message).
    kind: &'static str,
    shape: Shape,
}

/// What a row writes.
#[derive(Clone, Copy)]
enum Shape {
    /// A `message` whose data is these entries, in this order.
    Message(&'static [Out]),
    /// Like `Message`, but nothing at all when this field is absent, null or "".
    NonEmpty(K, &'static [Out]),
    /// `{steps:[{id,title,status:"pending"}], currentStep:""}`.
    Plan,
    /// `event: heartbeat`.
    Heartbeat,
    /// [`Mapped::Complete`]; the relay writes `done`.
    Done,
    /// `event: error`.
    Error,
    /// `{url, filename, mimeType, size}`, the url a signed link to the proxy's files route.
    File,
}

/// One entry of a message's data.
#[derive(Clone, Copy)]
enum Out {
    /// The client's name, the runtime field it is copied from (left out when absent).
    Copy(&'static str, K),
    /// The client's name and a fixed string.
    Fixed(&'static str, &'static str),
    /// These entries, in this order: a part rows share (a call's ids, what every call says).
    All(&'static [Out]),
}

use Out::{Copy as C, Fixed as F};

/// Whether a row's entries copy the runtime field `key`.
fn copies(fields: &[Out], key: K) -> bool {
    fields.iter().any(|out| match out {
        Out::Copy(_, k) => *k == key,
        Out::Fixed(..) => false,
        Out::All(entries) => copies(entries, key),
    })
}

/// A plan step's id and title, first in each of its events' data.
const STEP: Out = Out::All(&[C("stepId", K::StepId), C("title", K::Title)]);
/// The ids of a tool, skill or MCP call, first in its start's and its completion's data.
const TOOL: Out = Out::All(&[C("toolName", K::ToolName)]);
const SKILL: Out = Out::All(&[C("skillId", K::SkillId), C("skillName", K::SkillName)]);
const MCP: Out = Out::All(&[C("serverId", K::ServerId), C("toolName", K::ToolName)]);
/// What a call's start says after the call's ids.
const CALL_START: Out = Out::All(&[C("arguments", K::Arguments), F("status", "calling")]);
/// What a call's completion says after the call's ids.
const CALL_COMPLETE: Out = Out::All(&[
    C("result", K::Result),
    C("success", K::Success),
    C("error", K::Error),
    C("duration", K::Duration),
]);

const fn message(event: &'static str, kind: &'static str, fields: &'static [Out]) -> Row {
    Row {
        event,
        kind,
        shape: Shape::Message(fields),
    }
}

const fn special(event: &'static str, kind: &'static str, shape: Shape) -> Row {
    Row { event, kind, shape }
}

const TEXT_CHUNK_ROW: Row = special(
    "text_chunk",
    "text",
    Shape::NonEmpty(K::Content, &[C("content", K::Content)]),
);

const ROWS: &[Row] = &[
    special("plan_created", "plan", Shape::Plan),
    message(
        "plan_step_start",
        "plan_step",
        &[
            STEP,
            F("status", "running"),
            C("tool", K::Tool),
            C("params", K::Params),
        ],
    ),
    message(
        "plan_step_complete",
        "plan_step",
        &[
            STEP,
            F("status", "completed"),
            C("result", K::Result),
            C("durationMs", K::DurationMs),
        ],
    ),
    message(
        "plan_step_failed",
        "plan_step",
        &[STEP, F("status", "failed"), C("error", K::Error)],
    ),
    message("tool_call_start", "tool_call", &[TOOL, CALL_START]),
    message("tool_call_complete", "tool_result", &[TOOL, CALL_COMPLETE]),
    message("skill_call_start", "skill_call", &[SKILL, CALL_START]),
    message(
        "skill_call_complete",
        "skill_result",
        &[SKILL, CALL_COMPLETE],
    ),
    message("mcp_call_start", "mcp_call", &[MCP, CALL_START]),
    message("mcp_call_complete", "mcp_result", &[MCP, CALL_COMPLETE]),
    message(
        "thinking",
        "thinking",
        &[C("content", K::Content), C("stage", K::Stage)],
    ),
    TEXT_CHUNK_ROW,
    special("ping", "", Shape::Heartbeat),
    special("file_created", "file", Shape::File),
    special("execution_complete", "", Shape::Done),
    special("execution_error", "", Shape::Error),
];

/// The table's row for a runtime event name: a `text_chunk` is most of a stream, so it is
/// looked at first.
fn row(name: &str) -> Option<&'static Row> {
    if name == "text_chunk" {
        return Some(&TEXT_CHUNK_ROW);
    }
    ROWS.iter().find(|row| row.event == name)
}

/// The runtime payload fields any row reads; each is a slot of [`Payload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum K {
    Steps,
    StepId,
    Title,
    Tool,
    Params,
    Result,
    DurationMs,
    Error,
    ToolName,
    Arguments,
    Success,
    Duration,
    SkillId,
    SkillName,
    ServerId,
    Content,
    Stage,
    FinalResponse,
    Usage,
    Code,
    HttpStatus,
    Details,
    TraceId,
    FileId,
    Filename,
    MimeType,
    Size,
    Url,
}

const KEYS: usize = K::Url as usize + 1;

impl K {
    /// The slot a runtime payload key fills (`None`: no row reads it).
    fn of(key: &str) -> Option<K> {
        Some(match key {
            "steps" => K::Steps,
            "step_id" => K::StepId,
            "title" => K::Title,
            "tool" => K::Tool,
            "params" => K::Params,
            "result" => K::Result,
            "duration_ms" => K::DurationMs,
            "error" => K::Error,
            "tool_name" => K::ToolName,
            "arguments" => K::Arguments,
            "success" => K::Success,
            "duration" => K::Duration,
            "skill_id" => K::SkillId,
            "skill_name" => K::SkillName,
            "server_id" => K::ServerId,
            "content" => K::Content,
            "stage" => K::Stage,
            "final_response" => K::FinalResponse,
            "usage" => K::Usage,
            "code" => K::Code,
            "httpStatus" | "http_status" => K::HttpStatus,
            "details" => K::Details,
            "traceId" | "trace_id" => K::TraceId,
            "file_id" => K::FileId,
            "filename" => K::Filename,
            "mime_type" => K::MimeType,
            "size" => K::Size,
            "url" => K::Url,
            _ => return None,
        })
    }
}

// ---- runtime side -------------------------------------------------------------------------------

/// A runtime field of any JSON type, borrowed from the frame as the runtime wrote it. Strings
/// are checked to be strings serde_json can read (escapes pair up); everything else keeps its
/// keys in their order and numbers their spelling.
#[derive(Debug, Clone, Copy, Default)]
enum Field<'a> {
    #[default]
    Absent,
    Str(Str<'a>),
    /// A number, literal, object or array; `multiline`: it spans lines (between its tokens).
    Raw {
        text: &'a str,
        multiline: bool,
    },
}

/// Deeper nesting is refused, as serde_json refuses it when it builds a value: the raw text is
/// never parsed into a tree here, so nothing else would stop it.
const MAX_DEPTH: usize = 128;

/// The string `s` stands for. Fields are checked when read, so the escapes are sound.
#[inline]
fn unescaped(s: Str<'_>) -> Cow<'_, str> {
    json::unescape(s).unwrap_or(Cow::Borrowed(s.inner))
}

impl<'a> Field<'a> {
    /// The next value of `s`, as a field; a string with escapes is written to `sink` as the
    /// client gets it, on the way.
    fn read(s: &mut Scanner<'a>, sink: &mut Vec<u8>) -> json::Result<Self> {
        let value = s.value_writing(MAX_DEPTH, sink)?;
        Ok(match value.kind {
            Kind::Str(str) if str.paired => Field::Str(str),
            Kind::Str(_) => return Err(Invalid),
            Kind::Container { multiline } => Field::Raw {
                text: value.text,
                multiline,
            },
            Kind::Scalar => Field::Raw {
                text: value.text,
                multiline: false,
            },
        })
    }

    fn non_null(&self) -> Option<&Self> {
        match self {
            Field::Absent => None,
            Field::Raw { text: "null", .. } => None,
            field => Some(field),
        }
    }

    fn present(&self) -> Option<&Self> {
        (!matches!(self, Field::Absent)).then_some(self)
    }

    /// The value's text: a string itself, anything else its JSON on one line.
    fn text(&self) -> Cow<'a, str> {
        match *self {
            Field::Absent => Cow::Borrowed(""),
            Field::Str(s) => unescaped(s),
            Field::Raw { text, multiline } => one_line(text, multiline),
        }
    }

    /// The field as text: strings as they are, other non-null values as JSON.
    fn to_text(self) -> Option<String> {
        self.non_null().map(|field| field.text().into_owned())
    }

    fn json_text_non_null(&self) -> Option<Cow<'a, str>> {
        self.non_null().map(Field::text)
    }

    /// The field as the client gets it; `written`: where it was read to (see [`Field::read`]).
    fn write(&self, out: &mut Vec<u8>, written: &[u8]) -> json::Result<()> {
        match *self {
            Field::Absent => out.extend_from_slice(b"null"),
            Field::Str(s) if !s.escaped => {
                out.reserve(s.inner.len() + 2);
                out.push(b'"');
                out.extend_from_slice(s.inner.as_bytes());
                out.push(b'"');
            }
            Field::Str(s) => match written.get(s.written.0 as usize..s.written.1 as usize) {
                Some(text) if !text.is_empty() => out.extend_from_slice(text),
                _ => json::write_str(out, s)?,
            },
            Field::Raw {
                text,
                multiline: false,
            } => out.extend_from_slice(text.as_bytes()),
            Field::Raw {
                text,
                multiline: true,
            } => out.extend(
                text.bytes()
                    .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
            ),
        }
        Ok(())
    }
}

/// A frame's data may span several `data:` lines; outside strings (where JSON forbids raw
/// control characters) a line break is only whitespace, and the client needs one line.
fn one_line(text: &str, multiline: bool) -> Cow<'_, str> {
    if multiline {
        Cow::Owned(text.replace(['\n', '\r'], " "))
    } else {
        Cow::Borrowed(text)
    }
}

/// For the rarer shapes read with serde (a plan's steps, `execution_complete`'s answer): the
/// same field, checked the same way.
impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        Field::read(&mut Scanner::new(raw.get()), &mut Vec::new())
            .map_err(|Invalid| D::Error::custom("not a readable runtime field"))
    }
}

/// The runtime's envelope `{"event": NAME, "data": {...}, "timestamp": ISO}` without its payload,
/// which is read in place into a [`Payload`].
#[derive(Default)]
struct Envelope<'a> {
    event: Field<'a>,
    timestamp: Field<'a>,
    /// `data` was an object (rather than absent or null).
    has_data: bool,
}

impl<'a> Envelope<'a> {
    /// Read a frame's JSON text; anything but an object, or a `data` that is neither an object
    /// nor null, is an error.
    fn parse(text: &'a str, payload: &mut Payload<'a>) -> json::Result<Self> {
        let mut s = Scanner::new(text);
        let mut envelope = Envelope::default();
        let mut obj = s.object()?;
        while let Some(key) = obj.next_key_among(&mut s, &["event", "data", "timestamp"])? {
            match key {
                Key::Listed(0) => envelope.event = Field::read(&mut s, &mut payload.written)?,
                Key::Listed(1) => {
                    envelope.has_data = !s.null()?;
                    if envelope.has_data {
                        payload.fill(&mut s)?;
                    }
                }
                Key::Listed(_) => envelope.timestamp = Field::read(&mut s, &mut payload.written)?,
                Key::Other(_) => {
                    s.value(usize::MAX)?;
                }
            }
        }
        s.end()?;
        Ok(envelope)
    }
}

/// The union of every table row's runtime fields, indexed by [`K`]; each is optional and of any
/// JSON type.
#[derive(Default)]
struct Payload<'a> {
    fields: [Field<'a>; KEYS],
    /// The frame's strings with escapes, as the client gets them (see [`Field::read`]).
    written: Vec<u8>,
}

/// What [`StreamMapper`] keeps of its [`Payload::written`] buffer between events.
const SCRATCH_KEEP: usize = 16 * 1024;

impl<'a> Payload<'a> {
    /// Read a bare payload object (a frame without envelope).
    fn parse(&mut self, text: &'a str) -> json::Result<()> {
        let mut s = Scanner::new(text);
        self.fill(&mut s)?;
        s.end()
    }

    /// Fill the fields from the object that comes next in `s`; other keys are skipped.
    fn fill(&mut self, s: &mut Scanner<'a>) -> json::Result<()> {
        let mut obj = s.object()?;
        // Text is most of a stream.
        while let Some(key) = obj.next_key_among(s, &["content"])? {
            let slot = match key {
                Key::Listed(_) => Some(K::Content),
                Key::Other(key) => K::of(&unescaped(key)),
            };
            match slot {
                Some(k) => self.fields[k as usize] = Field::read(s, &mut self.written)?,
                None => {
                    s.value(usize::MAX)?;
                }
            }
        }
        Ok(())
    }

    fn get(&self, key: K) -> &Field<'a> {
        &self.fields[key as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sse::SseParser;
    use serde_json::{json, Value};
    use std::collections::HashSet;

    const TS: &str = "2026-02-09T10:11:12.345678";

    fn frame(name: &str, data: Value) -> SseEvent {
        SseEvent {
            data: json!({"event": name, "data": data, "timestamp": TS}).to_string(),
            ..SseEvent::default()
        }
    }

    fn raw(data: &str) -> SseEvent {
        SseEvent {
            data: data.to_owned(),
            ..SseEvent::default()
        }
    }

    /// Check the client framing of `out` and return its events as (name, parsed data).
    fn client_events(out: &[u8]) -> Vec<(String, Value)> {
        assert!(!out.contains(&b'\r'), "CR in output");
        let text = std::str::from_utf8(out).expect("output is UTF-8");
        assert!(text.is_empty() || text.ends_with("\n\n"), "{text:?}");
        let mut events = Vec::new();
        for block in text.split_terminator("\n\n") {
            let lines: Vec<&str> = block.split('\n').collect();
            assert_eq!(lines.len(), 2, "not `event` + one data line: {block:?}");
            let name = lines[0].strip_prefix("event: ").expect("event line");
            let data = lines[1].strip_prefix("data: ").expect("data line");
            events.push((
                name.to_owned(),
                serde_json::from_str(data).expect("data is JSON"),
            ));
        }
        // A standards-conforming reader sees exactly the same events.
        let mut parser = SseParser::new(1 << 20);
        let mut parsed = Vec::new();
        parser.feed(out, &mut parsed).unwrap();
        assert!(!parser.finish());
        assert_eq!(parsed.len(), events.len());
        for (p, (name, data)) in parsed.iter().zip(&events) {
            assert_eq!(p.event.as_deref(), Some(name.as_str()));
            assert_eq!(&serde_json::from_str::<Value>(&p.data).unwrap(), data);
        }
        events
    }

    fn map(mapper: &mut StreamMapper, ev: &SseEvent) -> (Mapped, Vec<(String, Value)>) {
        let mut out = Vec::new();
        let mapped = mapper.map(ev, &mut out);
        (mapped, client_events(&out))
    }

    /// Map one runtime event that must become one `message`; returns the Agent2UIMessage.
    fn message(name: &str, data: Value, kind: &str) -> Value {
        let mut mapper = StreamMapper::new("s-1");
        let (mapped, events) = map(&mut mapper, &frame(name, data));
        assert!(
            matches!(mapped, Mapped::Message(k) if k == kind),
            "{mapped:?}"
        );
        assert_eq!(events.len(), 1);
        let (event, msg) = events.into_iter().next().unwrap();
        assert_eq!(event, "message");
        assert_eq!(msg["type"], kind);
        assert_eq!(msg["timestamp"], TS);
        assert_eq!(msg["id"], format!("{}-1", mapper.message_id()));
        let keys: HashSet<&str> = msg
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, HashSet::from(["id", "type", "data", "timestamp"]));
        msg["data"].clone()
    }

    #[test]
    fn plan_created() {
        let data = message(
            "plan_created",
            json!({"steps": [{"id": "s1", "title": "搜索资料", "tool": "web"}, {"id": 2, "title": "Write"}]}),
            "plan",
        );
        assert_eq!(
            data,
            json!({
                "steps": [
                    {"id": "s1", "title": "搜索资料", "status": "pending"},
                    {"id": 2, "title": "Write", "status": "pending"},
                ],
                "currentStep": "",
            })
        );
        // No steps is still a plan.
        assert_eq!(
            message("plan_created", json!({}), "plan"),
            json!({"steps": [], "currentStep": ""})
        );
    }

    #[test]
    fn plan_step_start() {
        let data = message(
            "plan_step_start",
            json!({"step_id": "s1", "title": "Search", "tool": "web_search", "params": {"q": "rust"}}),
            "plan_step",
        );
        assert_eq!(
            data,
            json!({"stepId": "s1", "title": "Search", "status": "running", "tool": "web_search", "params": {"q": "rust"}})
        );
    }

    #[test]
    fn plan_step_complete() {
        let data = message(
            "plan_step_complete",
            json!({"step_id": "s1", "title": "Search", "result": {"hits": 3}, "duration_ms": 1520}),
            "plan_step",
        );
        assert_eq!(
            data,
            json!({"stepId": "s1", "title": "Search", "status": "completed", "result": {"hits": 3}, "durationMs": 1520})
        );
    }

    #[test]
    fn plan_step_failed() {
        let data = message(
            "plan_step_failed",
            json!({"step_id": "s2", "title": "Fetch", "error": "timeout"}),
            "plan_step",
        );
        assert_eq!(
            data,
            json!({"stepId": "s2", "title": "Fetch", "status": "failed", "error": "timeout"})
        );
    }

    #[test]
    fn tool_call_start() {
        let data = message(
            "tool_call_start",
            json!({"tool_name": "calculator", "arguments": {"expr": "1+1"}}),
            "tool_call",
        );
        assert_eq!(
            data,
            json!({"toolName": "calculator", "arguments": {"expr": "1+1"}, "status": "calling"})
        );
    }

    #[test]
    fn tool_call_complete() {
        let data = message(
            "tool_call_complete",
            json!({"tool_name": "calculator", "result": 2, "success": true, "error": null, "duration": 0.25}),
            "tool_result",
        );
        assert_eq!(data["toolName"], "calculator");
        assert_eq!(data["result"], 2);
        assert_eq!(data["success"], true);
        assert_eq!(data["error"], Value::Null);
        assert_eq!(data["duration"], 0.25);
        assert_eq!(data.as_object().unwrap().len(), 5);
    }

    #[test]
    fn skill_call_start() {
        let data = message(
            "skill_call_start",
            json!({"skill_id": "sk-1", "skill_name": "翻译", "arguments": ["a", 1]}),
            "skill_call",
        );
        assert_eq!(
            data,
            json!({"skillId": "sk-1", "skillName": "翻译", "arguments": ["a", 1], "status": "calling"})
        );
    }

    #[test]
    fn skill_call_complete() {
        let data = message(
            "skill_call_complete",
            json!({"skill_id": "sk-1", "skill_name": "翻译", "result": "hello", "success": false, "error": "quota", "duration": 12}),
            "skill_result",
        );
        assert_eq!(
            data,
            json!({"skillId": "sk-1", "skillName": "翻译", "result": "hello", "success": false, "error": "quota", "duration": 12})
        );
    }

    #[test]
    fn mcp_call_start() {
        let data = message(
            "mcp_call_start",
            json!({"server_id": "fs", "tool_name": "read_file", "arguments": {"path": "/tmp/x"}}),
            "mcp_call",
        );
        assert_eq!(
            data,
            json!({"serverId": "fs", "toolName": "read_file", "arguments": {"path": "/tmp/x"}, "status": "calling"})
        );
    }

    #[test]
    fn mcp_call_complete() {
        let data = message(
            "mcp_call_complete",
            json!({"server_id": "fs", "tool_name": "read_file", "result": {"text": "hi"}, "success": true, "error": null, "duration": 3}),
            "mcp_result",
        );
        assert_eq!(data["serverId"], "fs");
        assert_eq!(data["toolName"], "read_file");
        assert_eq!(data["result"], json!({"text": "hi"}));
        assert_eq!(data["success"], true);
        assert_eq!(data["error"], Value::Null);
        assert_eq!(data["duration"], 3);
        assert_eq!(data.as_object().unwrap().len(), 6);
    }

    #[test]
    fn thinking() {
        let data = message(
            "thinking",
            json!({"content": "让我想想…\n第二行", "stage": "planning"}),
            "thinking",
        );
        assert_eq!(
            data,
            json!({"content": "让我想想…\n第二行", "stage": "planning"})
        );
    }

    #[test]
    fn text_chunk() {
        let data = message(
            "text_chunk",
            json!({"content": "你好，世界 \"quoted\"\r\n"}),
            "text",
        );
        assert_eq!(data, json!({"content": "你好，世界 \"quoted\"\r\n"}));
    }

    #[test]
    fn empty_text_chunk_is_skipped() {
        let mut mapper = StreamMapper::new("s");
        for data in [json!({"content": ""}), json!({"content": null}), json!({})] {
            assert_eq!(
                map(&mut mapper, &frame("text_chunk", data)),
                (Mapped::Skipped, vec![])
            );
        }
    }

    #[test]
    fn ping_is_a_heartbeat() {
        let mut mapper = StreamMapper::new("s");
        let mut out = Vec::new();
        assert_eq!(
            mapper.map(&frame("ping", json!({})), &mut out),
            Mapped::Heartbeat
        );
        assert_eq!(out, b"event: heartbeat\ndata: null\n\n");
        assert_eq!(
            client_events(&out),
            vec![("heartbeat".to_owned(), Value::Null)]
        );
    }

    #[test]
    fn execution_complete_is_done() {
        let mut mapper = StreamMapper::new("sess-42");
        let (mapped, events) = map(
            &mut mapper,
            &frame("execution_complete", json!({"final_response": "答案是 42"})),
        );
        // The relay writes `done` once the answer is saved, with the saved message's id.
        assert_eq!(
            mapped,
            Mapped::Complete(Completion {
                final_response: "答案是 42".into(),
                tokens: None
            })
        );
        assert!(events.is_empty());
        let mut out = Vec::new();
        done_event(
            &mut out,
            &DoneEvent {
                session_id: "sess-42",
                message_id: "m-7",
                tokens: 0,
                latency_ms: 1234,
            },
        );
        assert_eq!(
            client_events(&out),
            vec![(
                "done".to_owned(),
                json!({"sessionId": "sess-42", "messageId": "m-7", "executionMode": "runtime_orchestrator",
                       "usage": {"tokens": 0, "latencyMs": 1234}})
            )]
        );
        uuid::Uuid::parse_str(mapper.message_id()).expect("messageId is a uuid");
    }

    #[test]
    fn execution_complete_carries_the_answer_and_token_count() {
        let usage = json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30});
        for (data, answer) in [
            (json!({"final_response": "x", "usage": usage}), "x"),
            (
                json!({"final_response": {"content": "x", "usage": usage}}),
                "x",
            ),
            (
                json!({"final_response": {"usage": {"total_tokens": 1}}, "usage": usage}),
                "",
            ),
            (
                json!({"final_response": "x", "usage": {"input_tokens": 25, "output_tokens": 5}}),
                "x",
            ),
            (
                json!({"final_response": "x", "usage": {"prompt_tokens": 30}}),
                "x",
            ),
            (json!({"final_response": "x", "usage": 30}), "x"),
        ] {
            let mut mapper = StreamMapper::new("s");
            let (mapped, events) = map(&mut mapper, &frame("execution_complete", data.clone()));
            assert_eq!(
                mapped,
                Mapped::Complete(Completion {
                    final_response: answer.into(),
                    tokens: Some(30)
                }),
                "{data}"
            );
            assert!(events.is_empty());
        }
        // No count, or one of no use: none.
        for data in [
            json!({"usage": null}),
            json!({}),
            json!({"final_response": null, "usage": {"cached": true}}),
            json!({"final_response": 42, "usage": "many"}),
        ] {
            let mut mapper = StreamMapper::new("s");
            let (mapped, _) = map(&mut mapper, &frame("execution_complete", data.clone()));
            assert_eq!(mapped, Mapped::Complete(Completion::default()), "{data}");
        }
    }

    #[test]
    fn streamed_text_is_kept_only_when_asked() {
        let chunks = [
            frame("text_chunk", json!({"content": "你好"})),
            frame("thinking", json!({"content": "not text", "stage": "x"})),
            frame("text_chunk", json!({"content": ""})),
            frame("text_chunk", json!({"content": ", world\n"})),
        ];
        let mut kept = StreamMapper::new("s").keeping_text();
        let mut plain = StreamMapper::new("s");
        let mut out = Vec::new();
        for ev in &chunks {
            kept.map(ev, &mut out);
            plain.map(ev, &mut out);
        }
        assert_eq!(kept.take_text(), "你好, world\n");
        assert_eq!(kept.take_text(), "");
        assert_eq!(plain.take_text(), "");
    }

    #[test]
    fn execution_error_is_error() {
        let mut mapper = StreamMapper::new("s");
        let (mapped, events) = map(
            &mut mapper,
            &frame(
                "execution_error",
                json!({"error": "LLM 超时", "code": "LLM_TIMEOUT"}),
            ),
        );
        assert_eq!(
            mapped,
            Mapped::Failed {
                code: "LLM_TIMEOUT".into(),
                message: "LLM 超时".into()
            }
        );
        assert_eq!(
            events,
            vec![(
                "error".to_owned(),
                json!({"code": "LLM_TIMEOUT", "message": "LLM 超时"})
            )]
        );
        for data in [
            json!({"error": "boom"}),
            json!({"error": "boom", "code": null}),
            json!({"error": "boom", "code": ""}),
        ] {
            let (mapped, events) = map(&mut mapper, &frame("execution_error", data));
            assert_eq!(
                mapped,
                Mapped::Failed {
                    code: DEFAULT_ERROR_CODE.into(),
                    message: "boom".into()
                }
            );
            assert_eq!(
                events[0].1,
                json!({"code": "SSE_STREAM_ERROR", "message": "boom"})
            );
        }
    }

    #[test]
    fn done_marker_ends_the_stream() {
        let mut mapper = StreamMapper::new("s");
        assert_eq!(map(&mut mapper, &raw("[DONE]")), (Mapped::End, vec![]));
        assert_eq!(map(&mut mapper, &raw(" [DONE]\n")), (Mapped::End, vec![]));
    }

    #[test]
    fn malformed_frames_write_nothing() {
        let mut mapper = StreamMapper::new("s");
        for data in [
            "not json",
            "{\"event\": \"text_chunk\", \"data\": {\"content\": \"x\"}",
            "[\"text_chunk\", {\"content\": \"x\"}]",
            "\"text_chunk\"",
            "{\"event\": \"text_chunk\", \"data\": \"x\"}",
            "{\"event\": \"text_chunk\", \"data\": [\"x\"]}",
            "{\"event\": \"text_chunk\", \"data\": {\"content\": \"x\"}} trailing",
            "",
        ] {
            assert_eq!(
                map(&mut mapper, &raw(data)),
                (Mapped::Malformed, vec![]),
                "{data}"
            );
        }
    }

    #[test]
    fn deeply_nested_json_is_malformed_not_a_crash() {
        let mut mapper = StreamMapper::new("s");
        let deep = format!(
            "{{\"event\": \"tool_call_start\", \"data\": {{\"arguments\": {}{}}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(map(&mut mapper, &raw(&deep)), (Mapped::Malformed, vec![]));
    }

    #[test]
    fn unknown_event_names_write_nothing() {
        let mut mapper = StreamMapper::new("s");
        assert_eq!(
            map(&mut mapper, &frame("brand_new_event", json!({"x": 1}))),
            (Mapped::Unknown, vec![])
        );
        assert_eq!(
            map(&mut mapper, &raw("{\"data\": {}}")),
            (Mapped::Unknown, vec![])
        );
        assert_eq!(
            map(&mut mapper, &raw("{\"event\": 7, \"data\": {}}")),
            (Mapped::Unknown, vec![])
        );
    }

    #[test]
    fn sse_event_field_is_the_fallback_name() {
        let mut mapper = StreamMapper::new("s");
        let ev = SseEvent {
            event: Some("text_chunk".into()),
            data: json!({"data": {"content": "a"}, "timestamp": TS}).to_string(),
            ..SseEvent::default()
        };
        let (mapped, events) = map(&mut mapper, &ev);
        assert_eq!(mapped, Mapped::Message("text"));
        assert_eq!(events[0].1["data"], json!({"content": "a"}));
        assert_eq!(events[0].1["timestamp"], TS);
        // Without an envelope the object is the payload itself.
        let ev = SseEvent {
            event: Some("thinking".into()),
            data: json!({"content": "hm", "stage": "s"}).to_string(),
            ..SseEvent::default()
        };
        let (mapped, events) = map(&mut mapper, &ev);
        assert_eq!(mapped, Mapped::Message("thinking"));
        assert_eq!(events[0].1["data"], json!({"content": "hm", "stage": "s"}));
        // The JSON's own name wins over the SSE field.
        let mut ev = frame("text_chunk", json!({"content": "b"}));
        ev.event = Some("thinking".into());
        assert_eq!(map(&mut mapper, &ev).0, Mapped::Message("text"));
    }

    #[test]
    fn missing_or_odd_fields_are_tolerated() {
        // Missing data, missing fields, nulls and unexpected types are passed on, not Malformed.
        let mut mapper = StreamMapper::new("s");
        let (mapped, events) = map(&mut mapper, &raw("{\"event\": \"tool_call_start\"}"));
        assert_eq!(mapped, Mapped::Message("tool_call"));
        assert_eq!(events[0].1["data"], json!({"status": "calling"}));
        let (mapped, events) = map(
            &mut mapper,
            &frame(
                "plan_step_start",
                json!({"step_id": null, "title": 5, "params": [1], "extra": {"a": 1}}),
            ),
        );
        assert_eq!(mapped, Mapped::Message("plan_step"));
        let data = &events[0].1["data"];
        assert_eq!(data["stepId"], Value::Null);
        assert_eq!(data["title"], 5);
        assert_eq!(data["params"], json!([1]));
        assert_eq!(data["status"], "running");
        assert!(data.get("extra").is_none());
        let (mapped, _) = map(
            &mut mapper,
            &raw("{\"event\": \"text_chunk\", \"data\": null, \"timestamp\": null}"),
        );
        assert_eq!(mapped, Mapped::Skipped);
        let (mapped, events) = map(&mut mapper, &frame("text_chunk", json!({"content": 42})));
        assert_eq!(mapped, Mapped::Message("text"));
        assert_eq!(events[0].1["data"]["content"], 42);
    }

    #[test]
    fn escaped_unicode_comes_out_as_utf8() {
        let mut mapper = StreamMapper::new("s");
        let ev = raw("{\"event\": \"text_chunk\", \"data\": {\"content\": \"\\u4f60\\u597d\\ud83c\\udf0f \\u2028\"}}");
        let mut out = Vec::new();
        assert_eq!(mapper.map(&ev, &mut out), Mapped::Message("text"));
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains("\"content\":\"你好🌏 \u{2028}\""), "{text}");
        assert_eq!(
            client_events(&out)[0].1["data"]["content"],
            "你好🌏 \u{2028}"
        );
    }

    #[test]
    fn message_ids_are_unique_within_and_across_streams() {
        let mut ids = HashSet::new();
        let mut message_ids = HashSet::new();
        for _ in 0..3 {
            let mut mapper = StreamMapper::new("s");
            assert!(message_ids.insert(mapper.message_id().to_owned()));
            for i in 0..50 {
                let (_, events) = map(
                    &mut mapper,
                    &frame("text_chunk", json!({"content": i.to_string()})),
                );
                let id = events[0].1["id"].as_str().unwrap().to_owned();
                assert!(id.starts_with(mapper.message_id()));
                assert!(ids.insert(id));
            }
        }
        assert_eq!(ids.len(), 150);
    }

    #[test]
    fn runtime_timestamp_is_preserved_else_now() {
        let mut mapper = StreamMapper::new("s");
        let ev = raw("{\"event\": \"text_chunk\", \"data\": {\"content\": \"x\"}, \"timestamp\": \"2026-02-09T01:02:03+08:00\"}");
        assert_eq!(
            map(&mut mapper, &ev).1[0].1["timestamp"],
            "2026-02-09T01:02:03+08:00"
        );

        let before = SystemTime::now();
        for data in [
            "{\"event\": \"text_chunk\", \"data\": {\"content\": \"x\"}}",
            "{\"event\": \"text_chunk\", \"data\": {\"content\": \"x\"}, \"timestamp\": null}",
            "{\"event\": \"text_chunk\", \"data\": {\"content\": \"x\"}, \"timestamp\": 1770000000}",
        ] {
            let (_, events) = map(&mut mapper, &raw(data));
            let ts = events[0].1["timestamp"].as_str().unwrap().to_owned();
            let parsed = humantime::parse_rfc3339(&ts).expect("RFC 3339 timestamp");
            let drift = parsed
                .duration_since(before)
                .unwrap_or_else(|e| e.duration());
            assert!(drift.as_secs() < 60, "{ts}");
        }
    }

    #[test]
    fn every_written_event_is_whole_lf_framed_and_one_line() {
        // A whole stream through one buffer, as the proxy writes it.
        let mut mapper = StreamMapper::new("s");
        let mut out = Vec::new();
        let frames = vec![
            frame(
                "plan_created",
                json!({"steps": [{"id": "1", "title": "a\r\nb"}]}),
            ),
            frame(
                "plan_step_start",
                json!({"step_id": "1", "title": "t", "tool": "x", "params": {"k": "v\n"}}),
            ),
            frame(
                "thinking",
                json!({"content": "line1\nline2\r\n", "stage": "x"}),
            ),
            frame("text_chunk", json!({"content": "多行\n文本\r"})),
            frame("ping", json!({})),
            frame(
                "plan_step_complete",
                json!({"step_id": "1", "title": "t", "result": "r\n", "duration_ms": 5}),
            ),
            frame("execution_error", json!({"error": "bad\r\nthing"})),
            frame("execution_complete", json!({"final_response": "done\n"})),
            raw("[DONE]"),
        ];
        for f in &frames {
            if let Mapped::Complete(_) = mapper.map(f, &mut out) {
                let done = DoneEvent {
                    session_id: "s",
                    message_id: "m",
                    tokens: 0,
                    latency_ms: 0,
                };
                done_event(&mut out, &done);
            }
        }
        let events = client_events(&out);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message",
                "message",
                "message",
                "message",
                "heartbeat",
                "message",
                "error",
                "done"
            ]
        );
        let mut ids = HashSet::new();
        for (name, data) in &events {
            if name == "message" {
                assert!(ids.insert(data["id"].as_str().unwrap().to_owned()));
            }
        }
    }

    #[test]
    fn error_and_heartbeat_helpers() {
        let mut out = Vec::new();
        error_event(&mut out, "UPSTREAM_TIMEOUT", "runtime took \"too\" long\n");
        heartbeat_event(&mut out);
        assert_eq!(
            client_events(&out),
            vec![
                (
                    "error".to_owned(),
                    json!({"code": "UPSTREAM_TIMEOUT", "message": "runtime took \"too\" long\n"})
                ),
                ("heartbeat".to_owned(), Value::Null),
            ]
        );
    }

    fn raw_out(mapper: &mut StreamMapper, data: &str) -> (Mapped, String) {
        let mut out = Vec::new();
        let mapped = mapper.map(&raw(data), &mut out);
        client_events(&out);
        (mapped, String::from_utf8(out).unwrap())
    }

    #[test]
    fn nested_values_reach_the_client_as_the_runtime_wrote_them() {
        let mut mapper = StreamMapper::new("s");
        let (mapped, text) = raw_out(
            &mut mapper,
            r#"{"event": "tool_call_start", "data": {"tool_name": "python", "arguments": {"language": "python", "code": "print(1)", "n": 1.50, "big": 12345678901234567890123, "e": 1E3}}}"#,
        );
        assert_eq!(mapped, Mapped::Message("tool_call"));
        assert!(
            text.contains(r#""arguments":{"language": "python", "code": "print(1)", "n": 1.50, "big": 12345678901234567890123, "e": 1E3}"#),
            "{text}"
        );
        let (_, text) = raw_out(
            &mut mapper,
            r#"{"event": "tool_call_complete", "data": {"tool_name": "python", "result": {"stdout":"1\n","stderr":"","exit_code":0}, "success": true, "error": null, "duration": 0.250}}"#,
        );
        assert!(
            text.contains(r#""result":{"stdout":"1\n","stderr":"","exit_code":0},"success":true,"error":null,"duration":0.250"#),
            "{text}"
        );
        let (_, text) = raw_out(
            &mut mapper,
            r#"{"event": "plan_step_start", "data": {"step_id": "s1", "params": {"z": [3, 2, 1], "a": {"y": "\u4f60", "x": null}}}}"#,
        );
        assert!(
            text.contains(r#""params":{"z": [3, 2, 1], "a": {"y": "\u4f60", "x": null}}"#),
            "{text}"
        );
    }

    #[test]
    fn nested_values_of_a_multi_line_frame_come_out_on_one_line() {
        let mut parser = SseParser::new(1 << 20);
        let mut events = Vec::new();
        let body = "data: {\"event\": \"mcp_call_start\",\r\ndata:  \"data\": {\"server_id\": \"fs\", \"arguments\": {\r\ndata:   \"path\": \"/tmp/x\",\r\ndata:   \"mode\": \"r\"\r\ndata: }}}\r\n\r\n";
        parser.feed(body.as_bytes(), &mut events).unwrap();
        assert_eq!(events.len(), 1);
        let mut mapper = StreamMapper::new("s");
        let mut out = Vec::new();
        assert_eq!(
            mapper.map(&events[0], &mut out),
            Mapped::Message("mcp_call")
        );
        let parsed = client_events(&out);
        assert_eq!(
            parsed[0].1["data"]["arguments"],
            json!({"path": "/tmp/x", "mode": "r"})
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""path": "/tmp/x",   "mode""#), "{text}");
    }

    #[test]
    fn execution_error_passes_its_details_through() {
        let mut mapper = StreamMapper::new("s");
        let (mapped, text) = raw_out(
            &mut mapper,
            r#"{"event": "execution_error", "data": {"error": "upstream LLM refused", "code": "LLM_ERROR", "httpStatus": 429, "details": {"retry_after": 30, "provider": "x"}, "traceId": "t-123"}}"#,
        );
        assert_eq!(
            mapped,
            Mapped::Failed {
                code: "LLM_ERROR".into(),
                message: "upstream LLM refused".into()
            }
        );
        assert_eq!(
            text,
            "event: error\ndata: {\"code\":\"LLM_ERROR\",\"message\":\"upstream LLM refused\",\"httpStatus\":429,\"details\":{\"retry_after\": 30, \"provider\": \"x\"},\"traceId\":\"t-123\"}\n\n"
        );
        // Absent or null ones are left out; the code defaults as before.
        let (_, events) = map(
            &mut mapper,
            &frame(
                "execution_error",
                json!({"error": "boom", "httpStatus": null, "traceId": "t"}),
            ),
        );
        assert_eq!(
            events[0].1,
            json!({"code": "SSE_STREAM_ERROR", "message": "boom", "traceId": "t"})
        );
    }

    fn capped(cap: usize) -> StreamMapper {
        StreamMapper::with_settings(
            "s",
            MapSettings {
                max_client_event_bytes: cap,
                files: None,
            },
        )
    }

    #[test]
    fn a_huge_tool_result_is_shortened_to_one_event_under_the_cap() {
        let cap = MapSettings::default().max_client_event_bytes;
        assert_eq!(cap, 16384);
        let stdout = "x".repeat(700_000);
        // Written out: json! would sort the result's keys.
        let big = format!(
            r#"{{"event": "tool_call_complete", "data": {{"tool_name": "python", "result": {{"stdout": "{stdout}", "stderr": "", "exit_code": 0}}, "success": true, "error": null, "duration": 1.5}}, "timestamp": "{TS}"}}"#
        );
        let mut mapper = capped(cap);
        let mut out = Vec::new();
        for ev in [
            raw(&big),
            frame("text_chunk", json!({"content": "after"})),
            frame("execution_complete", json!({})),
        ] {
            if let Mapped::Complete(_) = mapper.map(&ev, &mut out) {
                let done = DoneEvent {
                    session_id: "s",
                    message_id: "m",
                    tokens: 0,
                    latency_ms: 0,
                };
                done_event(&mut out, &done);
            }
        }
        let events = client_events(&out);
        assert_eq!(events.len(), 3);
        let text = std::str::from_utf8(&out).unwrap();
        let first = text.split("\n\n").next().unwrap();
        let data_line = first.strip_prefix("event: message\ndata: ").unwrap();
        assert!(data_line.len() <= cap, "{}", data_line.len());
        assert!(
            data_line.len() > cap - 64,
            "shortened more than needed: {}",
            data_line.len()
        );
        let msg = &events[0].1;
        assert_eq!(msg["type"], "tool_result");
        assert_eq!(msg["id"], format!("{}-1", mapper.message_id()));
        let data = &msg["data"];
        assert_eq!(data["truncated"], true);
        assert_eq!(data["toolName"], "python");
        assert_eq!(data["success"], true);
        assert_eq!(data["duration"], 1.5);
        let result = data["result"].as_str().expect("result is now a string");
        assert!(
            result.starts_with(r#"{"stdout": "xxxx"#),
            "{}",
            &result[..40]
        );
        assert!(result.ends_with("xxx…"));
        // The events after it are intact.
        assert_eq!(events[1].1["data"], json!({"content": "after"}));
        assert_eq!(events[1].1["id"], format!("{}-2", mapper.message_id()));
        assert_eq!(events[2].0, "done");
    }

    #[test]
    fn shortening_never_cuts_a_character_and_escapes_count() {
        for cap in [1024, 1500, 2000, 4099] {
            let args: Vec<String> = (0..400).map(|i| format!("参数\"{i}\"\n🦀")).collect();
            let mut mapper = capped(cap);
            let mut out = Vec::new();
            let ev = frame(
                "skill_call_start",
                json!({"skill_id": "k", "skill_name": "翻译", "arguments": args}),
            );
            assert_eq!(mapper.map(&ev, &mut out), Mapped::Message("skill_call"));
            let events = client_events(&out);
            let text = std::str::from_utf8(&out).unwrap();
            let line = text.strip_prefix("event: message\ndata: ").unwrap();
            assert!(line.len() - 2 <= cap, "{cap}: {}", line.len() - 2);
            let data = &events[0].1["data"];
            assert_eq!(data["truncated"], true);
            assert_eq!(data["status"], "calling");
            let cut = data["arguments"].as_str().unwrap();
            assert!(cut.starts_with("[\"参数\\\"0\\\"\\n🦀\""), "{cut}");
            assert!(cut.ends_with('…'));
        }
    }

    #[test]
    fn text_and_small_events_are_never_shortened() {
        let mut mapper = capped(1024);
        let content = "长".repeat(10_000);
        let (_, events) = map(
            &mut mapper,
            &frame("text_chunk", json!({"content": content})),
        );
        assert_eq!(events[0].1["data"], json!({"content": content}));
        let (_, events) = map(
            &mut mapper,
            &frame(
                "plan_step_complete",
                json!({"step_id": "1", "result": {"a": 1}}),
            ),
        );
        assert!(events[0].1["data"].get("truncated").is_none());
        assert_eq!(events[0].1["data"]["result"], json!({"a": 1}));
        // 0 turns the limit off.
        let mut mapper = capped(0);
        let result = "y".repeat(100_000);
        let (_, events) = map(
            &mut mapper,
            &frame(
                "mcp_call_complete",
                json!({"server_id": "fs", "result": result}),
            ),
        );
        assert_eq!(events[0].1["data"]["result"], result);
    }

    #[test]
    fn file_created_becomes_a_signed_file_message() {
        use crate::core::files::{verify, FileKey, ROUTE_PREFIX};
        let key = FileKey::new(b"k");
        let mut mapper = StreamMapper::with_settings(
            "s",
            MapSettings {
                files: Some(FileSigner {
                    key: key.clone(),
                    org: "org-a".into(),
                    ttl_secs: 3600,
                }),
                ..MapSettings::default()
            },
        );
        let data = json!({"file_id": "f-9", "filename": "报告.pdf", "mime_type": "application/pdf", "size": 1024, "url": "http://runtime:8000/files/f-9"});
        let (mapped, events) = map(&mut mapper, &frame("file_created", data));
        assert_eq!(mapped, Mapped::Message("file"));
        let data = &events[0].1["data"];
        assert_eq!(data["filename"], "报告.pdf");
        assert_eq!(data["mimeType"], "application/pdf");
        assert_eq!(data["size"], 1024);
        assert_eq!(data.as_object().unwrap().len(), 4);
        let url = data["url"].as_str().unwrap();
        let (path, query) = url.split_once('?').unwrap();
        assert_eq!(path, format!("{ROUTE_PREFIX}f-9"));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(
            verify(&key, "org-a", "f-9", query, now).as_deref(),
            Ok("http://runtime:8000/files/f-9")
        );
        assert!(verify(&key, "org-b", "f-9", query, now).is_err());
        assert!(verify(&key, "org-a", "f-9", query, now + 3601).is_err());

        // Without a signer: the bare route, never the runtime's address.
        let mut mapper = StreamMapper::new("s");
        let (_, events) = map(
            &mut mapper,
            &frame(
                "file_created",
                json!({"file_id": "f 1", "url": "http://runtime/x"}),
            ),
        );
        assert_eq!(
            events[0].1["data"],
            json!({"url": "/api/v1/runtime/files/f%201"})
        );
    }

    #[test]
    fn runtime_pings_comment_ignored_frame_is_a_heartbeat() {
        let body = b": ping - 2026-12-01 18:30:00.123456+00:00\r\n\r\ndata: {\"event\": \"ping\", \"data\": {}, \"timestamp\": \"2026-12-01T18:30:15.000001+00:00\"}\r\n\r\n: ping - 2026-12-01 18:30:30.123456+00:00\r\n\r\ndata: {\"event\": \"text_chunk\", \"data\": {\"content\": \"hi\"}}\r\n\r\n";
        // However the network cuts it.
        for read in [1, 7, body.len()] {
            let mut parser = SseParser::new(1 << 20);
            let mut events = Vec::new();
            for piece in body.chunks(read) {
                parser.feed(piece, &mut events).unwrap();
            }
            assert!(!parser.finish());
            assert_eq!(parser.comments(), 2);
            assert_eq!(events.len(), 2, "comments are not events");
            let mut mapper = StreamMapper::new("s");
            let mut out = Vec::new();
            assert_eq!(mapper.map(&events[0], &mut out), Mapped::Heartbeat);
            assert_eq!(mapper.map(&events[1], &mut out), Mapped::Message("text"));
            let client = client_events(&out);
            assert_eq!(client[0], ("heartbeat".to_owned(), Value::Null));
            assert_eq!(client[1].1["data"], json!({"content": "hi"}));
        }
    }
}
