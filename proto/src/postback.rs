//! The signature of an advertiser's postback
//! (`GET /v1/postback/{programId}?click_id&txid&value&currency&ts&sig`):
//! `sig` is the lowercase hex HMAC-SHA256, keyed with the program's
//! `postbackSecret`, of the raw query string as sent, up to and excluding
//! `&sig=` (so `sig` is the last parameter). In a shell:
//!
//! ```sh
//! q="click_id=$CLICK&txid=T-1001&value=49.90&currency=EUR&ts=$(date +%s)"
//! sig=$(printf %s "$q" | openssl dgst -sha256 -hmac "$SECRET" | sed 's/^.* //')
//! curl "https://tracker.example.com/v1/postback/$PROGRAM?$q&sig=$sig"
//! ```

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Where the signature starts in the raw query.
pub const SIG_MARK: &str = "&sig=";

/// The lowercase hex signature of `signed` (the raw query before `&sig=`).
pub fn sign(secret: &[u8], signed: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(signed.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `query` with its signature appended.
pub fn signed_query(secret: &[u8], query: &str) -> String {
    format!("{query}{SIG_MARK}{}", sign(secret, query))
}

/// The signed part of a raw query and its signature (hex), if it has one.
pub fn split_signature(query: &str) -> Option<(&str, &str)> {
    let at = query.find(SIG_MARK)?;
    Some((&query[..at], &query[at + SIG_MARK.len()..]))
}

/// Checks `sig` (hex) against the HMAC-SHA256 of `signed` under `secret`,
/// in constant time.
pub fn verify(secret: &[u8], signed: &str, sig: &str) -> bool {
    let Ok(given) = hex::decode(sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(signed.as_bytes());
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_the_raw_query_before_sig() {
        let key = b"0123456789abcdef";
        let signed = "click_id=c-1&txid=T1&value=12.50&currency=EUR&ts=1700000000";
        let query = signed_query(key, signed);
        let (s, g) = split_signature(&query).expect("signed");
        assert_eq!(s, signed);
        assert_eq!(g.len(), 64);
        assert!(verify(key, s, g));
        assert!(verify(key, s, &g.to_uppercase()), "hex is hex");
        assert!(!verify(b"another-key-0123", s, g));
        let tampered = query.replace("12.50", "99.50");
        let (s, g) = split_signature(&tampered).expect("signed");
        assert!(!verify(key, s, g));
        assert!(!verify(key, signed, "zz"));
        assert!(!verify(key, signed, &g[..10]));
        assert!(split_signature("txid=1&ts=2").is_none());
    }

    /// The recipe's value, as `openssl dgst -sha256 -hmac` computes it
    /// (RFC 4231 test case 2: key "Jefe").
    #[test]
    fn matches_the_standard_hmac() {
        assert_eq!(
            sign(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
