//! Maps the runtime orchestrator's SSE events (`{"event", "data", "timestamp"}` frames) onto the
//! Agent2UI events the web app reads, per the contract's "Runtime stream → Agent2UI" table: each
//! runtime event becomes zero or one whole, LF-framed client event with one-line JSON data.
//!
//! The table is data (`ROWS`), run through one function. Nested values are never parsed into a
//! tree: each field is borrowed from the frame as raw JSON and written back as it came, so keys
//! keep their order and numbers their spelling.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::time::SystemTime;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Serialize as DeriveSerialize;
use serde_json::value::RawValue;

use crate::core::files::{self, FileSigner};
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
    write_client_event(
        out,
        "done",
        &DoneData {
            session_id: done.session_id,
            message_id: done.message_id,
            execution_mode: EXECUTION_MODE,
            usage: Usage {
                tokens: done.tokens,
                latency_ms: done.latency_ms,
            },
        },
    );
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

/// Per-stream state: the session id, the stream's messageId and the message counter.
#[derive(Debug)]
pub struct StreamMapper {
    settings: MapSettings,
    session_id: String,
    message_id: String,
    /// `"<message_id>-"` followed by the counter of the last message written.
    id_buf: String,
    counter: u64,
    /// The text streamed so far, when kept (see [`StreamMapper::keeping_text`]).
    text: Option<String>,
}

impl StreamMapper {
    /// session_id is the `done` event's; a fresh messageId (uuid v4) is made per stream.
    pub fn new(session_id: &str) -> Self {
        StreamMapper::with_settings(session_id, MapSettings::default())
    }

