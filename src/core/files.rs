//! Signed links to the files a runtime creates.
//!
//! A runtime's `file_created` URL points into the runtime, which browsers cannot reach. The
//! client gets `/api/v1/runtime/files/{file_id}?exp=…&src=…&sig=…` instead: the runtime's own URL
//! travels in `src`, and `sig` is an HMAC-SHA256 over the org, the file id, `src` and the expiry,
//! so any replica holding the same key can check a link and serve it with no shared state.

use std::fmt;

use ring::hmac;

/// The proxy's route for runtime files; the file id follows, percent-encoded.
pub const ROUTE_PREFIX: &str = "/api/v1/runtime/files/";

/// What the key is derived with when no explicit secret is configured: a link key that differs
/// from the JWT secret itself, so a leaked link signature says nothing about tokens.
const DERIVATION_LABEL: &[u8] = b"cutover-file-url";
/// Bumped if the signed message ever changes, so old links fail instead of verifying wrongly.
const VERSION: &[u8] = b"cutover-file-url/v1";

/// The HMAC key links are signed with. Shared, not copied: every runtime stream's mapper holds
/// one (a few hundred bytes of HMAC state each, for as long as a stream is held).
#[derive(Clone)]
pub struct FileKey(std::sync::Arc<hmac::Key>);

impl FileKey {
    /// A key from an explicit secret (the env var `runtime.file_url_secret_env` names).
    pub fn new(secret: &[u8]) -> Self {
        FileKey(std::sync::Arc::new(hmac::Key::new(
            hmac::HMAC_SHA256,
            secret,
        )))
    }

    /// The key used when no explicit secret is set: HMAC(jwt_secret, "cutover-file-url").
    pub fn derived_from_jwt_secret(jwt_secret: &[u8]) -> Self {
        let jwt = hmac::Key::new(hmac::HMAC_SHA256, jwt_secret);
        FileKey::new(hmac::sign(&jwt, DERIVATION_LABEL).as_ref())
    }

    /// The explicit secret when there is a non-empty one, else the key derived from the JWT secret.
    pub fn resolve(explicit: Option<&str>, jwt_secret: &[u8]) -> Self {
        match explicit {
            Some(secret) if !secret.is_empty() => FileKey::new(secret.as_bytes()),
            _ => FileKey::derived_from_jwt_secret(jwt_secret),
        }
    }

    fn tag(&self, org: &str, file_id: &str, runtime_url: &str, expires_unix: u64) -> hmac::Tag {
        hmac::sign(&self.0, &message(org, file_id, runtime_url, expires_unix))
    }
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKey(..)")
    }
}

/// Why a link is refused; the route answers 404 to all of them alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing, repeated or undecodable `exp`, `src` or `sig`, or an unknown parameter.
    Malformed,
    /// The signature does not match this org, file id, source and expiry under this key.
    BadSignature,
    /// The link's expiry has passed.
    Expired,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Malformed => "malformed file link",
            Refusal::BadSignature => "file link signature does not match",
            Refusal::Expired => "file link expired",
        })
    }
}

impl std::error::Error for Refusal {}

/// The query string (without `?`) of a link to `file_id` for `org`, valid until `expires_unix`.
pub fn sign(
    key: &FileKey,
    org: &str,
    file_id: &str,
    runtime_url: &str,
    expires_unix: u64,
) -> String {
    let tag = key.tag(org, file_id, runtime_url, expires_unix);
    let mut query = format!("exp={expires_unix}&src=");
    percent_encode(&mut query, runtime_url);
    query.push_str("&sig=");
    for b in tag.as_ref() {
        query.push(HEX[usize::from(b >> 4)] as char);
        query.push(HEX[usize::from(b & 0xf)] as char);
    }
    query
}

/// Check a link's query for `org` and `file_id` (as decoded from the path) at `now_unix`; on
/// success, the runtime's own URL or path to fetch the file from.
pub fn verify(
    key: &FileKey,
    org: &str,
    file_id: &str,
    query: &str,
    now_unix: u64,
) -> Result<String, Refusal> {
    let (mut exp, mut src, mut sig) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').ok_or(Refusal::Malformed)?;
        let slot = match name {
            "exp" => &mut exp,
            "src" => &mut src,
            "sig" => &mut sig,
            _ => return Err(Refusal::Malformed),
        };
        if slot.replace(value).is_some() {
            return Err(Refusal::Malformed);
        }
    }
    let (Some(exp), Some(src), Some(sig)) = (exp, src, sig) else {
        return Err(Refusal::Malformed);
    };
    // Only canonical decimal, so one expiry has one spelling.
    if exp.is_empty() || exp.len() > 20 || !exp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::Malformed);
    }
    if exp.len() > 1 && exp.starts_with('0') {
        return Err(Refusal::Malformed);
    }
    let expires_unix: u64 = exp.parse().map_err(|_| Refusal::Malformed)?;
    let runtime_url = percent_decode(src).ok_or(Refusal::Malformed)?;
    let sig = hex_decode(sig).ok_or(Refusal::Malformed)?;
    hmac::verify(
        &key.0,
        &message(org, file_id, &runtime_url, expires_unix),
        &sig,
    )
    .map_err(|_| Refusal::BadSignature)?;
    if now_unix >= expires_unix {
        return Err(Refusal::Expired);
    }
    Ok(runtime_url)
}

