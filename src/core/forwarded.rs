//! `X-Forwarded-For`, `-Proto` and `-Host` on every request the proxy sends to legacy for a
//! caller: proxied, lean, failed over, or a bridge call. Legacy's per-client rate limit and its
//! logs then see the user, not the sidecar.
//!
//! A caller's own `X-Forwarded-*` headers are believed only when its connection comes from a
//! trusted hop (`identity.trusted_proxies`: the ingress or load balancer in front of the
//! proxy), the way Express's `trust proxy` and nginx's `set_real_ip_from` work: the hop's
//! `X-Forwarded-For` is kept and the hop's own address appended; its `-Proto` and `-Host` are
//! kept. From any other peer they are dropped, since anyone could write them: legacy gets the
//! peer's address alone, `http` (the proxy's listener is plain HTTP) and the request's `Host`.

use std::net::IpAddr;

use ipnet::IpNet;

pub const FOR: &str = "x-forwarded-for";
pub const PROTO: &str = "x-forwarded-proto";
pub const HOST: &str = "x-forwarded-host";

/// Whether `name` is one of the three headers the proxy writes itself.
pub fn is_forwarded(name: &[u8]) -> bool {
    [FOR, PROTO, HOST]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// The hops whose `X-Forwarded-*` headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Addresses (`10.0.0.7`, `::1`) and networks (`10.0.0.0/8`); `Err` names the first entry
    /// that is neither.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|e| {
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| e.clone())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn trusts(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.0.iter().any(|net| net.contains(&addr))
    }
}

/// Where a request came from: its peer's address (`None`: not an IP socket) and whether that
/// peer is a trusted hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hop {
    pub peer: Option<IpAddr>,
    pub trusted: bool,
}

impl Hop {
    /// The proxy's own hop, for a head it already wrote its `X-Forwarded-*` into (the one the
    /// front door hands Pingora): they are taken as they are, with no address appended.
    pub const AS_WRITTEN: Hop = Hop {
        peer: None,
        trusted: true,
    };

    pub fn of(peer: Option<IpAddr>, proxies: &TrustedProxies) -> Hop {
        let peer = peer.map(|p| p.to_canonical());
        Hop {
            peer,
            trusted: peer.is_some_and(|p| proxies.trusts(p)),
        }
    }
}

/// The `X-Forwarded-*` headers and `Host` a request arrived with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received<'a> {
    /// Every `X-Forwarded-For` line, in order.
    pub xff: Vec<&'a [u8]>,
    pub proto: Option<&'a [u8]>,
    pub forwarded_host: Option<&'a [u8]>,
    pub host: Option<&'a [u8]>,
}

impl<'a> Received<'a> {
    /// Take note of one request header (any header may be offered).
    pub fn see(&mut self, name: &[u8], value: &'a [u8]) {
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(FOR.as_bytes()) {
            self.xff.push(value);
        } else if name.eq_ignore_ascii_case(PROTO.as_bytes()) {
            self.proto.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(HOST.as_bytes()) {
            self.forwarded_host.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"host") {
            self.host.get_or_insert(value);
        }
    }
}

/// The three headers legacy gets, in this order; `None` ones are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub for_: Option<String>,
    pub proto: String,
    pub host: Option<String>,
}

