//! The chat request body and the runtime request built from it.
//!
//! Pure: bytes of the client's JSON in, bytes of the runtime's JSON out, or a `BodyError` that the
//! proxy turns into a 400 without contacting any upstream.

use serde::{Deserialize, Serialize};

use crate::core::bridge::{AgentProfile, Conversation, HistoryMessage};
use crate::core::identity::Caller;
use crate::core::routing::ChatRoute;

/// What the web app sends on a chat route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatBody {
    pub message: String,
    #[serde(default)]
    pub parent_message_id: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    NotJson(String),
    MissingMessage,
}

impl BodyError {
    pub fn message(&self) -> String {
        match self {
            BodyError::NotJson(e) => format!("request body is not valid JSON: {e}"),
            BodyError::MissingMessage => {
                "request body must carry a non-empty \"message\" string".into()
            }
        }
    }
}

/// Parse a chat body. Extra fields are allowed (the web app may send more than we use).
pub fn parse_chat_body(bytes: &[u8]) -> Result<ChatBody, BodyError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let message_ok = value
        .get("message")
        .and_then(|m| m.as_str())
        .is_some_and(|m| !m.trim().is_empty());
    if !message_ok {
        return Err(BodyError::MissingMessage);
    }
    // `message` is a string; optional ids of the wrong type are ignored rather than refused.
    let text = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(ChatBody {
        message: text("message").unwrap_or_default(),
        parent_message_id: text("parentMessageId"),
        agent_id: text("agentId"),
    })
}

#[derive(Debug, Serialize)]
struct BareRequest<'a> {
    session_id: &'a str,
    org_id: &'a str,
    user_message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<&'a str>,
    metadata: RuntimeMetadata<'a>,
}

#[derive(Debug, Serialize)]
struct RuntimeMetadata<'a> {
    user_id: Option<&'a str>,
    parent_message_id: Option<&'a str>,
}

/// The session a runtime execution belongs to: the path's, or a new one for `/chat/start`.
pub fn session_id_for(route: &ChatRoute) -> String {
    match route.session_id() {
        Some(id) => id.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    }
}

/// The JSON body POSTed to the runtime's stream path before the bridge: no agent config and no
/// history. [`RuntimeRequest`] is the contract's body; the request path moves to it.
pub fn runtime_request_body(session_id: &str, caller: &Caller, chat: &ChatBody) -> Vec<u8> {
    let req = BareRequest {
        session_id,
        org_id: &caller.org_id,
        user_message: &chat.message,
        agent_id: chat.agent_id.as_deref(),
        metadata: RuntimeMetadata {
            user_id: caller.user_id.as_deref(),
            parent_message_id: chat.parent_message_id.as_deref(),
        },
    };
    serde_json::to_vec(&req).expect("plain strings serialise")
}

/// Temperature when the agent sets none (the legacy API's own default).
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
/// Token limit when the agent sets none (the legacy API's own default).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The runtime's `agent_config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    pub system_prompt: String,
    /// Left out when the agent names none, so the runtime applies its own default model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub temperature: f64,
    pub max_tokens: u64,
}

impl AgentConfig {
    /// The agent's settings, with the legacy API's defaults where it has none.
    pub fn of_agent(agent: &AgentProfile) -> AgentConfig {
        let system_prompt = if agent.system_prompt.trim().is_empty() {
            format!("你是 {}，一个有帮助的 AI 助手。", agent.name)
        } else {
            agent.system_prompt.clone()
        };
        AgentConfig {
            system_prompt,
            model: agent.model.clone(),
            temperature: agent.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            max_tokens: agent.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        }
    }

