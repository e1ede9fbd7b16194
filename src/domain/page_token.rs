use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use super::{InvalidInput, KeyId, OwnerId, WorkspaceId};

/// Where a ListKeys page ended: the last key's `(create_time, id)`, for keyset pagination.
/// On the wire it is an opaque token bound to its workspace and owner filter, so a token from
/// another workspace or filter (or a garbled one) is rejected rather than silently paging
/// elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub create_time_us: i64,
    pub id: KeyId,
}

const VERSION: u8 = 1;
const TAG_LEN: usize = 8;
const KEY_ID_LEN: usize = 24;
const TOKEN_LEN: usize = 1 + TAG_LEN + 8 + KEY_ID_LEN;

impl PageCursor {
    pub fn encode(&self, workspace: &WorkspaceId, owner: &OwnerId) -> String {
        let mut bytes = Vec::with_capacity(TOKEN_LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&list_tag(workspace, owner));
        bytes.extend_from_slice(&self.create_time_us.to_be_bytes());
        bytes.extend_from_slice(self.id.as_str().as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(
        token: &str,
        workspace: &WorkspaceId,
        owner: &OwnerId,
    ) -> Result<Self, InvalidInput> {
        let invalid = InvalidInput::PageTokenInvalid;
        // Bound the work before decoding anything a caller sent.
        if token.len() > 2 * TOKEN_LEN {
            return Err(invalid);
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid)?;
        if bytes.len() != TOKEN_LEN
            || bytes[0] != VERSION
            || bytes[1..=TAG_LEN] != list_tag(workspace, owner)
        {
            return Err(invalid);
        }
        let (time, id) = bytes[1 + TAG_LEN..].split_at(8);
        let create_time_us = i64::from_be_bytes(time.try_into().map_err(|_| invalid)?);
        let id = std::str::from_utf8(id).map_err(|_| invalid)?;
        let id = KeyId::parse(id).map_err(|_| invalid)?;
        Ok(Self { create_time_us, id })
    }
}

/// Where a ListKeyEvents page ended: the last event's id. Opaque on the wire and bound to the
/// filter it was issued for, the workspace and the key (or none): a token from one key's
/// trail would otherwise page on through another's from the wrong place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventCursor {
    pub before: i64,
}

const EVENT_VERSION: u8 = 2;
const EVENT_TOKEN_LEN: usize = 1 + TAG_LEN + 8;

impl EventCursor {
    pub(crate) fn encode(&self, workspace: &WorkspaceId, key: Option<&KeyId>) -> String {
        let mut bytes = Vec::with_capacity(EVENT_TOKEN_LEN);
        bytes.push(EVENT_VERSION);
        bytes.extend_from_slice(&filter_tag(workspace, key));
        bytes.extend_from_slice(&self.before.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub(crate) fn decode(
        token: &str,
        workspace: &WorkspaceId,
        key: Option<&KeyId>,
    ) -> Result<Self, InvalidInput> {
        let invalid = InvalidInput::PageTokenInvalid;
        if token.len() > 2 * EVENT_TOKEN_LEN {
            return Err(invalid);
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid)?;
        if bytes.len() != EVENT_TOKEN_LEN
            || bytes[0] != EVENT_VERSION
            || bytes[1..=TAG_LEN] != filter_tag(workspace, key)
        {
            return Err(invalid);
        }
        let before = <[u8; 8]>::try_from(&bytes[1 + TAG_LEN..]).map_err(|_| invalid)?;
        Ok(Self {
            before: i64::from_be_bytes(before),
        })
    }
}

/// A ListKeys filter's tag: without an owner, the workspace's own, so tokens issued before
/// the owner filter existed still page on.
fn list_tag(workspace: &WorkspaceId, owner: &OwnerId) -> [u8; TAG_LEN] {
    if owner.is_empty() {
        return filter_tag(workspace, None);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(workspace.as_str().as_bytes());
    // \x01 where a key filter has \0: no owner's tag is also a key's.
    hasher.update(b"\x01");
    hasher.update(owner.as_str().as_bytes());
    let mut tag = [0; TAG_LEN];
    tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
    tag
}

/// A short hash of the filters a token was issued for. With no key it is the workspace's own
/// tag, so tokens issued before keys were bound still page on.
fn filter_tag(workspace: &WorkspaceId, key: Option<&KeyId>) -> [u8; TAG_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(workspace.as_str().as_bytes());
    if let Some(key) = key {
        // A workspace id holds no NUL, so no workspace's tag is also a workspace-and-key tag.
        hasher.update(b"\0");
        hasher.update(key.as_str().as_bytes());
    }
    let mut tag = [0; TAG_LEN];
    tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
    tag
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ws(s: &str) -> WorkspaceId {
        WorkspaceId::parse(s).unwrap()
    }

    fn none() -> OwnerId {
        OwnerId::default()
    }

    #[test]
    fn a_list_token_decodes_only_with_the_owner_filter_it_was_issued_for() {
        let cursor = PageCursor {
            create_time_us: 7,
            id: KeyId::generate(),
        };
        let (alice, bob) = (
            OwnerId::parse("alice").unwrap(),
            OwnerId::parse("bob").unwrap(),
        );
        for issued in [none(), alice.clone()] {
            let token = cursor.encode(&ws("acme"), &issued);
            for presented in [none(), alice.clone(), bob.clone()] {
                let expected = if presented == issued {
                    Ok(cursor.clone())
                } else {
                    Err(InvalidInput::PageTokenInvalid)
                };
                assert_eq!(
                    PageCursor::decode(&token, &ws("acme"), &presented),
                    expected
                );
            }
        }
    }

    proptest! {
        #[test]
        fn any_cursor_round_trips_in_its_workspace_only(
            create_time_us in any::<i64>(),
            workspace in "[a-z0-9_-]{1,40}",
            other in "[a-z0-9_-]{1,40}",
        ) {
            prop_assume!(workspace != other);
            let cursor = PageCursor { create_time_us, id: KeyId::generate() };
            let token = cursor.encode(&ws(&workspace), &none());
            prop_assert_eq!(PageCursor::decode(&token, &ws(&workspace), &none()), Ok(cursor));
            prop_assert_eq!(
                PageCursor::decode(&token, &ws(&other), &none()),
                Err(InvalidInput::PageTokenInvalid)
            );
        }

        #[test]
        fn event_cursors_round_trip_in_their_workspace_only_and_are_no_key_cursors(
            before in any::<i64>(),
            workspace in "[a-z0-9_-]{1,40}",
            other in "[a-z0-9_-]{1,40}",
        ) {
            prop_assume!(workspace != other);
            let cursor = EventCursor { before };
            let token = cursor.encode(&ws(&workspace), None);
            prop_assert_eq!(EventCursor::decode(&token, &ws(&workspace), None), Ok(cursor));
            prop_assert!(EventCursor::decode(&token, &ws(&other), None).is_err());
            prop_assert!(PageCursor::decode(&token, &ws(&workspace), &none()).is_err());
        }

        #[test]
        fn event_cursors_decode_only_with_the_key_filter_they_were_issued_for(
            before in any::<i64>(),
            workspace in "[a-z0-9_-]{1,40}",
        ) {
            let (one, another) = (KeyId::generate(), KeyId::generate());
            let cursor = EventCursor { before };
            let workspace = ws(&workspace);
            for issued in [None, Some(&one)] {
                let token = cursor.encode(&workspace, issued);
                for presented in [None, Some(&one), Some(&another)] {
                    let expected = if presented == issued {
                        Ok(cursor)
                    } else {
                        Err(InvalidInput::PageTokenInvalid)
                    };
                    prop_assert_eq!(EventCursor::decode(&token, &workspace, presented), expected);
                }
            }
        }

        #[test]
        fn any_text_is_a_cursor_only_if_it_is_exactly_one(text in "\\PC{0,100}") {
            if let Ok(cursor) = PageCursor::decode(&text, &ws("acme"), &none()) {
                prop_assert_eq!(cursor.encode(&ws("acme"), &none()), text);
            }
        }
    }

    #[test]
    fn a_token_round_trips_in_its_workspace() {
        let cursor = PageCursor {
            create_time_us: 1_780_000_000_123_456,
            id: KeyId::generate(),
        };
        let token = cursor.encode(&ws("acme"), &none());
        assert_eq!(PageCursor::decode(&token, &ws("acme"), &none()), Ok(cursor));
    }

    #[test]
    fn an_event_token_for_the_whole_workspace_keeps_the_workspace_tag_of_earlier_releases() {
        // As the release before key-bound tokens encoded it: version, blake3(workspace)[..8], id.
        let mut bytes = vec![EVENT_VERSION];
        bytes.extend_from_slice(&blake3::hash(b"acme").as_bytes()[..TAG_LEN]);
        bytes.extend_from_slice(&42i64.to_be_bytes());
        let earlier = URL_SAFE_NO_PAD.encode(bytes);

        assert_eq!(
            EventCursor::decode(&earlier, &ws("acme"), None),
            Ok(EventCursor { before: 42 })
        );
        assert_eq!(
            EventCursor { before: 42 }.encode(&ws("acme"), None),
            earlier
        );
    }

    #[test]
    fn a_token_from_another_workspace_is_rejected() {
        let cursor = PageCursor {
            create_time_us: 1,
            id: KeyId::generate(),
        };
        let token = cursor.encode(&ws("acme"), &none());
        assert_eq!(
            PageCursor::decode(&token, &ws("globex"), &none()),
            Err(InvalidInput::PageTokenInvalid)
        );
    }

    #[test]
    fn garbled_tokens_are_rejected() {
        let token = PageCursor {
            create_time_us: 1,
            id: KeyId::generate(),
        }
        .encode(&ws("acme"), &none());
        let truncated = &token[..token.len() - 2];
        let flipped = format!(
            "{}{}",
            if token.starts_with('A') { 'B' } else { 'A' },
            &token[1..]
        );
        for bad in ["garbage", "!!!!", truncated, &flipped, &"A".repeat(10_000)] {
            assert_eq!(
                PageCursor::decode(bad, &ws("acme"), &none()),
                Err(InvalidInput::PageTokenInvalid),
                "{bad:?}"
            );
        }
    }
}
