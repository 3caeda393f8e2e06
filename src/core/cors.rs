//! CORS on the responses the proxy makes itself (runtime chats, its own refusals and errors, file
//! downloads), with the semantics of the Express `cors` middleware the legacy API uses, so a
//! browser on another origin sees one policy whichever path served it.
//!
//! Only the headers of an actual response are made here: `Access-Control-Allow-Origin` (and
//! `Vary: Origin` when it depends on the request), `-Allow-Credentials`, `-Expose-Headers`.
//! Preflight `OPTIONS` requests are legacy's to answer, as before the proxy.

use serde::Deserialize;

/// `[cors]`: the legacy API's `cors(...)` options, as far as an actual response uses them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Express `origin`: `"*"`, one origin, `true` (reflect the request's), `false` (no CORS
    /// headers), or a list of origins (reflected when listed). Unset: the env var
    /// `origin_env` names, else `"*"` — what `cors({origin: process.env.CORS_ORIGIN ?? '*'})`
    /// does.
    #[serde(default)]
    pub origin: Option<OriginSetting>,
    /// The env var legacy reads its origin from; read when `origin` is unset. `""`: none.
    #[serde(default = "default_origin_env")]
    pub origin_env: String,
    /// Express `credentials: true`: `Access-Control-Allow-Credentials: true`.
    #[serde(default = "default_credentials")]
    pub credentials: bool,
    /// Express `exposedHeaders`: `Access-Control-Expose-Headers` on every response.
    #[serde(default = "default_exposed_headers")]
    pub exposed_headers: Vec<String>,
}

/// The forms Express `cors` takes for `origin`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OriginSetting {
    Flag(bool),
    One(String),
    List(Vec<String>),
}

fn default_origin_env() -> String {
    "CORS_ORIGIN".to_string()
}

fn default_credentials() -> bool {
    true
}

/// The legacy API's own list (its per-user limits set these on chat answers).
fn default_exposed_headers() -> Vec<String> {
    [
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ]
    .map(String::from)
    .to_vec()
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            origin: None,
            origin_env: default_origin_env(),
            credentials: default_credentials(),
            exposed_headers: default_exposed_headers(),
        }
    }
}

