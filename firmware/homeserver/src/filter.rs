//! Event filters (the spec's `Filter`, `RoomFilter` and `RoomEventFilter`).

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    pub limit: Option<u64>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub contains_url: Option<bool>,
    pub lazy_load_members: bool,
    pub unread_thread_notifications: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub ephemeral: EventFilter,
    pub account_data: EventFilter,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Filter {
    pub room: RoomFilter,
    pub account_data: EventFilter,
    pub presence: EventFilter,
    pub event_fields: Option<Vec<String>>,
}

fn glob(pattern: &str, s: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => s.starts_with(prefix),
        _ if pattern.contains('*') => {
            // General '*' wildcard: split and match pieces in order.
            let parts: Vec<&str> = pattern.split('*').collect();
            let mut rest = s;
            for (i, p) in parts.iter().enumerate() {
                if i == 0 {
                    if !rest.starts_with(p) {
                        return false;
                    }
                    rest = &rest[p.len()..];
                } else if let Some(idx) = rest.find(p) {
                    rest = &rest[idx + p.len()..];
                } else {
                    return false;
                }
            }
            parts.last().is_some_and(|l| l.is_empty() || s.ends_with(l))
        }
        _ => pattern == s,
    }
}

impl EventFilter {
    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rs| rs.iter().any(|r| r == room_id))
    }

    pub fn allows_type(&self, kind: &str) -> bool {
        !self.not_types.iter().any(|t| glob(t, kind))
            && self
                .types
                .as_ref()
                .is_none_or(|ts| ts.iter().any(|t| glob(t, kind)))
    }

    /// Whether a client-formatted (or PDU) event passes.
    pub fn allows(&self, ev: &Value) -> bool {
        self.allows_fields(
            ev["type"].as_str().unwrap_or_default(),
            ev["sender"].as_str().unwrap_or_default(),
            ev["content"]["url"].is_string(),
        )
    }

    /// [`EventFilter::allows`] given the fields it looks at.
    pub fn allows_fields(&self, kind: &str, sender: &str, has_url: bool) -> bool {
        if !self.allows_type(kind) {
            return false;
        }
        if self.not_senders.iter().any(|s| s == sender) {
            return false;
        }
        if let Some(ss) = &self.senders {
            if !ss.iter().any(|s| s == sender) {
                return false;
            }
        }
        if let Some(want) = self.contains_url {
            if has_url != want {
                return false;
            }
        }
        true
    }
}

impl RoomFilter {
    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rs| rs.iter().any(|r| r == room_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_by_type_sender_and_globs() {
        let f: EventFilter =
            serde_json::from_value(json!({"types": ["m.room.*"], "not_senders": ["@b:x"]}))
                .unwrap();
        assert!(f.allows(&json!({"type": "m.room.message", "sender": "@a:x"})));
        assert!(!f.allows(&json!({"type": "m.room.message", "sender": "@b:x"})));
        assert!(!f.allows(&json!({"type": "m.reaction", "sender": "@a:x"})));
        assert!(glob("a*c", "abbc"));
        assert!(!glob("a*c", "abbd"));
    }
}
