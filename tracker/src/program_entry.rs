//! The cache's compact form of a program: what the tracker reads per hit
//! (id, name, checksum, customer, validity, version, allowed redirect
//! hosts, the conversion settings) in two allocations, all text in one buffer, instead of the
//! operators' `Program` with a string allocation per field. Fewer bytes
//! per cached program, and fewer cache lines touched per hit.

use adtrack_proto::program::{Program, active_at, host_matches};

/// Text fields held back to back in `text`.
const FIELDS: usize = 6;
use time::OffsetDateTime;

/// One program as the cache holds it.
pub struct ProgramEntry {
    /// Program id, name, checksum, customer name, click id parameter and
    /// postback secret (empty: none) back to back, then each allowed
    /// redirect host followed by a newline (hosts hold none).
    text: Box<str>,
    /// Where the six fields end in `text`.
    ends: [u32; FIELDS],
    attribution_window_days: u16,
    customer_id: i32,
    valid: bool,
    valid_from: Option<OffsetDateTime>,
    valid_until: Option<OffsetDateTime>,
    version: u64,
}

impl std::fmt::Debug for ProgramEntry {
    /// Everything but the postback secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramEntry")
            .field("program_id", &self.program_id())
            .field("version", &self.version)
            .field("valid", &self.valid)
            .finish_non_exhaustive()
    }
}

impl ProgramEntry {
    pub fn new(p: &Program) -> Self {
        let fields: [&str; FIELDS] = [
            p.program_id.as_str(),
            p.program_name.as_str(),
            p.checksum.as_str(),
            p.customer_name.as_str(),
            p.click_id_param(),
            p.postback_secret.as_ref().map_or("", |s| s.expose()),
        ];
        let hosts: usize = p.allowed_redirect_hosts.iter().map(|h| h.len() + 1).sum();
        let mut text = String::with_capacity(fields.iter().map(|f| f.len()).sum::<usize>() + hosts);
        let mut ends = [0u32; FIELDS];
        for (end, field) in ends.iter_mut().zip(fields) {
            text.push_str(field);
            *end = text.len() as u32;
        }
        for host in &p.allowed_redirect_hosts {
            text.push_str(host);
            text.push('\n');
        }
        Self {
            text: text.into_boxed_str(),
            ends,
            attribution_window_days: u16::try_from(p.attribution_window_days).unwrap_or(u16::MAX),
            customer_id: p.customer_id,
            valid: p.valid,
            valid_from: p.valid_from,
            valid_until: p.valid_until,
            version: p.version,
        }
    }

    fn field(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize).unwrap_or("")
    }

    pub fn program_id(&self) -> &str {
        self.field(0)
    }

    pub fn program_name(&self) -> &str {
        self.field(1)
    }

    pub fn checksum(&self) -> &str {
        self.field(2)
    }

    pub fn customer_name(&self) -> &str {
        self.field(3)
    }

    /// The query parameter click redirects carry the click id in.
    pub fn click_id_param(&self) -> &str {
        self.field(4)
    }

    /// The key postbacks are signed with; `None`: the program takes none.
    pub fn postback_secret(&self) -> Option<&[u8]> {
        Some(self.field(5).as_bytes()).filter(|s| !s.is_empty())
    }

    pub fn attribution_window_days(&self) -> u32 {
        u32::from(self.attribution_window_days)
    }

    pub fn customer_id(&self) -> i32 {
        self.customer_id
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Valid and inside its validity window at `now`.
    pub fn is_active_at(&self, now: OffsetDateTime) -> bool {
        active_at(self.valid, self.valid_from, self.valid_until, now)
    }

    /// True when a click may redirect to `host` (already lower-cased).
    pub fn allows_redirect_to(&self, host: &str) -> bool {
        let hosts = self
            .text
            .get(self.ends[FIELDS - 1] as usize..)
            .unwrap_or("");
        hosts
            .split_terminator('\n')
            .any(|pattern| host_matches(pattern, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    #[test]
    fn holds_what_the_program_says() {
        let mut p = Program::from_json(&serde_json::json!({
            "programId": "p-1", "programName": "Summer sale", "checksum": "c9",
            "customerId": 77, "customerName": "Acme", "valid": true, "version": 5,
            "allowedRedirectHosts": ["shop.example", "*.acme.example"],
            "validUntil": "2027-01-01T00:00:00Z",
            "postbackSecret": "0123456789abcdef", "attributionWindowDays": 7
        }))
        .expect("program");
        let e = ProgramEntry::new(&p);
        assert_eq!(e.click_id_param(), "adtrack_click_id");
        assert_eq!(e.postback_secret(), Some(&b"0123456789abcdef"[..]));
        assert_eq!(e.attribution_window_days(), 7);
        assert!(!format!("{e:?}").contains("0123456789abcdef"));
        assert_eq!(e.program_id(), "p-1");
        assert_eq!(e.program_name(), "Summer sale");
        assert_eq!(e.checksum(), "c9");
        assert_eq!(e.customer_name(), "Acme");
        assert_eq!(e.customer_id(), 77);
        assert_eq!(e.version(), 5);
        assert!(e.allows_redirect_to("shop.example"));
        assert!(e.allows_redirect_to("www.acme.example"));
        assert!(!e.allows_redirect_to("acme.example"));
        assert!(!e.allows_redirect_to("evil.example"));
        let before = OffsetDateTime::parse("2026-06-01T00:00:00Z", &Rfc3339).expect("t");
        let after = OffsetDateTime::parse("2027-06-01T00:00:00Z", &Rfc3339).expect("t");
        assert!(e.is_active_at(before));
        assert!(!e.is_active_at(after));
        p.valid = false;
        p.allowed_redirect_hosts.clear();
        p.checksum.clear();
        let e = ProgramEntry::new(&p);
        assert!(!e.is_active_at(before));
        assert!(!e.allows_redirect_to("shop.example"));
        assert_eq!(e.checksum(), "");
        assert_eq!(e.customer_name(), "Acme");
        p.postback_secret = None;
        p.click_id_param = Some("clk".into());
        let e = ProgramEntry::new(&p);
        assert_eq!(e.postback_secret(), None);
        assert_eq!(e.click_id_param(), "clk");
    }
}
