//! Every parser of caller-supplied text: keys, names, ids, workspace ids, page tokens, actor
//! metadata, scopes, owners, annotations, allowed networks and the callers file. None may panic,
//! and what they accept must be what they say.
#![no_main]

use apikeys::{
    auth::{Callers, check_name},
    domain::{
        Actor, AllowedCidrs, Annotations, Cidr, KEY_LEN, KEY_PREFIX, KeyId, KeyName, MAX_SCOPES,
        OwnerId, PageCursor, PresentedKey, Scopes, WorkspaceId, check_required, column_scopes,
        contains_key, is_scope,
    },
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if PresentedKey::parse(text).is_ok() {
        assert_eq!(text.len(), KEY_LEN);
        assert!(text.starts_with(KEY_PREFIX));
        assert!(contains_key(text));
    }
    // A label holding a well-formed key is refused: a pasted secret is never stored.
    if let Ok(name) = KeyName::parse(text) {
        assert!(!contains_key(name.as_str()));
        assert_eq!(
            KeyName::parse(name.as_str())
                .map(|n| n.as_str().to_owned())
                .ok()
                .as_deref(),
            Some(name.as_str())
        );
    }
    if let Ok(workspace) = WorkspaceId::parse(text) {
        assert!(!contains_key(workspace.as_str()));
        assert!(WorkspaceId::parse(workspace.as_str()).is_ok());
    }
    if let Ok(id) = KeyId::parse(text) {
        assert_eq!(id.as_str(), text);
    }
    // A page token decodes only for the workspace and owner filter it was made for, and
    // exactly round-trips.
    let acme = WorkspaceId::parse("acme").expect("a valid workspace id");
    let anyone = OwnerId::default();
    if let Ok(cursor) = PageCursor::decode(text, &acme, &anyone) {
        assert_eq!(cursor.encode(&acme, &anyone), text);
        let globex = WorkspaceId::parse("globex").expect("a valid workspace id");
        assert!(PageCursor::decode(text, &globex, &anyone).is_err());
        let alice = OwnerId::parse("alice").expect("a valid owner id");
        assert!(PageCursor::decode(text, &acme, &alice).is_err());
    }
    // An owner id is short visible ASCII and never a key.
    if let Ok(owner) = OwnerId::parse(text) {
        assert!(owner.as_str().len() <= 128);
        assert!(owner.as_str().bytes().all(|b| b.is_ascii_graphic()));
        assert!(!contains_key(owner.as_str()));
    }
    // A network shows in a canonical form that parses back to itself.
    if let Some(cidr) = Cidr::parse(text) {
        assert_eq!(Cidr::parse(&cidr.to_string()), Some(cidr));
    }
    // Networks and annotations, one per line, round-trip through their stored columns.
    let lines: Vec<&str> = text.split('\n').collect();
    if let Ok(cidrs) = AllowedCidrs::parse(&lines) {
        assert!(cidrs.to_strings().len() <= 64);
        assert_eq!(AllowedCidrs::from_column(&cidrs.to_column()), Ok(cidrs));
    }
    let pairs: Vec<(String, String)> = lines
        .iter()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Ok(annotations) = Annotations::parse(pairs.iter().map(|(k, v)| (k, v))) {
        assert!(
            annotations
                .iter()
                .all(|(k, v)| !contains_key(k) && !contains_key(v))
        );
        assert_eq!(
            Annotations::from_column(&annotations.to_column()),
            Ok(annotations)
        );
    }
    // Scopes, one per line: what is accepted is a sorted set of well-formed scopes that the
    // stored column gives back exactly.
    let items: Vec<&str> = text.split('\n').collect();
    if let Ok(scopes) = Scopes::parse(&items) {
        let held = scopes.as_slice();
        assert!(held.len() <= MAX_SCOPES);
        assert!(held.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(
            held.iter()
                .all(|scope| is_scope(scope) && !contains_key(scope))
        );
        assert!(
            items
                .iter()
                .all(|item| held.iter().any(|scope| scope == item))
        );
        let column = scopes.to_column();
        assert!(column_scopes(&column).eq(held.iter().map(String::as_str)));
    }
    if check_required(&items).is_ok() {
        assert!(items.len() <= MAX_SCOPES && items.iter().all(|item| is_scope(item)));
    }
    let _ = Actor::parse(Some(text), Some(text));
    let _ = Actor::parse(Some(text), Some("owner"));
    // The callers file's errors quote nothing but valid caller names: a token pasted into the
    // wrong field must not reach the log that reports the error.
    if let Err(err) = Callers::parse(text) {
        let message = err.to_string();
        for word in text.split_whitespace().filter(|w| w.len() >= 16) {
            if check_name(word).is_err() {
                assert!(!message.contains(word), "{message:?}");
            }
        }
    }
});