    pub fn with_settings(session_id: &str, settings: MapSettings) -> Self {
        let message_id = uuid::Uuid::new_v4().to_string();
        let mut id_buf = String::with_capacity(message_id.len() + 8);
        id_buf.push_str(&message_id);
        id_buf.push('-');
        StreamMapper {
            settings,
            session_id: session_id.to_owned(),
            message_id,
            id_buf,
            counter: 0,
            text: None,
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
        &self.message_id
    }

    /// Map one parsed runtime event, appending zero or more whole client events to `out`.
    pub fn map(&mut self, ev: &SseEvent, out: &mut Vec<u8>) -> Mapped {
        let text = ev.data.trim();
        if text == "[DONE]" {
            return Mapped::End;
        }
        let mut payload = Payload::default();
        let Ok(envelope) = Envelope::parse(text, &mut payload) else {
            return Mapped::Malformed;
        };
        let name = match envelope.event.non_null() {
            Some(Field::Str(name)) => &**name,
            None => {
                let Some(name) = ev.event.as_deref() else {
                    return Mapped::Unknown;
                };
                // No envelope at all: the JSON object is the payload itself.
                if !envelope.has_data && payload.parse(text).is_err() {
                    return Mapped::Malformed;
                }
                name
            }
            Some(_) => return Mapped::Unknown,
        };
        let Some(row) = ROWS.iter().find(|row| row.event == name) else {
            return Mapped::Unknown;
        };
        self.apply(row, &payload, &envelope.timestamp, out)
    }

    /// The one place a table row becomes client output.
    fn apply(&mut self, row: &Row, p: &Payload, ts: &Field, out: &mut Vec<u8>) -> Mapped {
        let mut now = String::new();
        match row.shape {
            Shape::Message(fields) => self.capped_message(out, row, fields, p, stamp(ts, &mut now)),
            // Text is never shortened: it is what the user reads.
            Shape::NonEmpty(key, fields) => match p.get(key).non_null() {
                None => Mapped::Skipped,
                Some(Field::Str(s)) if s.is_empty() => Mapped::Skipped,
                field => {
                    if let (Some(text), Some(Field::Str(s))) = (self.text.as_mut(), field) {
                        text.push_str(s);
                    }
                    self.message(out, row.kind, &Obj::new(fields, p), stamp(ts, &mut now))
                }
            },
            Shape::Plan => self.message(
                out,
                row.kind,
                &PlanData(p.get(K::Steps)),
                stamp(ts, &mut now),
            ),
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
                let data = FileData {
                    url: url.as_deref(),
                    filename: p.get(K::Filename).present(),
                    mime_type: p.get(K::MimeType).present(),
                    size: p.get(K::Size).present(),
                };
                self.message(out, row.kind, &data, stamp(ts, &mut now))
            }
            Shape::Heartbeat => {
                heartbeat_event(out);
                Mapped::Heartbeat
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
                    Field::Raw(fr) if fr.get().starts_with('{') => {
                        serde_json::from_str::<Inner>(fr.get()).ok()
                    }
                    _ => None,
                };
                let final_response = match (p.get(K::FinalResponse), &inner) {
                    (Field::Str(s), _) => s.clone().into_owned(),
                    (
                        _,
                        Some(Inner {
                            content: Field::Str(s),
                            ..
                        }),
                    ) => s.clone().into_owned(),
                    _ => String::new(),
                };
                let usage = p
                    .get(K::Usage)
                    .non_null()
                    .or_else(|| inner.as_ref().and_then(|i| i.usage.non_null()));
                Mapped::Complete(Completion {
                    final_response,
                    tokens: usage.and_then(token_count),
                })
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
                write_client_event(
                    out,
                    "error",
                    &ErrorData {
                        code: &code,
                        message: &message,
                        http_status: p.get(K::HttpStatus).non_null(),
                        details: p.get(K::Details).non_null(),
                        trace_id: p.get(K::TraceId).non_null(),
                    },
                );
                Mapped::Failed { code, message }
            }
        }
    }

    /// Write the next message (a new id).
    fn message<D: Serialize>(
        &mut self,
        out: &mut Vec<u8>,
        kind: &'static str,
        data: &D,
        timestamp: &str,
    ) -> Mapped {
        self.counter += 1;
        self.id_buf.truncate(self.message_id.len() + 1);
        // Writing to a String cannot fail.
        let _ = write!(self.id_buf, "{}", self.counter);
        self.write_message(out, kind, data, timestamp);
        Mapped::Message(kind)
    }

    /// Write a message with the current id.
    fn write_message<D: Serialize>(
        &self,
        out: &mut Vec<u8>,
        kind: &'static str,
        data: &D,
        timestamp: &str,
    ) {
        write_client_event(
            out,
            "message",
            &Message {
                id: &self.id_buf,
                kind,
                data,
                timestamp,
            },
        );
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
        ts: &str,
    ) -> Mapped {
        let start = out.len();
        let mapped = self.message(out, row.kind, &Obj::new(fields, p), ts);
        let cap = self.settings.max_client_event_bytes;
        if cap == 0 || data_len(&out[start..]) <= cap {
            return mapped;
        }
        let mut cuts: Vec<(K, String)> = Vec::new();
        let mut scratch = Vec::new();
        for key in [K::Result, K::Arguments, K::Params] {
            let read = fields
                .iter()
                .any(|out| matches!(out, Out::Copy(_, k) if *k == key));
            let Some(value) = p.get(key).non_null().filter(|_| read) else {
                continue;
            };
            cuts.push((key, String::new()));
            scratch.clear();
            let data = Obj {
                fields,
                p,
                cuts: &cuts,
            };
            self.write_message(&mut scratch, row.kind, &data, ts);
            // What the value's string may take, escaped, beside everything else.
            let room = cap.saturating_sub(data_len(&scratch));
            let text = value.json_text();
            let cut = &mut cuts.last_mut().expect("just pushed").1;
            cut.push_str(prefix_within(&text, room.saturating_sub(ELLIPSIS.len())));
            cut.push_str(ELLIPSIS);
            if room >= ELLIPSIS.len() {
                break;
            }
        }
        if cuts.is_empty() {
            return mapped;
        }
        out.truncate(start);
        let data = Obj {
            fields,
            p,
            cuts: &cuts,
        };
        self.write_message(out, row.kind, &data, ts);
        mapped
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

/// The runtime's timestamp when it sent one, else now.
fn stamp<'t>(ts: &'t Field, now: &'t mut String) -> &'t str {
    match ts {
        Field::Str(ts) if !ts.is_empty() => ts,
        _ => {
            *now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            now
        }
    }
}

/// `event: error`, data `{"code","message"}`.
pub fn error_event(out: &mut Vec<u8>, code: &str, message: &str) {
    write_client_event(
        out,
        "error",
        &ErrorData {
            code,
            message,
            http_status: None,
            details: None,
            trace_id: None,
        },
    );
}

/// An `error` event's data; the runtime's optional fields are left out when absent or null.
#[derive(DeriveSerialize)]
#[serde(rename_all = "camelCase")]
struct ErrorData<'x> {
    code: &'x str,
    message: &'x str,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<&'x Field<'x>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'x Field<'x>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'x Field<'x>>,
}

/// `event: heartbeat`, `data: null`.
pub fn heartbeat_event(out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: heartbeat\ndata: null\n\n");
}

