//! The Agent2UI mapper as it was before the one-pass writer (`core::agent2ui` at 2d03616): each
//! frame read with serde_json's deserializer, strings unescaped into owned text and the client
//! event serialised with serde. Kept only as the oracle of `tests/rewrite_differential.rs`, which
//! checks that today's writer produces the same bytes.

#![allow(dead_code)]

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::time::SystemTime;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Serialize as DeriveSerialize;
use serde_json::value::RawValue;

use cutover_proxy::core::files::{self, FileSigner};
use cutover_proxy::core::sse::SseEvent;

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
