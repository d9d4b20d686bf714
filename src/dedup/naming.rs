//! RemediationRequest names: `rr-<fp[:16]>-<generation>`, one past the highest generation there is.

use crate::crd::RemediationRequest;
use crate::fingerprint::Fingerprint;

/// `rr-<fp[:16]>-<generation>`.
pub fn generation_name(fp: &Fingerprint, generation: u64) -> String {
    format!("rr-{}-{generation}", fp.short())
}

/// The generation of RR `name` of `fp`, if it is named by the rule above.
pub fn generation_of(fp: &Fingerprint, name: &str) -> Option<u64> {
    name.strip_prefix("rr-")?
        .strip_prefix(fp.short())?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// Deterministic name of the next RR for `fp`: one past the highest generation listed. Two
/// creators that saw the same list pick the same name.
pub fn next_name(fp: &Fingerprint, existing: &[RemediationRequest]) -> String {
    let highest = existing
        .iter()
        .filter_map(|rr| generation_of(fp, rr.metadata.name.as_deref()?))
        .max()
        .unwrap_or(0);
    generation_name(fp, highest + 1)
}

/// The name to create under the lock: [`next_name`], unless the previous holder of the Lease was
/// creating a later generation (not listed yet: its create may still land), then that one.
pub(super) fn name_to_create(fp: &Fingerprint, existing: &[RemediationRequest], inherited: Option<&str>) -> String {
    let next = next_name(fp, existing);
    match inherited {
        Some(name) if generation_of(fp, name) >= generation_of(fp, &next) => name.to_owned(),
        _ => next,
    }
}
