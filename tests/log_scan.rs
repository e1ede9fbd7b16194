//! Searches the logs of a whole test run for every secret the run was handed: each API key
//! from a CreateKey response and each caller token, whole or just their random part.
//!
//! `.ci/run` runs the suite with `APIKEYS_TEST_SCAN_DIR=DIR RUST_LOG=trace` (every crate's
//! every line, the transport's included), then this test over what it left in DIR.

use std::collections::HashSet;

#[test]
#[ignore = "run by .ci/run after the suite has run with APIKEYS_TEST_SCAN_DIR and RUST_LOG=trace"]
fn no_secret_handed_out_in_the_whole_run_is_in_its_logs() {
    let dir = std::path::PathBuf::from(
        std::env::var_os("APIKEYS_TEST_SCAN_DIR").expect("APIKEYS_TEST_SCAN_DIR names the run"),
    );
    let secrets = std::fs::read_to_string(dir.join("secrets")).expect("the run's secrets");
    let logs = std::fs::read(dir.join("logs")).expect("the run's logs");
    let secrets: HashSet<&str> = secrets.lines().filter(|l| !l.is_empty()).collect();
    assert!(
        secrets.len() >= 100,
        "only {} secrets recorded: did the suite run with the scan on?",
        secrets.len()
    );
    assert!(
        logs.windows(7).any(|w| w == b" TRACE "),
        "the logs hold no TRACE line: was RUST_LOG=trace set?"
    );
    // Keys are `clo_` + 32 random + 6 checksum characters, tokens `cct_` + 43 random: their
    // random parts are base62 runs of their own between the prefix and whatever follows.
    let random_parts: HashSet<&[u8]> = secrets
        .iter()
        .map(|s| {
            let random = s.strip_prefix("cct_").unwrap_or_else(|| &s[4..36]);
            random.as_bytes()
        })
        .collect();
    // Every occurrence of any of them, in one pass (Aho-Corasick: the run's logs are hundreds
    // of megabytes and its secrets thousands). A random part is base62, so any match lies
    // within a run of letters and digits: a secret whole, or glued to other text.
    let matcher = aho_corasick::AhoCorasick::new(&random_parts).expect("the secrets' matcher");
    // Where, not what: the failure message must not repeat the secret.
    let found: Vec<usize> = matcher.find_iter(&logs).map(|m| m.start()).collect();

    assert!(
        found.is_empty(),
        "{} secret(s) in the logs ({} bytes of logs, {} secrets), at byte offsets {:?}",
        found.len(),
        logs.len(),
        secrets.len(),
        found
    );
    println!(
        "searched {} bytes of logs for {} secrets: none found",
        logs.len(),
        secrets.len()
    );
}
