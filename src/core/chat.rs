//! The chat request body and the runtime request built from it.
//!
//! Pure: bytes of the client's JSON in, bytes of the runtime's JSON out, or a `BodyError` that the
//! proxy turns into a 400 without contacting any upstream.

use serde::{Deserialize, Serialize};

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
struct RuntimeRequest<'a> {
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

/// The JSON body POSTed to the runtime's stream path.
pub fn runtime_request_body(session_id: &str, caller: &Caller, chat: &ChatBody) -> Vec<u8> {
    let req = RuntimeRequest {
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
}
