//! The consent a hit carries: the IAB TCF v2 parameters (`gdpr`,
//! `gdpr_consent`) and GPP ones (`gpp`, `gpp_sid`) that the ad stack adds
//! to pixel URLs and the tag passes along, decoded with `iab_gpp`. What the
//! tracker needs is one answer: did the person consent to storage (TCF
//! purpose 1) and to measurement (purpose 7)? It is recorded on every event;
//! with `TRACKER_CONSENT=enforce`, a hit without that consent where the
//! GDPR applies loses its identifiers (client IP, user agent, identifier
//! parameters), as `DNT: 1` does.

use std::str::FromStr;

use adtrack_proto::v1::ConsentState;
use iab_gpp::sections::SectionId;
use iab_gpp::sections::tcfeuv2::TcfEuV2;
use iab_gpp::v1::GPPString;

use crate::hit::Params;

/// TCF purposes an event needs: store and/or access information on a
/// device (1), measure advertising performance (7).
const NEEDED_PURPOSES: [u8; 2] = [1, 7];

/// What `TRACKER_CONSENT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentMode {
    /// Record the consent state on the event; change nothing else.
    Record,
    /// Also drop identifiers when the GDPR applies and consent is missing.
    Enforce,
}

impl ConsentMode {
    pub fn parse(s: &str) -> Self {
        if s == "enforce" {
            Self::Enforce
        } else {
            Self::Record
        }
    }

    /// Whether a hit in `state` keeps its identifiers.
    pub fn keeps_identifiers(self, state: ConsentState) -> bool {
        self == Self::Record
            || matches!(
                state,
                ConsentState::Granted | ConsentState::NotApplicable | ConsentState::Unspecified
            )
    }
}

/// Storage and measurement consented in a decoded TCF v2 string.
fn granted(tcf: &TcfEuV2) -> ConsentState {
    let purposes = &tcf.core.purpose_consents;
    if NEEDED_PURPOSES
        .iter()
        .all(|p| purposes.contains(&u16::from(*p)))
    {
        ConsentState::Granted
    } else {
        ConsentState::Denied
    }
}

/// The consent state of a hit's parameters.
pub fn read(params: &Params) -> ConsentState {
    let get = |k: &str| {
        params
            .0
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    if get("gdpr") == Some("0") {
        return ConsentState::NotApplicable;
    }
    if let Some(tc) = get("gdpr_consent") {
        return match TcfEuV2::from_str(tc) {
            Ok(tcf) => granted(&tcf),
            Err(_) => ConsentState::Unreadable,
        };
    }
    if let Some(gpp) = get("gpp") {
        let Ok(gpp) = GPPString::from_str(gpp) else {
            return ConsentState::Unreadable;
        };
        if gpp.section_ids().any(|id| *id == SectionId::TcfEuV2) {
            return match gpp.section(SectionId::TcfEuV2).map(TcfEuV2::from_str) {
                Some(Ok(tcf)) => granted(&tcf),
                _ => ConsentState::Unreadable,
            };
        }
    }
    // The GDPR applies and no consent string says yes.
    if get("gdpr") == Some("1") {
        return ConsentState::Denied;
    }
    ConsentState::Unspecified
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TCF v2 strings: purposes 1, 2, 3 (no measurement), and the same
    /// with purpose 7 set.
    const STORAGE_ONLY: &str = "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA";
    const STORAGE_AND_MEASUREMENT: &str = "COvFyGBOvFyGBAbAAAENAPCAAOIAAAAAAAAAAEEUACCKAAA";

    fn state(query: &str) -> ConsentState {
        read(&Params::parse(Some(query)).expect("query"))
    }

    #[test]
    fn consent_strings_decide() {
        assert_eq!(state(""), ConsentState::Unspecified);
        assert_eq!(state("gdpr=0"), ConsentState::NotApplicable);
        assert_eq!(
            state("gdpr=1"),
            ConsentState::Denied,
            "applies, nothing consented"
        );
        assert_eq!(
            state(&format!("gdpr=1&gdpr_consent={STORAGE_AND_MEASUREMENT}")),
            ConsentState::Granted
        );
        assert_eq!(
            state(&format!("gdpr=1&gdpr_consent={STORAGE_ONLY}")),
            ConsentState::Denied,
            "storage without measurement"
        );
        assert_eq!(
            state("gdpr=1&gdpr_consent=%21%21"),
            ConsentState::Unreadable
        );
        // The same in a GPP string's TCF EU v2 section.
        assert_eq!(
            state(&format!("gpp=DBABM~{STORAGE_AND_MEASUREMENT}&gpp_sid=2")),
            ConsentState::Granted
        );
        assert_eq!(
            state(&format!("gpp=DBABM~{STORAGE_ONLY}&gpp_sid=2")),
            ConsentState::Denied
        );
        assert_eq!(state("gpp=nonsense"), ConsentState::Unreadable);
        // Only `enforce` drops identifiers, and only without consent.
        assert!(ConsentMode::Record.keeps_identifiers(ConsentState::Denied));
        assert!(!ConsentMode::Enforce.keeps_identifiers(ConsentState::Denied));
        assert!(!ConsentMode::Enforce.keeps_identifiers(ConsentState::Unreadable));
        assert!(ConsentMode::Enforce.keeps_identifiers(ConsentState::Granted));
        assert!(ConsentMode::Enforce.keeps_identifiers(ConsentState::Unspecified));
    }
}
