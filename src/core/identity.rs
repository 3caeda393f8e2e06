//! Who is calling: the org and user of a chat request, from a verified HS256 JWT.
//!
//! A request whose org cannot be verified gets `Identity::Unverified` and is never sent to the
//! runtime. Client-supplied org headers are trusted only when the config names the header an
//! ingress sets.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::core::config::IdentityConfig;

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub org_id: String,
    pub user_id: Option<String>,
}

/// Why a request has no verified org; bounded so it can label metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    /// No `Authorization: Bearer` header.
    Missing,
    /// The proxy has no secret to verify with (the env var is unset or empty).
    NoSecret,
    /// Bad signature, wrong algorithm, malformed token, wrong issuer or audience.
    Invalid,
    Expired,
    /// A valid token without the org claim.
    NoOrgClaim,
    /// The trusted ingress header and a verified token name different orgs: neither can be
    /// believed over the other, so the request is not served as either.
    Conflict,
}

impl Unverified {
    pub fn as_str(self) -> &'static str {
        match self {
            Unverified::Missing => "missing",
            Unverified::NoSecret => "no_secret",
            Unverified::Invalid => "invalid",
            Unverified::Expired => "expired",
            Unverified::NoOrgClaim => "no_org_claim",
            Unverified::Conflict => "conflict",
        }
    }
}

/// Verifies tokens with one secret and one validation policy; built once per config.
pub struct Verifier {
    key: Option<DecodingKey>,
    validation: Validation,
    org_claim: String,
    user_claim: String,
    trusted_org_header: Option<http::HeaderName>,
    /// `identity.token_cookie`; `None` when off.
    token_cookie: Option<String>,
}

impl Verifier {
    /// `secret` is the value of the env var the config names (`None` when unset).
    pub fn new(config: &IdentityConfig, secret: Option<&str>) -> Verifier {
        // Only HS256 is accepted: `alg: none` and RS/HS confusion are refused by construction.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_secs;
        validation.validate_nbf = true;
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
        }
        match &config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        // jsonwebtoken checks `iss`/`aud` only when the token carries them: a configured issuer
        // or audience must also be present, or a token that simply omits it would pass.
        let mut required = vec!["exp"];
        if config.issuer.is_some() {
            required.push("iss");
        }
        if config.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Verifier {
            key: secret
                .filter(|s| !s.is_empty())
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            validation,
            org_claim: config.org_claim.clone(),
            user_claim: config.user_claim.clone(),
            trusted_org_header: config
                .trusted_org_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            token_cookie: Some(config.token_cookie.clone()).filter(|c| !c.is_empty()),
        }
    }

    /// Reads the secret from the environment variable named in the config.
    pub fn from_env(config: &IdentityConfig) -> Verifier {
        let secret = std::env::var(&config.jwt_secret_env).ok();
        Verifier::new(config, secret.as_deref())
    }

    pub fn has_secret(&self) -> bool {
        self.key.is_some()
    }

    pub fn trusted_org_header(&self) -> Option<&http::HeaderName> {
        self.trusted_org_header.as_ref()
    }

    /// Identify the caller of a request from its headers.
    ///
    /// With a trusted ingress header configured, its value names the org (the user still comes
    /// from a valid token, if any). The header is believed only when it occurs exactly once with
    /// a non-empty value: several copies mean a client copy survived next to the ingress's and
    /// nothing tells them apart, so the JWT decides as if the header were absent. A verified token
    /// of another org is a conflict: one of the two speaks for an org the caller is not, and
    /// taking the header's org with the token's user would mix two tenants in one request.
    pub fn identify(&self, headers: &http::HeaderMap) -> Result<Caller, Unverified> {
        if let Some(name) = &self.trusted_org_header {
            let mut values = headers.get_all(name).iter();
            let single = match (values.next(), values.next()) {
                (Some(v), None) => Some(v),
                _ => None,
            };
            if let Some(org) = single
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
            {
                let token = self.verify_bearer(headers).ok();
                if token.as_ref().is_some_and(|t| t.org_id != org) {
                    return Err(Unverified::Conflict);
                }
                return Ok(Caller {
                    org_id: org.to_string(),
                    user_id: token.and_then(|t| t.user_id),
                });
            }
        }
        self.verify_bearer(headers)
    }

    /// The caller named by the request's bearer token alone, whatever the ingress header says.
    pub fn verify_bearer(&self, headers: &http::HeaderMap) -> Result<Caller, Unverified> {
        let token = bearer_token(headers).ok_or(Unverified::Missing)?;
        self.verify(token)
    }

    /// The caller of a plain browser link (the runtime files route): the bearer token when the
    /// request has an `Authorization` header, else the token in the `identity.token_cookie`
    /// cookie, verified the same way. The header wins: a request that brings one is judged by it
    /// alone, so a bad header is not rescued by a cookie, and the two can never name two callers.
    pub fn verify_link(&self, headers: &http::HeaderMap) -> Result<Caller, Unverified> {
        if headers.contains_key(http::header::AUTHORIZATION) {
            return self.verify_bearer(headers);
        }
        let name = self.token_cookie.as_deref().ok_or(Unverified::Missing)?;
        let token = cookie(headers, name).ok_or(Unverified::Missing)?;
        self.verify(token)
    }

    /// Verify one compact JWT.
    pub fn verify(&self, token: &str) -> Result<Caller, Unverified> {
        let key = self.key.as_ref().ok_or(Unverified::NoSecret)?;
        let data =
            decode::<Map<String, Value>>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => Unverified::Expired,
                    _ => Unverified::Invalid,
                }
            })?;
        let claims = data.claims;
        let org_id = claim_string(&claims, &self.org_claim).ok_or(Unverified::NoOrgClaim)?;
        let user_id = claim_string(&claims, &self.user_claim);
        Ok(Caller { org_id, user_id })
    }
}