/// Signs the file links of one stream: the org whose stream it is, and how long links live.
#[derive(Debug, Clone)]
pub struct FileSigner {
    pub key: FileKey,
    pub org: String,
    pub ttl_secs: u64,
}

impl FileSigner {
    /// The client's link: `/api/v1/runtime/files/{file_id}?{signed query}`.
    pub fn url(&self, file_id: &str, runtime_url: &str, now_unix: u64) -> String {
        let mut url = path(file_id);
        url.push('?');
        url.push_str(&sign(
            &self.key,
            &self.org,
            file_id,
            runtime_url,
            now_unix.saturating_add(self.ttl_secs),
        ));
        url
    }
}

/// `/api/v1/runtime/files/{file_id}` with the id percent-encoded, so no id leaves its segment.
pub fn path(file_id: &str) -> String {
    let mut path = String::with_capacity(ROUTE_PREFIX.len() + file_id.len());
    path.push_str(ROUTE_PREFIX);
    percent_encode(&mut path, file_id);
    path
}

/// What to ask the runtime for a link's `src`: the path and query only, made a valid request
/// target. The host in an absolute URL is never used: the download goes to the configured runtime
/// address whatever a link says. `None` when there is no path to ask for.
pub fn runtime_target(src: &str) -> Option<String> {
    let lower = src.get(..8).unwrap_or(src).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &src[7..]
    } else if lower.starts_with("https://") {
        &src[8..]
    } else if src.starts_with('/') && !src.starts_with("//") {
        src
    } else {
        return None;
    };
    let path = match rest.find(['/', '?']) {
        _ if rest.starts_with('/') => rest,
        Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
        Some(i) => return Some(format!("/{}", encode_target(&rest[i..]))),
        None => "/",
    };
    let path = path.split('#').next().unwrap_or_default();
    Some(encode_target(path))
}

/// Bytes that cannot stand in a request line (controls, spaces, non-ASCII) as `%XX`; the rest,
/// escapes included, as they are.
fn encode_target(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x21..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)].to_ascii_uppercase() as char);
            out.push(HEX[usize::from(b & 0xf)].to_ascii_uppercase() as char);
        }
    }
    out
}

/// Length-prefixed fields: no two different (org, id, src, exp) share a message.
fn message(org: &str, file_id: &str, runtime_url: &str, expires_unix: u64) -> Vec<u8> {
    let mut msg =
        Vec::with_capacity(VERSION.len() + org.len() + file_id.len() + runtime_url.len() + 40);
    msg.extend_from_slice(VERSION);
    for field in [org.as_bytes(), file_id.as_bytes(), runtime_url.as_bytes()] {
        msg.extend_from_slice(&(field.len() as u64).to_be_bytes());
        msg.extend_from_slice(field);
    }
    msg.extend_from_slice(&expires_unix.to_be_bytes());
    msg
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Everything but RFC 3986 unreserved characters as `%XX`.
fn percent_encode(out: &mut String, s: &str) {
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)].to_ascii_uppercase() as char);
            out.push(HEX[usize::from(b & 0xf)].to_ascii_uppercase() as char);
        }
    }
}