/// `event: NAME\ndata: <one-line JSON>\n\n` (serde_json escapes every control character, CR and
/// LF included, so the data is always a single line).
fn write_client_event<T: Serialize>(out: &mut Vec<u8>, name: &str, data: &T) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serialising these types into a Vec cannot fail: map keys are strings, no I/O.
    serde_json::to_writer(&mut *out, data).expect("JSON serialisation into memory failed");
    out.extend_from_slice(b"\n\n");
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
}

use Out::{Copy as C, Fixed as F};

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

const ROWS: &[Row] = &[
    special("plan_created", "plan", Shape::Plan),
    message(
        "plan_step_start",
        "plan_step",
        &[
            C("stepId", K::StepId),
            C("title", K::Title),
            F("status", "running"),
            C("tool", K::Tool),
            C("params", K::Params),
        ],
    ),
    message(
        "plan_step_complete",
        "plan_step",
        &[
            C("stepId", K::StepId),
            C("title", K::Title),
            F("status", "completed"),
            C("result", K::Result),
            C("durationMs", K::DurationMs),
        ],
    ),
    message(
        "plan_step_failed",
        "plan_step",
        &[
            C("stepId", K::StepId),
            C("title", K::Title),
            F("status", "failed"),
            C("error", K::Error),
        ],
    ),
    message(
        "tool_call_start",
        "tool_call",
        &[
            C("toolName", K::ToolName),
            C("arguments", K::Arguments),
            F("status", "calling"),
        ],
    ),
    message(
        "tool_call_complete",
        "tool_result",
        &[
            C("toolName", K::ToolName),
            C("result", K::Result),
            C("success", K::Success),
            C("error", K::Error),
            C("duration", K::Duration),
        ],
    ),
    message(
        "skill_call_start",
        "skill_call",
        &[
            C("skillId", K::SkillId),
            C("skillName", K::SkillName),
            C("arguments", K::Arguments),
            F("status", "calling"),
        ],
    ),
    message(
        "skill_call_complete",
        "skill_result",
        &[
            C("skillId", K::SkillId),
            C("skillName", K::SkillName),
            C("result", K::Result),
            C("success", K::Success),
            C("error", K::Error),
            C("duration", K::Duration),
        ],
    ),
    message(
        "mcp_call_start",
        "mcp_call",
        &[
            C("serverId", K::ServerId),
            C("toolName", K::ToolName),
            C("arguments", K::Arguments),
            F("status", "calling"),
        ],
    ),
    message(
        "mcp_call_complete",
        "mcp_result",
        &[
            C("serverId", K::ServerId),
            C("toolName", K::ToolName),
            C("result", K::Result),
            C("success", K::Success),
            C("error", K::Error),
            C("duration", K::Duration),
        ],
    ),
    message(
        "thinking",
        "thinking",
        &[C("content", K::Content), C("stage", K::Stage)],
    ),
    special(
        "text_chunk",
        "text",
        Shape::NonEmpty(K::Content, &[C("content", K::Content)]),
    ),
    special("ping", "", Shape::Heartbeat),
    special("file_created", "file", Shape::File),
    special("execution_complete", "", Shape::Done),
    special("execution_error", "", Shape::Error),
];

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

/// A runtime field of any JSON type. Strings are unescaped (borrowed from the frame when they need
/// no unescaping); everything else is kept as the runtime wrote it, so nested objects reach the
/// client with the same keys in the same order and numbers spelt the same.
#[derive(Debug, Default)]
enum Field<'a> {
    #[default]
    Absent,
    Str(Cow<'a, str>),
    Raw(Cow<'a, RawValue>),
}

/// Deeper nesting is refused, as serde_json refuses it when it builds a value: the raw text is
/// never parsed into a tree here, so nothing else would stop it.
const MAX_DEPTH: usize = 128;

impl<'a> Field<'a> {
    fn non_null(&self) -> Option<&Self> {
        match self {
            Field::Absent => None,
            Field::Raw(raw) if raw.get() == "null" => None,
            field => Some(field),
        }
    }

    /// The field as text: strings as they are, other non-null values as JSON.
    fn to_text(&self) -> Option<String> {
        match self.non_null()? {
            Field::Str(s) => Some(s.clone().into_owned()),
            Field::Raw(raw) => Some(raw.get().to_owned()),
            Field::Absent => None,
        }
    }

    fn present(&self) -> Option<&Self> {
        (!matches!(self, Field::Absent)).then_some(self)
    }

    /// The value's JSON text as the runtime wrote it; of a string, the string itself.
    fn json_text(&self) -> Cow<'_, str> {
        match self {
            Field::Absent => Cow::Borrowed(""),
            Field::Str(s) => Cow::Borrowed(s),
            Field::Raw(raw) => Cow::Borrowed(raw.get()),
        }
    }

    fn json_text_non_null(&self) -> Option<Cow<'_, str>> {
        self.non_null().map(Field::json_text)
    }

    fn from_raw<E: serde::de::Error>(raw: &'a RawValue) -> Result<Self, E> {
        let text = raw.get();
        if let Some(inner) = text.strip_prefix('"') {
            let inner = &inner[..inner.len() - 1];
            return Ok(Field::Str(if inner.contains('\\') {
                Cow::Owned(serde_json::from_str(text).map_err(E::custom)?)
            } else {
                Cow::Borrowed(inner)
            }));
        }
        if text.starts_with(['[', '{']) && too_deep(text) {
            return Err(E::custom("JSON nested too deeply"));
        }
        // A frame's data may span several `data:` lines; outside strings (where JSON forbids
        // raw control characters) a line break is only whitespace, and the client needs one line.
        if text.contains(['\n', '\r']) {
            let one_line = text.replace(['\n', '\r'], " ");
            return RawValue::from_string(one_line)
                .map(|raw| Field::Raw(Cow::Owned(raw)))
                .map_err(E::custom);
        }
        Ok(Field::Raw(Cow::Borrowed(raw)))
    }
}

