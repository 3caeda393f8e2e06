//! Maps the runtime orchestrator's SSE events (`{"event", "data", "timestamp"}` frames) onto the
//! Agent2UI events the web app reads, per the contract's "Runtime stream → Agent2UI" table: each
//! runtime event becomes zero or one whole, LF-framed client event with one-line JSON data.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::time::SystemTime;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde::Serialize as DeriveSerialize;
use serde_json::Value;

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
    /// execution_complete → `event: done` written.
    Done,
    /// execution_error → `event: error` written.
    Failed { code: String, message: String },
    /// `[DONE]`: nothing written.
    End,
    /// Data not JSON / wrong shape: nothing written.
    Malformed,
    /// Event name not in the table: nothing written.
    Unknown,
}

/// Per-stream state: the session id, the stream's messageId and the message counter.
#[derive(Debug)]
pub struct StreamMapper {
    session_id: String,
    message_id: String,
    /// `"<message_id>-"` followed by the counter of the last message written.
    id_buf: String,
    counter: u64,
}

impl StreamMapper {
    /// session_id goes into the `done` event; a fresh messageId (uuid v4) is made per stream.
    pub fn new(session_id: &str) -> Self {
        let message_id = uuid::Uuid::new_v4().to_string();
        let mut id_buf = String::with_capacity(message_id.len() + 8);
        id_buf.push_str(&message_id);
        id_buf.push('-');
        StreamMapper {
            session_id: session_id.to_owned(),
            message_id,
            id_buf,
            counter: 0,
        }
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
        let name = match &envelope.event {
            Field::Str(name) => &**name,
            Field::Absent | Field::Value(Value::Null) => {
                let Some(name) = ev.event.as_deref() else {
                    return Mapped::Unknown;
                };
                // No envelope at all: the JSON object is the payload itself.
                if !envelope.has_data && payload.parse(text).is_err() {
                    return Mapped::Malformed;
                }
                name
            }
            Field::Value(_) => return Mapped::Unknown,
        };
        let Some(row) = ROWS.iter().find(|row| row.event == name) else {
            return Mapped::Unknown;
        };
        self.apply(row, &payload, &envelope.timestamp, out)
    }

    /// The one place a table row becomes client output.
    fn apply(&mut self, row: &Row, p: &Payload, ts: &Field, out: &mut Vec<u8>) -> Mapped {
        match row.shape {
            Shape::Message(fields) => self.message(out, row.kind, &Obj { fields, p }, ts),
            Shape::NonEmpty(key, fields) => match p.get(key) {
                Field::Absent | Field::Value(Value::Null) => Mapped::Skipped,
                Field::Str(s) if s.is_empty() => Mapped::Skipped,
                _ => self.message(out, row.kind, &Obj { fields, p }, ts),
            },
            Shape::Plan => self.message(out, row.kind, &PlanData(p.get(K::Steps)), ts),
            Shape::Heartbeat => {
                heartbeat_event(out);
                Mapped::Heartbeat
            }
            Shape::Done => {
                let usage = p.get(K::Usage).non_null().map(UsageRef::Field).or_else(|| {
                    match p.get(K::FinalResponse) {
                        Field::Value(Value::Object(fr)) => fr
                            .get("usage")
                            .filter(|u| !u.is_null())
                            .map(UsageRef::Value),
                        _ => None,
                    }
                });
                write_client_event(
                    out,
                    "done",
                    &DoneData {
                        session_id: &self.session_id,
                        message_id: &self.message_id,
                        execution_mode: EXECUTION_MODE,
                        usage,
                    },
                );
                Mapped::Done
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
                error_event(out, &code, &message);
                Mapped::Failed { code, message }
            }
        }
    }

    fn message<D: Serialize>(
        &mut self,
        out: &mut Vec<u8>,
        kind: &'static str,
        data: &D,
        timestamp: &Field,
    ) -> Mapped {
        self.counter += 1;
        self.id_buf.truncate(self.message_id.len() + 1);
        // Writing to a String cannot fail.
        let _ = write!(self.id_buf, "{}", self.counter);
        let now;
        let timestamp = match timestamp {
            Field::Str(ts) if !ts.is_empty() => &**ts,
            _ => {
                now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                &now
            }
        };
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
        Mapped::Message(kind)
    }
}

/// `event: error`, data `{"code","message"}`.
pub fn error_event(out: &mut Vec<u8>, code: &str, message: &str) {
    #[derive(DeriveSerialize)]
    struct ErrorData<'a> {
        code: &'a str,
        message: &'a str,
    }
    write_client_event(out, "error", &ErrorData { code, message });
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
    /// `event: done`.
    Done,
    /// `event: error`.
    Error,
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
}