/// A `[cors]` key whose value is refused, and why.
pub type Refused = (&'static str, String);

impl CorsConfig {
    pub fn validate(&self) -> Result<(), Refused> {
        match &self.origin {
            Some(OriginSetting::One(o)) if o != "*" => check_origin("cors.origin", o)?,
            Some(OriginSetting::List(list)) => {
                for o in list {
                    check_origin("cors.origin", o)?;
                }
            }
            _ => {}
        }
        if !self.origin_env.is_empty() && !is_env_name(&self.origin_env) {
            return Err((
                "cors.origin_env",
                format!("{:?} is not an environment variable name", self.origin_env),
            ));
        }
        for h in &self.exposed_headers {
            if h.is_empty() || !h.bytes().all(is_token_byte) {
                return Err((
                    "cors.exposed_headers",
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        Ok(())
    }
}

/// An origin as browsers send it: `scheme://host[:port]`, nothing after. A trailing slash or a
/// path never matches a browser's `Origin`, the classic CORS misconfiguration, so it is refused.
fn check_origin(key: &'static str, origin: &str) -> Result<(), Refused> {
    let ok = origin.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' ', ','])
    });
    if ok {
        Ok(())
    } else {
        Err((
            key,
            format!("{origin:?} is not an origin (scheme://host[:port], no path or trailing slash), nor \"*\""),
        ))
    }
}

fn is_env_name(name: &str) -> bool {
    !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Which origin a response allows.
#[derive(Debug, Clone, PartialEq)]
enum Allow {
    Any,
    Fixed(String),
    Reflect,
    Listed(Vec<String>),
    /// `origin = false`: no CORS headers at all.
    Off,
}

/// A `[cors]` section compiled for the hot path.
#[derive(Debug, Clone, PartialEq)]
pub struct CorsPolicy {
    allow: Allow,
    credentials: bool,
    /// The joined `Access-Control-Expose-Headers` value; `None` when empty.
    expose: Option<String>,
}

/// The CORS headers of one response, in the order they are written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CorsHeaders(Vec<(&'static str, Vec<u8>)>);

impl CorsHeaders {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &[u8])> {
        self.0.iter().map(|(n, v)| (*n, v.as_slice()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As header lines of a hand-written response head (`Name: value\r\n` each).
    pub fn lines(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in self.iter() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// The value given to `name`, if any.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

pub const ALLOW_ORIGIN: &str = "access-control-allow-origin";
pub const ALLOW_CREDENTIALS: &str = "access-control-allow-credentials";
pub const EXPOSE_HEADERS: &str = "access-control-expose-headers";
pub const VARY: &str = "vary";

impl CorsPolicy {
    /// `env_origin`: the value of the env var `origin_env` names, when set.
    pub fn new(config: &CorsConfig, env_origin: Option<&str>) -> CorsPolicy {
        let allow = match &config.origin {
            Some(OriginSetting::Flag(true)) => Allow::Reflect,
            Some(OriginSetting::Flag(false)) => Allow::Off,
            Some(OriginSetting::One(o)) => fixed(o),
            Some(OriginSetting::List(list)) => Allow::Listed(list.clone()),
            // `process.env.CORS_ORIGIN ?? '*'`, where an empty value also means `*` to `cors`.
            None => env_origin.map_or(Allow::Any, fixed),
        };
        let expose = config.exposed_headers.join(",");
        CorsPolicy {
            allow,
            credentials: config.credentials,
            expose: (!expose.is_empty()).then_some(expose),
        }
    }

    /// What the policy says, for the startup log.
    pub fn describe(&self) -> String {
        match &self.allow {
            Allow::Any => "*".to_string(),
            Allow::Fixed(o) => o.clone(),
            Allow::Reflect => "reflect the request's Origin".to_string(),
            Allow::Listed(l) => format!("reflect one of {l:?}"),
            Allow::Off => "off".to_string(),
        }
    }

    /// The headers of a response to a request whose `Origin` header is `origin`, as Express
    /// `cors` sets them on an actual (not preflight) response.
    pub fn headers(&self, origin: Option<&[u8]>) -> CorsHeaders {
        let mut h = Vec::with_capacity(4);
        let vary = match &self.allow {
            Allow::Off => return CorsHeaders::default(),
            Allow::Any => {
                h.push((ALLOW_ORIGIN, b"*".to_vec()));
                false
            }
            Allow::Fixed(o) => {
                h.push((ALLOW_ORIGIN, o.as_bytes().to_vec()));
                true
            }
            Allow::Reflect => {
                if let Some(o) = origin.filter(|o| !o.is_empty()) {
                    h.push((ALLOW_ORIGIN, o.to_vec()));
                }
                true
            }
            Allow::Listed(list) => {
                if let Some(o) = origin.filter(|o| list.iter().any(|l| l.as_bytes() == *o)) {
                    h.push((ALLOW_ORIGIN, o.to_vec()));
                }
                true
            }
        };
        if vary {
            h.push((VARY, b"Origin".to_vec()));
        }
        if self.credentials {
            h.push((ALLOW_CREDENTIALS, b"true".to_vec()));
        }
        if let Some(e) = &self.expose {
            h.push((EXPOSE_HEADERS, e.as_bytes().to_vec()));
        }
        CorsHeaders(h)
    }

    /// Whether legacy's answer to a request with this `Origin` carries the CORS headers this
    /// policy would have sent (`get` reads one of legacy's headers): a policy that drifted from
    /// legacy's shows a browser different answers on the two paths.
    pub fn agrees_with<'a>(
        &self,
        origin: Option<&[u8]>,
        get: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> bool {
        let ours = self.headers(origin);
        [ALLOW_ORIGIN, ALLOW_CREDENTIALS, EXPOSE_HEADERS]
            .iter()
            .all(|name| same_value(name, ours.get(name), get(name)))
    }
}

fn same_value(name: &str, ours: Option<&[u8]>, theirs: Option<&[u8]>) -> bool {
    match (ours, theirs) {
        (None, None) => true,
        (Some(a), Some(b)) if name == EXPOSE_HEADERS => list_eq(a, b),
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Header lists compare as sets of case-insensitive names (`a,b` is `b, A`).
fn list_eq(a: &[u8], b: &[u8]) -> bool {
    let names = |v: &[u8]| {
        let mut n: Vec<String> = String::from_utf8_lossy(v)
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        n.sort();
        n
    };
    names(a) == names(b)
}

fn fixed(origin: &str) -> Allow {
    if origin.is_empty() || origin == "*" {
        Allow::Any
    } else {
        Allow::Fixed(origin.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str, env: Option<&str>) -> CorsPolicy {
        let c: CorsConfig = toml::from_str(toml_text).unwrap();
        c.validate().unwrap();
        CorsPolicy::new(&c, env)
    }

    fn pairs(h: &CorsHeaders) -> Vec<(&'static str, String)> {
        h.iter()
            .map(|(n, v)| (n, String::from_utf8(v.to_vec()).unwrap()))
            .collect()
    }

    const EXPOSED: &str = "X-RateLimit-Limit,X-RateLimit-Remaining,X-RateLimit-Reset";

    #[test]
    fn the_default_is_legacy_s_default() {
        let p = policy("", None);
        let h = p.headers(Some(b"http://app.example"));
        assert_eq!(
            pairs(&h),
            vec![
                (ALLOW_ORIGIN, "*".into()),
                (ALLOW_CREDENTIALS, "true".into()),
                (EXPOSE_HEADERS, EXPOSED.into()),
            ]
        );
        assert_eq!(p.headers(None), h, "`*` does not depend on the request");
    }

    #[test]
    fn the_env_var_gives_the_origin_when_the_file_does_not() {
        let p = policy("", Some("https://app.example"));
        let h = p.headers(Some(b"https://other.example"));
        assert_eq!(h.get(ALLOW_ORIGIN), Some(&b"https://app.example"[..]));
        assert_eq!(h.get(VARY), Some(&b"Origin"[..]), "a fixed origin varies");
        assert_eq!(
            policy("", Some("")).headers(None).get(ALLOW_ORIGIN),
            Some(&b"*"[..])
        );
        assert_eq!(policy("", Some("*")).headers(None).get(VARY), None);
        let explicit = policy(
            "origin = \"https://file.example\"",
            Some("https://env.example"),
        );
        assert_eq!(
            explicit.headers(None).get(ALLOW_ORIGIN),
            Some(&b"https://file.example"[..]),
            "the file wins over the env var"
        );
    }

    #[test]
    fn true_reflects_the_request_origin_and_varies() {
        let p = policy(
            "origin = true\ncredentials = false\nexposed_headers = []",
            None,
        );
        assert_eq!(
            pairs(&p.headers(Some(b"http://127.0.0.1:5173"))),
            vec![
                (ALLOW_ORIGIN, "http://127.0.0.1:5173".into()),
                (VARY, "Origin".into())
            ]
        );
        assert_eq!(
            pairs(&p.headers(None)),
            vec![(VARY, "Origin".into())],
            "no Origin: nothing to reflect, as Express sends it"
        );
    }

    #[test]
    fn a_list_reflects_only_listed_origins() {
        let p = policy(
            "origin = [\"https://a.example\", \"https://b.example:8443\"]",
            None,
        );
        let h = p.headers(Some(b"https://b.example:8443"));
        assert_eq!(h.get(ALLOW_ORIGIN), Some(&b"https://b.example:8443"[..]));
        let h = p.headers(Some(b"https://evil.example"));
        assert_eq!(h.get(ALLOW_ORIGIN), None);
        assert_eq!(h.get(VARY), Some(&b"Origin"[..]));
        assert_eq!(h.get(ALLOW_CREDENTIALS), Some(&b"true"[..]));
    }

    #[test]
    fn headers_render_as_head_lines() {
        let p = policy("origin = true\nexposed_headers = []", None);
        assert_eq!(
            p.headers(Some(b"http://a.example")).lines(),
            b"access-control-allow-origin: http://a.example\r\nvary: Origin\r\naccess-control-allow-credentials: true\r\n"
        );
    }

    #[test]
    fn false_turns_cors_off() {
        let p = policy("origin = false", Some("https://app.example"));
        assert!(p.headers(Some(b"https://app.example")).is_empty());
    }

    #[test]
    fn origins_are_checked() {
        for bad in [
            "origin = \"https://app.example/\"",
            "origin = \"app.example\"",
            "origin = [\"https://a.example/path\"]",
            "origin = \"https://a.example, https://b.example\"",
            "origin_env = \"1X\"",
            "exposed_headers = [\"X Bad\"]",
        ] {
            let c: CorsConfig = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        for good in [
            "origin = \"*\"",
            "origin = \"http://localhost:3000\"",
            "origin = [\"https://a.example\"]",
            "origin = true",
        ] {
            let c: CorsConfig = toml::from_str(good).unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn drift_from_legacy_is_noticed() {
        let p = policy("", None);
        let legacy_same = |n: &str| match n {
            ALLOW_ORIGIN => Some(&b"*"[..]),
            ALLOW_CREDENTIALS => Some(&b"true"[..]),
            EXPOSE_HEADERS => {
                Some(&b"x-ratelimit-reset, X-RateLimit-Limit,X-RateLimit-Remaining"[..])
            }
            _ => None,
        };
        assert!(p.agrees_with(Some(b"http://a"), legacy_same));
        let legacy_fixed = |n: &str| match n {
            ALLOW_ORIGIN => Some(&b"https://app.example"[..]),
            other => legacy_same(other),
        };
        assert!(!p.agrees_with(Some(b"http://a"), legacy_fixed));
        assert!(!p.agrees_with(Some(b"http://a"), |_| None));
    }
}