/// Whether valid JSON text nests arrays and objects deeper than [`MAX_DEPTH`].
fn too_deep(text: &str) -> bool {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Field::from_raw(<&'de RawValue>::deserialize(d)?)
    }
}

impl Serialize for Field<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Absent => s.serialize_none(),
            Field::Str(v) => s.serialize_str(v),
            Field::Raw(raw) => raw.serialize(s),
        }
    }
}

/// The runtime's envelope `{"event": NAME, "data": {...}, "timestamp": ISO}` without its payload,
/// which is parsed in place into a [`Payload`] (no copies of that large struct).
#[derive(Default)]
struct Envelope<'a> {
    event: Field<'a>,
    timestamp: Field<'a>,
    /// `data` was an object (rather than absent or null).
    has_data: bool,
}

impl<'a> Envelope<'a> {
    /// Parse a frame's JSON text; anything but an object, or a `data` that is neither an object
    /// nor null, is an error.
    fn parse(text: &'a str, payload: &mut Payload<'a>) -> serde_json::Result<Self> {
        let mut de = serde_json::Deserializer::from_str(text);
        let envelope = de.deserialize_map(EnvelopeVisitor(payload))?;
        de.end()?;
        Ok(envelope)
    }
}

struct EnvelopeVisitor<'p, 'a>(&'p mut Payload<'a>);

impl<'de: 'a, 'a> Visitor<'de> for EnvelopeVisitor<'_, 'a> {
    type Value = Envelope<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a runtime event object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(key) = map.next_key::<EnvelopeKey>()? {
            match key {
                EnvelopeKey::Event => envelope.event = map.next_value()?,
                EnvelopeKey::Timestamp => envelope.timestamp = map.next_value()?,
                EnvelopeKey::Data => {
                    envelope.has_data = map.next_value_seed(PayloadSeed(&mut *self.0))?;
                }
                EnvelopeKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(envelope)
    }
}

enum EnvelopeKey {
    Event,
    Data,
    Timestamp,
    Other,
}

impl<'de> Deserialize<'de> for EnvelopeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = EnvelopeKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, key: &str) -> Result<EnvelopeKey, E> {
                Ok(match key {
                    "event" => EnvelopeKey::Event,
                    "data" => EnvelopeKey::Data,
                    "timestamp" => EnvelopeKey::Timestamp,
                    _ => EnvelopeKey::Other,
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The union of every table row's runtime fields, indexed by [`K`]; each is optional and of any
/// JSON type.
#[derive(Default)]
struct Payload<'a> {
    fields: [Field<'a>; KEYS],
}

impl<'a> Payload<'a> {
    /// Parse a bare payload object (a frame without envelope).
    fn parse(&mut self, text: &'a str) -> serde_json::Result<()> {
        let mut de = serde_json::Deserializer::from_str(text);
        de.deserialize_map(PayloadSeed(self))?;
        de.end()
    }

    fn get(&self, key: K) -> &Field<'a> {
        &self.fields[key as usize]
    }

    fn slot(&mut self, key: &str) -> Option<&mut Field<'a>> {
        K::of(key).map(|k| &mut self.fields[k as usize])
    }
}

/// Fills a [`Payload`] from an object; `true` for an object, `false` for null, else an error.
struct PayloadSeed<'p, 'a>(&'p mut Payload<'a>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for PayloadSeed<'_, 'a> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for PayloadSeed<'_, 'a> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or null")
    }
    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(slot) = map.next_key_seed(SlotSeed(&mut *self.0))? {
            match slot {
                Some(field) => *field = map.next_value()?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(true)
    }
}

/// Resolves a payload key to the field it fills (`None`: not a field of any table row).
struct SlotSeed<'p, 'a>(&'p mut Payload<'a>);

impl<'de, 'p, 'a> DeserializeSeed<'de> for SlotSeed<'p, 'a> {
    type Value = Option<&'p mut Field<'a>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, 'p, 'a> Visitor<'de> for SlotSeed<'p, 'a> {
    type Value = Option<&'p mut Field<'a>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.slot(key))
    }
}