const KEYS: usize = K::Code as usize + 1;

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
            _ => return None,
        })
    }
}

// ---- runtime side -------------------------------------------------------------------------------

/// A runtime field of any JSON type; strings are borrowed from the frame when they need no unescaping.
#[derive(Debug, Default)]
enum Field<'a> {
    #[default]
    Absent,
    Str(Cow<'a, str>),
    Value(Value),
}

impl Field<'_> {
    fn non_null(&self) -> Option<&Self> {
        match self {
            Field::Absent | Field::Value(Value::Null) => None,
            field => Some(field),
        }
    }

    /// The field as text: strings as they are, other non-null values as JSON.
    fn to_text(&self) -> Option<String> {
        match self {
            Field::Absent | Field::Value(Value::Null) => None,
            Field::Str(s) => Some(s.clone().into_owned()),
            Field::Value(v) => Some(v.to_string()),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<'a>(PhantomData<Field<'a>>);

impl<'de: 'a, 'a> Visitor<'de> for FieldVisitor<'a> {
    type Value = Field<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Value(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Field::Value(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Value(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::Value(v.into()))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Value(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Value(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Field::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq)).map(Field::Value)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map)).map(Field::Value)
    }
}

impl Serialize for Field<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Absent => s.serialize_none(),
            Field::Str(v) => s.serialize_str(v),
            Field::Value(v) => v.serialize(s),
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
}

impl Serialize for Obj<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for out in self.fields {
            match *out {
                Out::Copy(name, key) => {
                    let value = self.p.get(key);
                    if !matches!(value, Field::Absent) {
                        map.serialize_entry(name, value)?;
                    }
                }
                Out::Fixed(name, value) => map.serialize_entry(name, value)?,
            }
        }
        map.end()
    }
}

/// `{steps:[{id,title,status:"pending"}], currentStep:""}`; steps that are not objects are dropped.
struct PlanData<'x, 'a>(&'x Field<'a>);

impl Serialize for PlanData<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Steps<'x>(&'x [Value]);
        impl Serialize for Steps<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(None)?;
                for step in self.0.iter().filter_map(Value::as_object) {
                    seq.serialize_element(&StepOut(step))?;
                }
                seq.end()
            }
        }
        struct StepOut<'x>(&'x serde_json::Map<String, Value>);
        impl Serialize for StepOut<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(None)?;
                for key in ["id", "title"] {
                    if let Some(v) = self.0.get(key) {
                        map.serialize_entry(key, v)?;
                    }
                }
                map.serialize_entry("status", "pending")?;
                map.end()
            }
        }
        let steps: &[Value] = match self.0 {
            Field::Value(Value::Array(steps)) => steps,
            _ => &[],
        };
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("steps", &Steps(steps))?;
        map.serialize_entry("currentStep", "")?;
        map.end()
    }
}

#[derive(DeriveSerialize)]
#[serde(untagged)]
enum UsageRef<'x> {
    Field(&'x Field<'x>),
    Value(&'x Value),
}

#[derive(DeriveSerialize)]
#[serde(rename_all = "camelCase")]
struct DoneData<'x> {
    session_id: &'x str,
    message_id: &'x str,
    execution_mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageRef<'x>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sse::SseParser;
    use serde_json::json;
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
        assert_eq!(mapped, Mapped::Done);
        assert_eq!(
            events,
            vec![(
                "done".to_owned(),
                json!({"sessionId": "sess-42", "messageId": mapper.message_id(), "executionMode": "runtime_orchestrator"})
            )]
        );
        uuid::Uuid::parse_str(mapper.message_id()).expect("messageId is a uuid");
    }

    #[test]
    fn execution_complete_carries_usage() {
        let usage = json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30});
        for data in [
            json!({"final_response": "x", "usage": usage}),
            json!({"final_response": {"content": "x", "usage": usage}}),
            json!({"final_response": {"usage": {"total_tokens": 1}}, "usage": usage}),
        ] {
            let mut mapper = StreamMapper::new("s");
            let (mapped, events) = map(&mut mapper, &frame("execution_complete", data));
            assert_eq!(mapped, Mapped::Done);
            assert_eq!(events[0].0, "done");
            assert_eq!(events[0].1["usage"], usage);
            assert_eq!(events[0].1["sessionId"], "s");
            assert_eq!(events[0].1["executionMode"], EXECUTION_MODE);
        }
        // A null usage is left out.
        let mut mapper = StreamMapper::new("s");
        let (_, events) = map(
            &mut mapper,
            &frame("execution_complete", json!({"usage": null})),
        );
        assert!(events[0].1.get("usage").is_none());
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
            mapper.map(f, &mut out);
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
}