    /// With the bridge off the proxy knows no agent: no prompt of its own making (the runtime
    /// owns its agents), the defaults otherwise.
    pub fn unknown_agent() -> AgentConfig {
        AgentConfig {
            system_prompt: String::new(),
            model: None,
            temperature: DEFAULT_TEMPERATURE,
            max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

/// The runtime request of CONTRACT.md, fields in its order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeRequest {
    pub session_id: String,
    /// Absent only with the bridge off, no `agentId` in the body and no `default_agent_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub org_id: String,
    pub user_message: String,
    pub history_messages: Vec<HistoryMessage>,
    pub agent_config: AgentConfig,
    pub metadata: RequestMetadata,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestMetadata {
    pub user_id: Option<String>,
    pub parent_message_id: Option<String>,
}

impl RuntimeRequest {
    /// With the bridge on: the agent, its settings, and the conversation as the runtime takes it
    /// (a non-empty `history_messages` is the whole conversation to it, `user_message` ignored):
    /// the saved messages legacy gave, then the current message as the last entry.
    pub fn bridged(
        session_id: &str,
        caller: &Caller,
        chat: &ChatBody,
        conversation: &Conversation,
    ) -> RuntimeRequest {
        RuntimeRequest {
            session_id: session_id.to_string(),
            agent_id: Some(conversation.agent_id.clone()),
            org_id: caller.org_id.clone(),
            user_message: chat.message.clone(),
            history_messages: conversation
                .history
                .iter()
                .cloned()
                .chain(std::iter::once(HistoryMessage {
                    role: "user".into(),
                    content: chat.message.clone(),
                }))
                .collect(),
            agent_config: AgentConfig::of_agent(&conversation.agent),
            metadata: metadata(caller, chat),
        }
    }

    /// With the bridge off: the body's `agentId`, else `default_agent_id` (empty: none); no
    /// history, default settings.
    pub fn standalone(
        session_id: &str,
        caller: &Caller,
        chat: &ChatBody,
        default_agent_id: &str,
    ) -> RuntimeRequest {
        let agent_id = chat
            .agent_id
            .clone()
            .filter(|a| !a.is_empty())
            .or_else(|| Some(default_agent_id.to_string()).filter(|a| !a.is_empty()));
        RuntimeRequest {
            session_id: session_id.to_string(),
            agent_id,
            org_id: caller.org_id.clone(),
            user_message: chat.message.clone(),
            history_messages: Vec::new(),
            agent_config: AgentConfig::unknown_agent(),
            metadata: metadata(caller, chat),
        }
    }

    /// The JSON body, one line.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings and finite numbers serialise")
    }
}

fn metadata(caller: &Caller, chat: &ChatBody) -> RequestMetadata {
    RequestMetadata {
        user_id: caller.user_id.clone(),
        parent_message_id: chat.parent_message_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn caller() -> Caller {
        Caller {
            org_id: "org-a".into(),
            user_id: Some("u1".into()),
        }
    }

    #[test]
    fn session_body_maps_every_field() {
        let chat = parse_chat_body(br#"{"message":"hi","parentMessageId":"m0"}"#).unwrap();
        let body: Value =
            serde_json::from_slice(&runtime_request_body("s1", &caller(), &chat)).unwrap();
        assert_eq!(
            body,
            json!({
                "session_id": "s1",
                "org_id": "org-a",
                "user_message": "hi",
                "metadata": {"user_id": "u1", "parent_message_id": "m0"}
            })
        );
    }

    #[test]
    fn start_body_carries_agent_id() {
        let chat = parse_chat_body(r#"{"agentId":"ag-1","message":"你好"}"#.as_bytes()).unwrap();
        let body: Value =
            serde_json::from_slice(&runtime_request_body("s2", &caller(), &chat)).unwrap();
        assert_eq!(body["agent_id"], "ag-1");
        assert_eq!(body["user_message"], "你好");
        assert_eq!(body["metadata"]["parent_message_id"], Value::Null);
    }

    #[test]
    fn start_route_gets_a_fresh_session() {
        let a = session_id_for(&ChatRoute::Start);
        let b = session_id_for(&ChatRoute::Start);
        assert_ne!(a, b);
        assert_eq!(session_id_for(&ChatRoute::Session("x".into())), "x");
    }

    #[test]
    fn message_is_passed_as_sent_and_optional_ids_are_lenient() {
        let chat = parse_chat_body(
            br#"{"message":"  line1\nline2 \"q\" \u00e9  ","parentMessageId":7,"agentId":null,"x":{}}"#,
        )
        .unwrap();
        assert_eq!(chat.message, "  line1\nline2 \"q\" \u{e9}  ");
        assert_eq!(chat.parent_message_id, None);
        assert_eq!(chat.agent_id, None);
        let body: Value =
            serde_json::from_slice(&runtime_request_body("s", &caller(), &chat)).unwrap();
        assert_eq!(body["user_message"], chat.message.as_str());
        assert!(body.get("agent_id").is_none(), "{body}");
    }

    #[test]
    fn runtime_body_without_a_user_has_null_user_id() {
        let chat = parse_chat_body(br#"{"message":"hi","agentId":"g"}"#).unwrap();
        let anon = Caller {
            org_id: "org-\"q\"".into(),
            user_id: None,
        };
        let bytes = runtime_request_body("s\n1", &anon, &chat);
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            json!({
                "session_id": "s\n1",
                "org_id": "org-\"q\"",
                "user_message": "hi",
                "agent_id": "g",
                "metadata": {"user_id": null, "parent_message_id": null}
            })
        );
        // One line of JSON, whatever the strings hold.
        assert!(!bytes.contains(&b'\n'));
    }

    #[test]
    fn bad_bodies_are_refused() {
        assert!(matches!(
            parse_chat_body(b"not json"),
            Err(BodyError::NotJson(_))
        ));
        for body in [
            &[0xff, 0xfe][..],
            b"",
            b"   ",
            b"{\"message\":\"hi\"",
            b"{\"message\":\"hi\"} trailing",
            b"\xef\xbb\xbf{\"message\":\"hi\"}",
        ] {
            assert!(
                matches!(parse_chat_body(body), Err(BodyError::NotJson(_))),
                "{body:?}"
            );
        }
        for body in [
            r#"{}"#,
            r#"{"message": 5}"#,
            r#"{"message": ""}"#,
            r#"{"message": "  "}"#,
            r#"[1,2]"#,
            r#""message""#,
            r#"null"#,
            r#"{"message": null}"#,
            r#"{"message": ["hi"]}"#,
            r#"{"message": {"text": "hi"}}"#,
            r#"{"Message": "hi"}"#,
        ] {
            assert_eq!(
                parse_chat_body(body.as_bytes()),
                Err(BodyError::MissingMessage),
                "{body}"
            );
        }
    }

    fn conversation() -> Conversation {
        Conversation {
            agent_id: "ag-1".into(),
            agent: AgentProfile {
                name: "Helper".into(),
                system_prompt: "Be brief.".into(),
                model: Some("gpt-4o".into()),
                temperature: Some(0.2),
                max_tokens: Some(1000),
            },
            history: vec![
                HistoryMessage {
                    role: "user".into(),
                    content: "earlier".into(),
                },
                HistoryMessage {
                    role: "assistant".into(),
                    content: "reply".into(),
                },
            ],
            last_message_id: Some("m-2".into()),
        }
    }

    #[test]
    fn bridged_request_is_the_contract_s_in_its_order() {
        let chat = parse_chat_body(br#"{"message":"hi","parentMessageId":"m0"}"#).unwrap();
        let bytes = RuntimeRequest::bridged("s1", &caller(), &chat, &conversation()).to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"session_id":"s1","agent_id":"ag-1","org_id":"org-a","user_message":"hi","#,
                r#""history_messages":[{"role":"user","content":"earlier"},"#,
                r#"{"role":"assistant","content":"reply"},{"role":"user","content":"hi"}],"#,
                r#""agent_config":{"system_prompt":"Be brief.","model":"gpt-4o","#,
                r#""temperature":0.2,"max_tokens":1000},"#,
                r#""metadata":{"user_id":"u1","parent_message_id":"m0"}}"#
            )
        );
    }

    #[test]
    fn the_current_message_ends_the_history_even_in_a_new_session() {
        let mut c = conversation();
        c.history.clear();
        c.last_message_id = None;
        let chat = parse_chat_body(br#"{"message":"first question"}"#).unwrap();
        let r = RuntimeRequest::bridged("s1", &caller(), &chat, &c);
        assert_eq!(
            r.history_messages,
            [HistoryMessage {
                role: "user".into(),
                content: "first question".into()
            }]
        );
        assert_eq!(r.user_message, "first question");
    }

    #[test]
    fn agent_without_settings_gets_legacy_s_defaults() {
        let mut c = conversation();
        c.agent = AgentProfile {
            name: "小助手".into(),
            system_prompt: "  ".into(),
            model: None,
            temperature: None,
            max_tokens: None,
        };
        let chat = parse_chat_body(br#"{"message":"hi"}"#).unwrap();
        let body: Value =
            serde_json::from_slice(&RuntimeRequest::bridged("s1", &caller(), &chat, &c).to_bytes())
                .unwrap();
        assert_eq!(
            body["agent_config"],
            json!({"system_prompt": "你是 小助手，一个有帮助的 AI 助手。",
                   "temperature": 0.7, "max_tokens": 4096})
        );
        assert_eq!(body["metadata"]["parent_message_id"], Value::Null);
    }

    #[test]
    fn standalone_request_takes_the_body_s_agent_then_the_default() {
        let chat = parse_chat_body(br#"{"agentId":"ag-7","message":"hi"}"#).unwrap();
        let body: Value = serde_json::from_slice(
            &RuntimeRequest::standalone("s2", &caller(), &chat, "ag-0").to_bytes(),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "session_id": "s2", "agent_id": "ag-7", "org_id": "org-a", "user_message": "hi",
                "history_messages": [],
                "agent_config": {"system_prompt": "", "temperature": 0.7, "max_tokens": 4096},
                "metadata": {"user_id": "u1", "parent_message_id": null}
            })
        );
        let chat = parse_chat_body(br#"{"message":"hi","agentId":""}"#).unwrap();
        let r = RuntimeRequest::standalone("s", &caller(), &chat, "ag-0");
        assert_eq!(r.agent_id.as_deref(), Some("ag-0"));
        let r = RuntimeRequest::standalone("s", &caller(), &chat, "");
        assert_eq!(r.agent_id, None);
        let body: Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert!(body.get("agent_id").is_none(), "{body}");
    }
}