/// Undoes the percent-encoding of links (`%XX` or `%xx`); `None` for a broken escape or non-UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex_digit(*bytes.get(i + 1)?)?;
            let lo = hex_digit(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_770_000_000;
    const SRC: &str = "http://runtime:8000/api/v1/files/f-1/download?name=报告 v2.pdf&x=1";

    fn key() -> FileKey {
        FileKey::new(b"file-link-secret")
    }

    fn query() -> String {
        sign(&key(), "org-a", "f-1", SRC, NOW + 3600)
    }

    #[test]
    fn the_owning_org_gets_the_runtime_url_back() {
        assert_eq!(
            verify(&key(), "org-a", "f-1", &query(), NOW),
            Ok(SRC.to_owned())
        );
        // Up to the last second before expiry.
        assert_eq!(
            verify(&key(), "org-a", "f-1", &query(), NOW + 3599),
            Ok(SRC.to_owned())
        );
    }

    #[test]
    fn another_instance_with_the_same_key_accepts_it() {
        let elsewhere = FileKey::new(b"file-link-secret");
        assert_eq!(
            verify(&elsewhere, "org-a", "f-1", &query(), NOW),
            Ok(SRC.to_owned())
        );
        let derived = sign(
            &FileKey::derived_from_jwt_secret(b"jwt"),
            "o",
            "f",
            "/x",
            NOW + 1,
        );
        assert_eq!(
            verify(&FileKey::resolve(None, b"jwt"), "o", "f", &derived, NOW),
            Ok("/x".to_owned())
        );
        assert_eq!(
            verify(&FileKey::resolve(Some(""), b"jwt"), "o", "f", &derived, NOW),
            Ok("/x".to_owned())
        );
    }

    #[test]
    fn another_org_or_file_is_refused() {
        assert_eq!(
            verify(&key(), "org-b", "f-1", &query(), NOW),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(&key(), "org-a", "f-2", &query(), NOW),
            Err(Refusal::BadSignature)
        );
        // Field boundaries are part of the message: moving a character between org and id fails.
        let q = sign(&key(), "ab", "c", "/x", NOW + 10);
        assert_eq!(
            verify(&key(), "a", "bc", &q, NOW),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn expired_is_refused() {
        assert_eq!(
            verify(&key(), "org-a", "f-1", &query(), NOW + 3600),
            Err(Refusal::Expired)
        );
        assert_eq!(
            verify(&key(), "org-a", "f-1", &query(), u64::MAX),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn other_keys_and_tampering_are_refused() {
        for other in [
            FileKey::new(b"another-secret"),
            FileKey::derived_from_jwt_secret(b"file-link-secret"),
            FileKey::resolve(Some("x"), b"file-link-secret"),
        ] {
            assert_eq!(
                verify(&other, "org-a", "f-1", &query(), NOW),
                Err(Refusal::BadSignature)
            );
        }
        let q = query();
        // A later expiry, another source, a flipped signature digit.
        let later = q.replace(
            &format!("exp={}", NOW + 3600),
            &format!("exp={}", NOW + 7200),
        );
        let elsewhere = q.replace("runtime%3A8000", "evil%3A8000");
        let sig_at = q.find("sig=").unwrap() + 4;
        let mut flipped = q.clone().into_bytes();
        flipped[sig_at] = if flipped[sig_at] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for tampered in [later, elsewhere, flipped] {
            assert_ne!(tampered, q);
            assert_eq!(
                verify(&key(), "org-a", "f-1", &tampered, NOW),
                Err(Refusal::BadSignature),
                "{tampered}"
            );
        }
        let short = &q[..q.len() - 2];
        assert_eq!(
            verify(&key(), "org-a", "f-1", short, NOW),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn malformed_queries_are_refused() {
        let q = query();
        let exp = format!("exp={}", NOW + 3600);
        for bad in [
            String::new(),
            "exp=1&src=x".to_owned(),
            format!("{q}&exp=1"),
            format!("{q}&extra=1"),
            q.replace(&exp, "exp=-1"),
            q.replace(&exp, &format!("exp=0{}", NOW + 3600)),
            q.replace(&exp, "exp=99999999999999999999999"),
            q.replace("src=", "src=%ZZ"),
            q.replace("src=", "src=%FF"),
            q.replace("sig=", "sig=g"),
            q.replace("&sig=", "&sig"),
        ] {
            assert_eq!(
                verify(&key(), "org-a", "f-1", &bad, NOW),
                Err(Refusal::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_runtime_is_asked_for_the_path_only() {
        for (src, target) in [
            (
                SRC,
                Some("/api/v1/files/f-1/download?name=%E6%8A%A5%E5%91%8A%20v2.pdf&x=1"),
            ),
            ("HTTP://evil.example:1/x?y=1#frag", Some("/x?y=1")),
            ("https://elsewhere/a%2Fb", Some("/a%2Fb")),
            ("http://runtime:8000", Some("/")),
            ("http://runtime:8000?id=1", Some("/?id=1")),
            (
                "/api/v1/files/f 1\r\nx: y",
                Some("/api/v1/files/f%201%0D%0Ax:%20y"),
            ),
            ("", None),
            ("//evil.example/x", None),
            ("files/f-1", None),
            ("ftp://runtime/f-1", None),
        ] {
            assert_eq!(runtime_target(src).as_deref(), target, "{src:?}");
        }
    }

    #[test]
    fn signer_builds_the_route_with_an_escaped_id() {
        let signer = FileSigner {
            key: key(),
            org: "org-a".into(),
            ttl_secs: 60,
        };
        let url = signer.url("a/b?c", SRC, NOW);
        let (path_part, query) = url.split_once('?').unwrap();
        assert_eq!(path_part, "/api/v1/runtime/files/a%2Fb%3Fc");
        assert!(
            query.starts_with(&format!("exp={}&src=", NOW + 60)),
            "{query}"
        );
        let id = percent_decode(path_part.strip_prefix(ROUTE_PREFIX).unwrap()).unwrap();
        assert_eq!(id, "a/b?c");
        assert_eq!(
            verify(&key(), "org-a", &id, query, NOW + 59),
            Ok(SRC.to_owned())
        );
        assert_eq!(
            verify(&key(), "org-a", &id, query, NOW + 60),
            Err(Refusal::Expired)
        );
    }
}
