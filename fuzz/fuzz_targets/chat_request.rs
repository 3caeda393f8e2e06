//! What a client controls on a chat request, before any upstream is involved: the path (chat
//! route classification and session id decoding), the JSON body, and the bearer token.
//!
//! Input: `[selector, rest...]`; the selector picks which part `rest` is. Checked, besides
//! "no panic": an accepted body yields runtime JSON carrying its message unchanged; an accepted
//! session id is printable; a token never verifies against a secret it was not made with.

#![no_main]

use cutover_proxy::core::chat::{parse_chat_body, runtime_request_body, session_id_for};
use cutover_proxy::core::config::IdentityConfig;
use cutover_proxy::core::identity::{Caller, Verifier};
use cutover_proxy::core::routing::{chat_route, ChatRoute};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let Ok(body) = parse_chat_body(rest) else {
                return;
            };
            assert!(!body.message.trim().is_empty());
            let caller = Caller {
                org_id: "org-\"x\u{0}".into(),
                user_id: Some("u\n1".into()),
            };
            let out = runtime_request_body("s-1", &caller, &body);
            let v: Value = serde_json::from_slice(&out).expect("runtime body is JSON");
            assert_eq!(v["user_message"], body.message.as_str());
            assert_eq!(v["org_id"], caller.org_id.as_str());
            assert_eq!(v["session_id"], "s-1");
        }
        1 => {
            let path = String::from_utf8_lossy(rest);
            for method in [http::Method::POST, http::Method::GET] {
                match chat_route(&method, &path) {
                    Some(ChatRoute::Session(id)) => {
                        assert_eq!(method, http::Method::POST);
                        assert!(!id.trim().is_empty());
                        assert!(!id.chars().any(char::is_control), "{id:?}");
                        assert_eq!(session_id_for(&ChatRoute::Session(id.clone())), id);
                    }
                    Some(ChatRoute::Start) => assert_eq!(method, http::Method::POST),
                    None => {}
                }
            }
        }
        _ => {
            let token = String::from_utf8_lossy(rest);
            let config = IdentityConfig {
                issuer: Some("chat-api".into()),
                ..IdentityConfig::default()
            };
            let verifier = Verifier::new(&config, Some("fuzz-secret-never-used-to-sign"));
            assert!(verifier.verify(&token).is_err(), "a fuzzed token verified");
            let mut headers = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_bytes(rest) {
                headers.insert(http::header::AUTHORIZATION, v);
                assert!(verifier.identify(&headers).is_err());
            }
        }
    }
});
