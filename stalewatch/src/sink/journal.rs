//! systemd's journal, spoken natively: where stdout is the journal's
//! stream, each record goes to journald's socket as one entry, with its
//! priority and the flow's facts as fields of their own, so that an
//! operator can ask `journalctl -u stalewatch STALEWATCH_VERDICT=stale` or
//! `STALEWATCH_SERVICE=10.96.0.10:53/udp`. The message is the line (or text
//! block) stdout would have carried.
//!
//! The native protocol: a datagram of `KEY=value` lines; a value holding a
//! newline is written as `KEY`, a newline, its length as 64-bit
//! little-endian, the bytes and a newline.

use std::{io, os::unix::net::UnixDatagram};

use serde_json::Value;

use super::{Record, priority};

/// Where journald takes native entries.
pub const SOCKET: &str = "/run/systemd/journal/socket";

pub struct Journal {
    socket: UnixDatagram,
}

impl Journal {
    /// A socket for journald's; `None` where journald takes no entries
    /// there (then the caller writes to stdout as before).
    pub fn connect() -> Option<Journal> {
        let socket = UnixDatagram::unbound().ok()?;
        // A journald that falls behind must not stall the watch: a full
        // queue is an error, and the record goes to stdout instead.
        socket.set_nonblocking(true).ok()?;
        if !std::path::Path::new(SOCKET).exists() {
            log::debug!("no journal socket at {SOCKET}");
            return None;
        }
        Some(Journal { socket })
    }

    /// Sends `record`, said as `message`, as one entry (to the socket's
    /// path each time, as sd_journal_send does: a restarted journald is
    /// reached again).
    pub fn send(&self, record: &Record, message: &str) -> io::Result<()> {
        let entry = encode(&fields(record, message));
        self.socket.send_to(&entry, SOCKET).map(drop)
    }
}

/// The fields of one record's entry: the message, its priority, who says
/// it, and the facts a person searches by.
pub fn fields(record: &Record, message: &str) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("MESSAGE", message.trim_end_matches('\n').to_owned()),
        ("PRIORITY", priority(record).to_string()),
        ("SYSLOG_IDENTIFIER", "stalewatch".to_owned()),
    ];
    let Ok(v) = serde_json::to_value(record) else {
        return out;
    };
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let at = |v: &Value| Some(format!("{}:{}", text(&v["addr"])?, text(&v["port"])?));
    let proto = text(&v["proto"]).unwrap_or_default();
    let service = if v["orig"].is_object() {
        text(&v["orig"]["dst"])
            .zip(text(&v["orig"]["dport"]))
            .map(|(a, p)| format!("{a}:{p}/{proto}"))
    } else {
        at(&v["service"]).map(|s| format!("{s}/{proto}"))
    };
    let source = text(&v["orig"]["src"])
        .zip(text(&v["orig"]["sport"]))
        .map(|(a, p)| format!("{a}:{p}"));
    let netns = text(&v["netns"]["name"]).or_else(|| text(&v["netns"]["inode"]));
    for (key, value) in [
        ("STALEWATCH_TYPE", text(&v["type"])),
        ("STALEWATCH_STATE", text(&v["state"])),
        ("STALEWATCH_VERDICT", text(&v["verdict"])),
        ("STALEWATCH_NETNS", netns),
        ("STALEWATCH_SERVICE", service),
        ("STALEWATCH_SOURCE", source),
        ("STALEWATCH_STALE_BACKEND", at(&v["stale_backend"])),
        ("STALEWATCH_CURRENT_BACKEND", at(&v["current_backend"])),
        (
            "STALEWATCH_STALE_CONTAINER",
            text(&v["stale_backend"]["container"]["name"]),
        ),
        (
            "STALEWATCH_CURRENT_CONTAINER",
            text(&v["current_backend"]["container"]["name"]),
        ),
        ("STALEWATCH_DEAD_DESTINATION", text(&v["dead"]["addr"])),
        ("STALEWATCH_FIX", text(&v["fix"])),
    ] {
        if let Some(value) = value {
            out.push((key, value));
        }
    }
    out
}

/// One entry in the native protocol.
pub fn encode(fields: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in fields {
        out.extend_from_slice(key.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::Containers,
        sink::{
            fixtures::{alert, clock, named},
            record::StaleFlow,
        },
    };

    #[test]
    fn a_raised_flow_is_a_warning_with_its_facts_as_fields() {
        let record = Record::StaleFlow(Box::new(StaleFlow::new(
            &alert(),
            named("sw-router"),
            &Containers::default(),
            &clock(),
        )));
        let f = fields(&record, "{\"type\":\"stale_flow\"}\n");
        let get = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MESSAGE"), Some("{\"type\":\"stale_flow\"}"));
        assert_eq!(get("PRIORITY"), Some("4"));
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("stalewatch"));
        assert_eq!(get("STALEWATCH_TYPE"), Some("stale_flow"));
        assert_eq!(get("STALEWATCH_STATE"), Some("raised"));
        assert_eq!(get("STALEWATCH_VERDICT"), Some("stale"));
        assert_eq!(get("STALEWATCH_NETNS"), Some("sw-router"));
        let orig = &alert().flow.orig;
        assert_eq!(
            get("STALEWATCH_SERVICE").map(str::to_owned),
            Some(format!("{}:{}/udp", orig.dst, orig.dport))
        );
        assert_eq!(
            get("STALEWATCH_SOURCE").map(str::to_owned),
            Some(format!("{}:{}", orig.src, orig.sport))
        );
        let stale = alert().flow.backend();
        assert_eq!(
            get("STALEWATCH_STALE_BACKEND").map(str::to_owned),
            Some(stale.to_string())
        );
        assert!(get("STALEWATCH_FIX").is_some_and(|f| f.starts_with("ip netns exec")));
    }

    #[test]
    fn a_value_with_newlines_is_sent_with_its_length() {
        let entry = encode(&[
            ("MESSAGE", "two\nlines".to_owned()),
            ("PRIORITY", "5".to_owned()),
        ]);
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\nPRIORITY=5\n");
        assert_eq!(entry, want);
    }
}
