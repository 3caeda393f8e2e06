//! What may differ between two mappers' output for the same events: the stream's message id,
//! made fresh per stream, and the time written for an event the runtime sent without one.

/// `out` with the stream's message id replaced and every `now` timestamp the writer made
/// (`"timestamp":"YYYY-MM-DDTHH:MM:SS.mmmZ"`) blanked. A runtime timestamp of that very shape is
/// blanked in both outputs alike.
pub fn normalised(out: &[u8], message_id: &str) -> String {
    let text = String::from_utf8(out.to_vec())
        .expect("client events are UTF-8")
        .replace(message_id, "MESSAGE-ID");
    const KEY: &str = "\"timestamp\":\"";
    let mut result = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find(KEY) {
        let (before, after) = rest.split_at(at + KEY.len());
        result.push_str(before);
        let stamp = after.as_bytes();
        let made = stamp.len() > 24
            && stamp[24] == b'"'
            && stamp[23] == b'Z'
            && stamp[19] == b'.'
            && stamp[10] == b'T'
            && humantime::parse_rfc3339(&after[..24]).is_ok();
        if made {
            result.push_str("NOW");
            rest = &after[24..];
        } else {
            rest = after;
        }
    }
    result.push_str(rest);
    result
}