impl Forwarded {
    pub fn of(hop: Hop, got: &Received) -> Forwarded {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let peer = hop.peer.map(|p| p.to_string());
        let (mut chain, proto, host) = if hop.trusted {
            let chain: Vec<String> = got
                .xff
                .iter()
                .flat_map(|line| line.split(|b| *b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|a| !a.is_empty())
                .map(text)
                .collect();
            (
                chain,
                got.proto.filter(|p| !p.is_empty()).map(text),
                got.forwarded_host.filter(|h| !h.is_empty()).or(got.host),
            )
        } else {
            (Vec::new(), None, got.host)
        };
        chain.extend(peer);
        Forwarded {
            for_: (!chain.is_empty()).then(|| chain.join(", ")),
            proto: proto.unwrap_or_else(|| "http".into()),
            host: host.filter(|h| !h.is_empty()).map(text),
        }
    }

    /// `(name, value)` of each header to send, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (FOR, self.for_.as_deref()),
            (PROTO, Some(self.proto.as_str())),
            (HOST, self.host.as_deref()),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n, v?)))
    }

    /// The lines [`Forwarded::of`]`(hop, got)` would write, straight into `out`: the same bytes
    /// without a `String` per value (the lean path writes them for every request).
    pub fn write(hop: Hop, got: &Received, out: &mut Vec<u8>) {
        let mut first = true;
        let entry = |out: &mut Vec<u8>, first: &mut bool| {
            if *first {
                out.extend_from_slice(FOR.as_bytes());
                out.extend_from_slice(b": ");
                *first = false;
            } else {
                out.extend_from_slice(b", ");
            }
        };
        if hop.trusted {
            let chain = got
                .xff
                .iter()
                .flat_map(|line| line.split(|b| *b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|a| !a.is_empty());
            for a in chain {
                entry(out, &mut first);
                lossy(a, out);
            }
        }
        if let Some(peer) = hop.peer {
            entry(out, &mut first);
            write_ip(peer, out);
        }
        if !first {
            out.extend_from_slice(b"\r\n");
        }
        let (proto, host) = if hop.trusted {
            (
                got.proto.filter(|p| !p.is_empty()),
                got.forwarded_host.filter(|h| !h.is_empty()).or(got.host),
            )
        } else {
            (None, got.host)
        };
        out.extend_from_slice(PROTO.as_bytes());
        out.extend_from_slice(b": ");
        lossy(proto.unwrap_or(b"http"), out);
        out.extend_from_slice(b"\r\n");
        if let Some(host) = host.filter(|h| !h.is_empty()) {
            out.extend_from_slice(HOST.as_bytes());
            out.extend_from_slice(b": ");
            lossy(host, out);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The header lines, `Name: value\r\n` each, as the lean path writes them.
    pub fn write_lines(&self, out: &mut Vec<u8>) {
        for (name, value) in self.headers() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// `v` as [`String::from_utf8_lossy`] has it (as it is, when it is UTF-8).
fn lossy(v: &[u8], out: &mut Vec<u8>) {
    if v.is_ascii() {
        out.extend_from_slice(v);
    } else {
        out.extend_from_slice(String::from_utf8_lossy(v).as_bytes());
    }
}

/// `ip` as its `Display` writes it; an IPv4 address octet by octet, without `fmt`.
fn write_ip(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn got<'a>(xff: &[&'a str], proto: Option<&'a str>, fhost: Option<&'a str>) -> Received<'a> {
        let mut r = Received::default();
        for x in xff {
            r.see(b"X-Forwarded-For", x.as_bytes());
        }
        if let Some(p) = proto {
            r.see(b"x-forwarded-proto", p.as_bytes());
        }
        if let Some(h) = fhost {
            r.see(b"X-Forwarded-Host", h.as_bytes());
        }
        r.see(b"Host", b"api.example.com");
        r
    }

    #[test]
    fn a_direct_client_s_own_headers_are_replaced() {
        let hop = Hop::of(Some(ip("203.0.113.9")), &proxies(&["10.0.0.0/8"]));
        assert!(!hop.trusted);
        let f = Forwarded::of(hop, &got(&["1.2.3.4"], Some("https"), Some("evil.example")));
        assert_eq!(
            f,
            Forwarded {
                for_: Some("203.0.113.9".into()),
                proto: "http".into(),
                host: Some("api.example.com".into()),
            }
        );
        let mut lines = Vec::new();
        f.write_lines(&mut lines);
        assert_eq!(
            String::from_utf8(lines).unwrap(),
            "x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: http\r\nx-forwarded-host: api.example.com\r\n"
        );
    }

    #[test]
    fn a_trusted_hop_s_chain_is_kept_and_the_hop_appended() {
        let hop = Hop::of(Some(ip("10.1.2.3")), &proxies(&["10.0.0.0/8", "fd00::/8"]));
        assert!(hop.trusted);
        let f = Forwarded::of(
            hop,
            &got(
                &["198.51.100.7, 10.9.9.9", " 172.16.0.1 "],
                Some("https"),
                Some("app.example.com"),
            ),
        );
        assert_eq!(
            f.for_.as_deref(),
            Some("198.51.100.7, 10.9.9.9, 172.16.0.1, 10.1.2.3")
        );
        assert_eq!(f.proto, "https");
        assert_eq!(f.host.as_deref(), Some("app.example.com"));
        // A hop that sent none of them: its own address, http, the Host.
        let f = Forwarded::of(hop, &got(&[], None, None));
        assert_eq!(f.for_.as_deref(), Some("10.1.2.3"));
        assert_eq!(f.proto, "http");
        assert_eq!(f.host.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn mapped_and_v6_peers_are_written_plainly() {
        let hop = Hop::of(Some(ip("::ffff:10.0.0.5")), &proxies(&["10.0.0.5"]));
        assert!(hop.trusted, "an IPv4-mapped peer is its IPv4 address");
        assert_eq!(hop.peer, Some(ip("10.0.0.5")));
        let hop = Hop::of(Some(ip("2001:db8::1")), &TrustedProxies::default());
        let f = Forwarded::of(hop, &got(&[], None, None));
        assert_eq!(f.for_.as_deref(), Some("2001:db8::1"));
        // No peer address (not an IP socket): no X-Forwarded-For at all.
        let f = Forwarded::of(Hop::default(), &Received::default());
        assert_eq!(f.headers().map(|(n, _)| n).collect::<Vec<_>>(), [PROTO]);
    }

    #[test]
    fn entries_are_addresses_or_networks() {
        assert!(TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).is_ok());
        for bad in ["10.0.0.0/33", "host", "10.0.0.1:80", ""] {
            assert_eq!(
                TrustedProxies::parse(&[bad.to_string()]),
                Err(bad.to_string())
            );
        }
        assert!(is_forwarded(b"X-Forwarded-For") && is_forwarded(b"x-forwarded-host"));
        assert!(!is_forwarded(b"forwarded") && !is_forwarded(b"x-real-ip"));
    }

    fn written(hop: Hop, got: &Received) -> Vec<u8> {
        let mut direct = Vec::new();
        Forwarded::write(hop, got, &mut direct);
        direct
    }

    fn via_of(hop: Hop, got: &Received) -> Vec<u8> {
        let mut lines = Vec::new();
        Forwarded::of(hop, got).write_lines(&mut lines);
        lines
    }

    #[test]
    fn the_direct_writer_matches_the_headers_on_the_usual_shapes() {
        let ips = [
            "203.0.113.9",
            "0.0.0.0",
            "255.255.255.255",
            "10.1.2.3",
            "2001:db8::1",
            "::1",
        ];
        for peer in ips.iter().map(|s| Some(ip(s))).chain([None]) {
            for trusted in [false, true] {
                let hop = Hop { peer, trusted };
                for got in [
                    got(
                        &["198.51.100.7, 10.9.9.9", " 172.16.0.1 "],
                        Some("https"),
                        Some("a"),
                    ),
                    got(&[" , ,"], Some(""), Some("")),
                    Received::default(),
                    Received {
                        host: Some(b"h\xffst"),
                        xff: vec![b"\xfe, 1.2.3.4"],
                        ..Received::default()
                    },
                ] {
                    assert_eq!(written(hop, &got), via_of(hop, &got), "{hop:?} {got:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn the_direct_writer_matches_the_headers(
            peer in proptest::option::of(any::<IpAddr>()),
            trusted in any::<bool>(),
            xff in proptest::collection::vec(proptest::collection::vec(
                prop_oneof![Just(b','), Just(b' '), Just(b'1'), Just(b'.'), any::<u8>()], 0..12), 0..3),
            proto in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
            fhost in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
            host in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)),
        ) {
            let hop = Hop { peer, trusted };
            let got = Received {
                xff: xff.iter().map(Vec::as_slice).collect(),
                proto: proto.as_deref(),
                forwarded_host: fhost.as_deref(),
                host: host.as_deref(),
            };
            prop_assert_eq!(written(hop, &got), via_of(hop, &got));
        }

        /// A head the proxy wrote its lines into says the same again when read back
        /// `AS_WRITTEN`: what a bridge call or a rescue sends is what legacy got on the request.
        #[test]
        fn lines_read_back_as_written_give_the_same_headers(
            peer in proptest::option::of(any::<IpAddr>()),
            trusted in any::<bool>(),
            sent in proptest::collection::vec((
                prop_oneof![Just(FOR), Just(PROTO), Just(HOST), Just("host")],
                "[ -~]{0,16}",
            ), 0..6),
        ) {
            let hop = Hop { peer, trusted };
            let mut got = Received::default();
            for (name, value) in &sent {
                got.see(name.as_bytes(), value.as_bytes());
            }
            let lines = written(hop, &got);
            // The head keeps the client's Host lines, then has the proxy's.
            let mut again = Received::default();
            for (name, value) in sent.iter().filter(|(n, _)| *n == "host") {
                again.see(name.as_bytes(), value.as_bytes());
            }
            for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|b| *b == b':').unwrap();
                again.see(&line[..colon], &line[colon + 1..]);
            }
            prop_assert_eq!(Forwarded::of(Hop::AS_WRITTEN, &again), Forwarded::of(hop, &got));
        }

        #[test]
        fn the_peer_is_always_last_and_untrusted_chains_never_pass(
            a in any::<[u8; 4]>(),
            chain in proptest::collection::vec("[0-9a-f.:, ]{0,20}", 0..4),
            trusted in any::<bool>(),
        ) {
            let peer = IpAddr::from(a);
            let list = if trusted { vec![peer.to_string()] } else { Vec::new() };
            let hop = Hop::of(Some(peer), &TrustedProxies::parse(&list).unwrap());
            let xff: Vec<&str> = chain.iter().map(String::as_str).collect();
            let f = Forwarded::of(hop, &got(&xff, None, None));
            let v = f.for_.unwrap();
            let last = v.rsplit(", ").next().unwrap().to_string();
            prop_assert_eq!(last, peer.to_string());
            if !trusted {
                prop_assert_eq!(v, peer.to_string());
            }
        }
    }
}