/// A claim as a non-empty string; numeric ids are accepted and rendered as text.
fn claim_string(claims: &Map<String, Value>, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The first non-empty value of cookie `name` across the request's `Cookie` headers (RFC 6265:
/// `a=1; b=2`, a value possibly in double quotes).
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
        .find(|v| !v.is_empty())
}

fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "test-secret";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::new(&IdentityConfig::default(), Some(SECRET))
    }

    fn headers(auth: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", auth.parse().unwrap());
        h
    }

    #[test]
    fn valid_token_yields_org_and_user() {
        let t = token(
            json!({"orgId": "org-a", "userId": "u1", "exp": now() + 60}),
            SECRET,
        );
        let c = verifier()
            .identify(&headers(&format!("Bearer {t}")))
            .unwrap();
        assert_eq!(c.org_id, "org-a");
        assert_eq!(c.user_id.as_deref(), Some("u1"));
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let t = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        let c = verifier()
            .identify(&headers(&format!("bearer {t}")))
            .unwrap();
        assert_eq!(c.org_id, "org-a");
        assert_eq!(c.user_id, None);
    }

    #[test]
    fn wrong_signature_is_invalid() {
        let t = token(json!({"orgId": "org-a", "exp": now() + 60}), "other");
        assert_eq!(verifier().verify(&t), Err(Unverified::Invalid));
    }

    #[test]
    fn expired_token_is_refused_without_leeway() {
        let t = token(json!({"orgId": "org-a", "exp": now() - 5}), SECRET);
        assert_eq!(verifier().verify(&t), Err(Unverified::Expired));
    }

    #[test]
    fn leeway_is_configurable() {
        let cfg = IdentityConfig {
            leeway_secs: 120,
            ..IdentityConfig::default()
        };
        let v = Verifier::new(&cfg, Some(SECRET));
        let t = token(json!({"orgId": "org-a", "exp": now() - 5}), SECRET);
        assert_eq!(v.verify(&t).unwrap().org_id, "org-a");
    }

    #[test]
    fn token_without_exp_is_refused() {
        let t = token(json!({"orgId": "org-a"}), SECRET);
        assert_eq!(verifier().verify(&t), Err(Unverified::Invalid));
    }

    #[test]
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, payload {"orgId":"org-a","exp":9999999999}
        let t =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJvcmdJZCI6Im9yZy1hIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(verifier().verify(t), Err(Unverified::Invalid));
    }

    #[test]
    fn other_hmac_algorithms_are_refused() {
        let t = encode(
            &Header::new(Algorithm::HS512),
            &json!({"orgId": "org-a", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(verifier().verify(&t), Err(Unverified::Invalid));
    }

    #[test]
    fn garbage_and_truncated_tokens_are_invalid() {
        let good = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        for bad in ["garbage", "a.b.c", "", &good[..good.len() - 5]] {
            assert!(verifier().verify(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_header_and_other_schemes_are_missing() {
        assert_eq!(
            verifier().identify(&http::HeaderMap::new()),
            Err(Unverified::Missing)
        );
        assert_eq!(
            verifier().identify(&headers("Basic dXNlcjpwYXNz")),
            Err(Unverified::Missing)
        );
    }

    #[test]
    fn missing_org_claim_is_reported() {
        let t = token(json!({"userId": "u1", "exp": now() + 60}), SECRET);
        assert_eq!(verifier().verify(&t), Err(Unverified::NoOrgClaim));
    }

    #[test]
    fn no_secret_verifies_nothing() {
        let v = Verifier::new(&IdentityConfig::default(), None);
        let t = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        assert_eq!(v.verify(&t), Err(Unverified::NoSecret));
        let v = Verifier::new(&IdentityConfig::default(), Some(""));
        assert!(!v.has_secret());
    }

    #[test]
    fn client_org_header_is_ignored_by_default() {
        let mut h = http::HeaderMap::new();
        h.insert("x-org-id", "org-a".parse().unwrap());
        assert_eq!(verifier().identify(&h), Err(Unverified::Missing));
    }

    #[test]
    fn trusted_header_is_used_when_configured() {
        let cfg = IdentityConfig {
            trusted_org_header: Some("x-org-id".into()),
            ..IdentityConfig::default()
        };
        let v = Verifier::new(&cfg, Some(SECRET));
        let mut h = http::HeaderMap::new();
        h.insert("x-org-id", "org-b".parse().unwrap());
        assert_eq!(v.identify(&h).unwrap().org_id, "org-b");
    }

    fn trusting() -> Verifier {
        let cfg = IdentityConfig {
            trusted_org_header: Some("x-org-id".into()),
            ..IdentityConfig::default()
        };
        Verifier::new(&cfg, Some(SECRET))
    }

    #[test]
    fn trusted_header_takes_the_user_from_a_valid_token_only() {
        let good = token(
            json!({"orgId": "org-b", "userId": "u1", "exp": now() + 60}),
            SECRET,
        );
        let forged = token(
            json!({"orgId": "org-x", "userId": "u1", "exp": now() + 60}),
            "other",
        );
        let mut h = headers(&format!("Bearer {good}"));
        h.insert("x-org-id", "org-b".parse().unwrap());
        assert_eq!(
            trusting().identify(&h).unwrap(),
            Caller {
                org_id: "org-b".into(),
                user_id: Some("u1".into())
            }
        );
        let mut h = headers(&format!("Bearer {forged}"));
        h.insert("x-org-id", "org-b".parse().unwrap());
        assert_eq!(trusting().identify(&h).unwrap().user_id, None);
    }

    #[test]
    fn a_verified_token_of_another_org_conflicts_with_the_trusted_header() {
        let other = token(
            json!({"orgId": "org-b", "userId": "u1", "exp": now() + 60}),
            SECRET,
        );
        let mut h = headers(&format!("Bearer {other}"));
        h.insert("x-org-id", "org-a".parse().unwrap());
        assert_eq!(trusting().identify(&h), Err(Unverified::Conflict));
        // The token alone still names its own org, for routes that need a token.
        assert_eq!(trusting().verify_bearer(&h).unwrap().org_id, "org-b");
        // Only a verified token can conflict: an expired or forged one is no claim at all.
        for unverified in [
            token(json!({"orgId": "org-b", "exp": now() - 120}), SECRET),
            token(json!({"orgId": "org-b", "exp": now() + 60}), "other"),
        ] {
            let mut h = headers(&format!("Bearer {unverified}"));
            h.insert("x-org-id", "org-a".parse().unwrap());
            let caller = trusting().identify(&h).unwrap();
            assert_eq!((caller.org_id.as_str(), caller.user_id), ("org-a", None));
        }
        // Without a trusted header configured, the token decides and nothing conflicts.
        let mut h = headers(&format!("Bearer {other}"));
        h.insert("x-org-id", "org-a".parse().unwrap());
        assert_eq!(verifier().identify(&h).unwrap().org_id, "org-b");
        // A repeated header is not believed, so the token is not contradicted by it.
        h.append("x-org-id", "org-c".parse().unwrap());
        assert_eq!(trusting().identify(&h).unwrap().org_id, "org-b");
        assert_eq!(Unverified::Conflict.as_str(), "conflict");
    }

    #[test]
    fn repeated_or_empty_trusted_header_falls_back_to_the_token() {
        let mut h = http::HeaderMap::new();
        h.append("x-org-id", "org-a".parse().unwrap());
        h.append("x-org-id", "org-b".parse().unwrap());
        assert_eq!(trusting().identify(&h), Err(Unverified::Missing));
        let t = token(json!({"orgId": "org-c", "exp": now() + 60}), SECRET);
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        assert_eq!(trusting().identify(&h).unwrap().org_id, "org-c");

        let mut h = http::HeaderMap::new();
        h.insert("x-org-id", " ".parse().unwrap());
        assert_eq!(trusting().identify(&h), Err(Unverified::Missing));
        // A value that is not visible ASCII is not an org either.
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-org-id",
            http::HeaderValue::from_bytes(b"org-\xff").unwrap(),
        );
        assert_eq!(trusting().identify(&h), Err(Unverified::Missing));
    }

    #[test]
    fn bearer_token_is_trimmed_and_needs_a_value() {
        let t = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        assert_eq!(
            verifier()
                .identify(&headers(&format!("  Bearer   {t}  ")))
                .unwrap()
                .org_id,
            "org-a"
        );
        assert_eq!(
            verifier().identify(&headers("Bearer")),
            Err(Unverified::Missing)
        );
        assert_eq!(
            verifier().identify(&headers("Bearer    ")),
            Err(Unverified::Missing)
        );
        assert_eq!(
            verifier().identify(&headers(&format!("Token {t}"))),
            Err(Unverified::Missing)
        );
    }

    #[test]
    fn not_yet_valid_token_is_refused() {
        let t = token(
            json!({"orgId": "org-a", "exp": now() + 600, "nbf": now() + 300}),
            SECRET,
        );
        assert_eq!(verifier().verify(&t), Err(Unverified::Invalid));
    }

    #[test]
    fn non_string_org_claims_are_missing() {
        for org in [
            json!(null),
            json!(true),
            json!(["org-a"]),
            json!({"id": "org-a"}),
            json!("  "),
        ] {
            let t = token(json!({"orgId": org, "exp": now() + 60}), SECRET);
            assert_eq!(verifier().verify(&t), Err(Unverified::NoOrgClaim), "{org}");
        }
    }

    #[test]
    fn org_claim_name_is_configurable() {
        let cfg = IdentityConfig {
            org_claim: "tenant".into(),
            user_claim: "sub".into(),
            ..IdentityConfig::default()
        };
        let v = Verifier::new(&cfg, Some(SECRET));
        let t = token(
            json!({"tenant": "t-1", "sub": "u-9", "orgId": "ignored", "exp": now() + 60}),
            SECRET,
        );
        assert_eq!(
            v.verify(&t).unwrap(),
            Caller {
                org_id: "t-1".into(),
                user_id: Some("u-9".into())
            }
        );
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let cfg = IdentityConfig {
            issuer: Some("chat-api".into()),
            audience: Some("chat".into()),
            ..IdentityConfig::default()
        };
        let v = Verifier::new(&cfg, Some(SECRET));
        let ok = token(
            json!({"orgId": "o", "exp": now() + 60, "iss": "chat-api", "aud": "chat"}),
            SECRET,
        );
        assert!(v.verify(&ok).is_ok());
        let no_iss = token(
            json!({"orgId": "o", "exp": now() + 60, "aud": "chat"}),
            SECRET,
        );
        assert_eq!(v.verify(&no_iss), Err(Unverified::Invalid));
        let no_aud = token(
            json!({"orgId": "o", "exp": now() + 60, "iss": "chat-api"}),
            SECRET,
        );
        assert_eq!(v.verify(&no_aud), Err(Unverified::Invalid));
        let wrong_iss = token(
            json!({"orgId": "o", "exp": now() + 60, "iss": "evil", "aud": "chat"}),
            SECRET,
        );
        assert_eq!(v.verify(&wrong_iss), Err(Unverified::Invalid));
    }

    #[test]
    fn numeric_org_claim_is_accepted() {
        let t = token(json!({"orgId": 42, "exp": now() + 60}), SECRET);
        assert_eq!(verifier().verify(&t).unwrap().org_id, "42");
    }

    fn with_cookie(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, value.parse().unwrap());
        h
    }

    #[test]
    fn a_link_is_verified_from_the_token_cookie_like_a_header() {
        let good = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        let v = verifier();
        let h = with_cookie(&format!("theme=dark; auth_token={good}; lang=zh"));
        assert_eq!(v.verify_link(&h).unwrap().org_id, "org-a");
        let quoted = with_cookie(&format!("auth_token=\"{good}\""));
        assert_eq!(v.verify_link(&quoted).unwrap().org_id, "org-a");
        let forged = token(json!({"orgId": "org-a", "exp": now() + 60}), "other");
        assert_eq!(
            v.verify_link(&with_cookie(&format!("auth_token={forged}"))),
            Err(Unverified::Invalid)
        );
        let expired = token(json!({"orgId": "org-a", "exp": now() - 5}), SECRET);
        assert_eq!(
            v.verify_link(&with_cookie(&format!("auth_token={expired}"))),
            Err(Unverified::Expired)
        );
        assert_eq!(
            v.verify_link(&with_cookie(&format!("other_token={good}"))),
            Err(Unverified::Missing),
            "only the configured cookie"
        );
        assert_eq!(
            v.verify_bearer(&h),
            Err(Unverified::Missing),
            "chat routes read the header alone"
        );
    }

    #[test]
    fn the_header_wins_over_the_cookie() {
        let a = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        let b = token(json!({"orgId": "org-b", "exp": now() + 60}), SECRET);
        let mut h = with_cookie(&format!("auth_token={a}"));
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {b}").parse().unwrap(),
        );
        assert_eq!(verifier().verify_link(&h).unwrap().org_id, "org-b");
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer forged".parse().unwrap(),
        );
        assert_eq!(
            verifier().verify_link(&h),
            Err(Unverified::Invalid),
            "a bad header is not rescued by a good cookie"
        );
    }

    #[test]
    fn the_cookie_can_be_turned_off() {
        let good = token(json!({"orgId": "org-a", "exp": now() + 60}), SECRET);
        let cfg = IdentityConfig {
            token_cookie: String::new(),
            ..IdentityConfig::default()
        };
        let v = Verifier::new(&cfg, Some(SECRET));
        assert_eq!(
            v.verify_link(&with_cookie(&format!("auth_token={good}"))),
            Err(Unverified::Missing)
        );
    }
}
