//! Name hashes as the kernel computes them.

use egressd_common::dns::name_hash;

use crate::message::normalize;

/// The hash of `name` and of each of its suffixes at a label boundary, longest first:
/// `api.example.com` gives `api.example.com`, `example.com`, `com`. The name is lowercased and
/// loses a trailing dot; the hash is [`egressd_common::dns::name_hash`], the one the kernel
/// computes in a single backward pass over the answer's name (so a wildcard `*.example.com`
/// is looked up as the hash of `example.com`).
pub fn name_suffix_hashes(name: &str) -> Vec<(String, u64)> {
    let name = normalize(name);
    let mut hashes = Vec::new();
    let mut rest = name.as_str();
    while !rest.is_empty() {
        hashes.push((rest.to_owned(), name_hash(rest.as_bytes())));
        rest = match rest.split_once('.') {
            Some((_, after)) => after,
            None => "",
        };
    }
    hashes
}
