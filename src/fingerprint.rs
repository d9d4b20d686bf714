//! Stable incident identity: lowercase hex SHA-256 of `namespace:Kind:name`, prefixed with
//! `cluster:` when a cluster id is configured. Every replica must compute the same value for the
//! same target, so nothing time- or replica-dependent may enter it.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::crd::TargetResource;

/// A validated fingerprint (64 lowercase hex characters).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// Fingerprint of a resolved target.
    pub fn of(cluster_id: &str, target: &TargetResource) -> Self {
        let mut hasher = Sha256::new();
        if !cluster_id.is_empty() {
            hasher.update(cluster_id.as_bytes());
            hasher.update(b":");
        }
        hasher.update(target.namespace.as_bytes());
        hasher.update(b":");
        hasher.update(target.kind.as_bytes());
        hasher.update(b":");
        hasher.update(target.name.as_bytes());
        Fingerprint(hex(&hasher.finalize()))
    }

    /// Accepts only 64 lowercase hex characters.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| Fingerprint(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 16 hex characters: enough to name per-fingerprint objects (Lease, RR).
    pub fn short(&self) -> &str {
        &self.0[..16]
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ns: &str, kind: &str, name: &str) -> TargetResource {
        TargetResource {
            kind: kind.into(),
            name: name.into(),
            namespace: ns.into(),
            api_version: String::new(),
        }
    }

    // Vectors computed independently: `printf %s prod:Deployment:api | sha256sum`, etc.
    #[test]
    fn fingerprint_matches_fixed_sha256_vectors() {
        assert_eq!(
            Fingerprint::of("", &target("prod", "Deployment", "api")).as_str(),
            "ef1b76d88f42344978562a9fa0edb7e5d356a16d2d11396312e91a137d393384"
        );
        assert_eq!(
            Fingerprint::of("", &target("", "Node", "worker-1")).as_str(),
            "5811a14c33e6ea55be7f43355c2cffd48201fcbf3fc51c48a3f58e375e6f7ccc"
        );
        assert_eq!(
            Fingerprint::of("east", &target("prod", "Deployment", "api")).as_str(),
            "16973c78ad8925bd916a77fde836db7eaaa4b503c7e751704d2720dd557c3b2a"
        );
    }

    #[test]
    fn fingerprint_ignores_api_version_and_depends_on_every_identity_part() {
        let base = Fingerprint::of("", &target("a", "Pod", "p"));
        let mut with_version = target("a", "Pod", "p");
        with_version.api_version = "v1".into();
        assert_eq!(base, Fingerprint::of("", &with_version));
        assert_ne!(base, Fingerprint::of("", &target("b", "Pod", "p")));
        assert_ne!(base, Fingerprint::of("", &target("a", "Deployment", "p")));
        assert_ne!(base, Fingerprint::of("", &target("a", "Pod", "q")));
        assert_ne!(base, Fingerprint::of("c", &target("a", "Pod", "p")));
    }

    #[test]
    fn parse_accepts_only_lowercase_hex_of_length_64() {
        let fp = Fingerprint::of("", &target("a", "Pod", "p"));
        assert_eq!(Fingerprint::parse(fp.as_str()), Some(fp.clone()));
        assert_eq!(Fingerprint::parse(&fp.as_str().to_uppercase()), None);
        assert_eq!(Fingerprint::parse(&fp.as_str()[..63]), None);
        assert_eq!(Fingerprint::parse(&format!("{}g", &fp.as_str()[..63])), None);
        assert_eq!(fp.short().len(), 16);
    }
}