// ---- client side --------------------------------------------------------------------------------

/// An Agent2UIMessage.
#[derive(DeriveSerialize)]
struct Message<'x, D> {
    id: &'x str,
    #[serde(rename = "type")]
    kind: &'x str,
    data: &'x D,
    timestamp: &'x str,
}

/// A message's data: a row's entries filled from the payload, leaving out absent fields (null
/// ones stay null).
struct Obj<'x, 'a> {
    fields: &'static [Out],
    p: &'x Payload<'a>,
    /// Fields written as these strings instead; any makes the data `"truncated": true`.
    cuts: &'x [(K, String)],
}

impl<'x, 'a> Obj<'x, 'a> {
    fn new(fields: &'static [Out], p: &'x Payload<'a>) -> Self {
        Obj {
            fields,
            p,
            cuts: &[],
        }
    }
}

impl Serialize for Obj<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for out in self.fields {
            match *out {
                Out::Copy(name, key) => {
                    if let Some((_, cut)) = self.cuts.iter().find(|(k, _)| *k == key) {
                        map.serialize_entry(name, cut)?;
                        continue;
                    }
                    let value = self.p.get(key);
                    if !matches!(value, Field::Absent) {
                        map.serialize_entry(name, value)?;
                    }
                }
                Out::Fixed(name, value) => map.serialize_entry(name, value)?,
            }
        }
        if !self.cuts.is_empty() {
            map.serialize_entry("truncated", &true)?;
        }
        map.end()
    }
}

/// A `file` message's data.
#[derive(DeriveSerialize)]
#[serde(rename_all = "camelCase")]
struct FileData<'x> {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'x str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<&'x Field<'x>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mime_type: Option<&'x Field<'x>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<&'x Field<'x>>,
}

/// `{steps:[{id,title,status:"pending"}], currentStep:""}`; steps that are not objects are dropped.
struct PlanData<'x, 'a>(&'x Field<'a>);

impl Serialize for PlanData<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Deserialize)]
        struct StepIn<'x> {
            #[serde(borrow, default)]
            id: Field<'x>,
            #[serde(borrow, default)]
            title: Field<'x>,
        }
        struct StepOut<'x>(StepIn<'x>);
        impl Serialize for StepOut<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(None)?;
                for (key, value) in [("id", &self.0.id), ("title", &self.0.title)] {
                    if !matches!(value, Field::Absent) {
                        map.serialize_entry(key, value)?;
                    }
                }
                map.serialize_entry("status", "pending")?;
                map.end()
            }
        }
        let items: Vec<Field> = match self.0 {
            Field::Raw(raw) if raw.get().starts_with('[') => {
                serde_json::from_str(raw.get()).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let mut steps = Vec::with_capacity(items.len());
        for item in &items {
            if let Field::Raw(raw) = item {
                if raw.get().starts_with('{') {
                    if let Ok(step) = serde_json::from_str::<StepIn>(raw.get()) {
                        steps.push(StepOut(step));
                    }
                }
            }
        }
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("steps", &steps)?;
        map.serialize_entry("currentStep", "")?;
        map.end()
    }
}

#[derive(DeriveSerialize)]
#[serde(rename_all = "camelCase")]
struct DoneData<'x> {
    session_id: &'x str,
    message_id: &'x str,
    execution_mode: &'static str,
    usage: Usage,
}

#[derive(DeriveSerialize)]
#[serde(rename_all = "camelCase")]
struct Usage {
    tokens: u64,
    latency_ms: u64,
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
    let Field::Raw(raw) = usage else { return None };
    if let Ok(n) = serde_json::from_str::<u64>(raw.get()) {
        return Some(n);
    }
    let c = serde_json::from_str::<Counts>(raw.get()).ok()?;
    c.total_tokens.or(match (c.input_tokens, c.output_tokens) {
        (None, None) => None,
        (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
    })
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
