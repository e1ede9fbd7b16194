/// The person a management call acts for, from `x-actor-id` / `x-actor-role` metadata set by
/// the admin backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    id: String,
    role: Role,
}

/// The roles that may manage keys; the product reserves Developer settings to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Owner,
    Admin,
}

impl Role {
    /// As `x-actor-role` spells it, and as the audit trail records it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
        }
    }
}

const ACTOR_ID_MAX_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActorError {
    /// No actor, or one we cannot read: the caller did not say who acts.
    #[error(
        "x-actor-id and x-actor-role metadata are required (actor id: 1 to 128 visible characters)"
    )]
    Missing,
    /// Someone acts, but their role may not manage keys.
    #[error("only workspace owners and admins may manage API keys")]
    RoleNotAllowed,
    /// The metadata header named was sent more than once. Taking either value would let a
    /// client whose metadata a backend forwards, and then appends to, choose who acts.
    #[error("{0} metadata must be sent once, not appended to")]
    Duplicated(&'static str),
}

impl Actor {
    pub fn parse(id: Option<&str>, role: Option<&str>) -> Result<Self, ActorError> {
        let id = id.map(str::trim).unwrap_or_default();
        let role = role.map(str::trim).unwrap_or_default();
        // The id is shown in the audit trail: it must read as what it is.
        let readable_id = super::legibility(id) == super::Legibility::Legible
            && id.chars().count() <= ACTOR_ID_MAX_LEN
            // The actor id is stored and logged; a pasted secret must not be.
            && !super::contains_key(id);
        if !readable_id || role.is_empty() {
            return Err(ActorError::Missing);
        }
        let role = if role.eq_ignore_ascii_case("owner") {
            Role::Owner
        } else if role.eq_ignore_ascii_case("admin") {
            Role::Admin
        } else {
            return Err(ActorError::RoleNotAllowed);
        };
        Ok(Self {
            id: id.to_owned(),
            role,
        })
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn role(&self) -> Role {
        self.role
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_admins_may_act() {
        let owner = Actor::parse(Some("user_1"), Some("owner")).unwrap();
        assert_eq!((owner.id(), owner.role()), ("user_1", Role::Owner));
        assert_eq!(
            Actor::parse(Some("u"), Some("Admin")).unwrap().role(),
            Role::Admin
        );
    }

    #[test]
    fn other_roles_are_not_allowed() {
        for role in ["member", "viewer", "root", "owner,admin"] {
            assert_eq!(
                Actor::parse(Some("u"), Some(role)),
                Err(ActorError::RoleNotAllowed)
            );
        }
    }

    #[test]
    fn a_missing_or_unreadable_actor_is_missing() {
        assert_eq!(Actor::parse(None, Some("owner")), Err(ActorError::Missing));
        assert_eq!(Actor::parse(Some("u"), None), Err(ActorError::Missing));
        assert_eq!(
            Actor::parse(Some("  "), Some("owner")),
            Err(ActorError::Missing)
        );
        assert_eq!(
            Actor::parse(Some(&"u".repeat(129)), Some("owner")),
            Err(ActorError::Missing)
        );
        assert_eq!(
            Actor::parse(Some("a\u{7}b"), Some("owner")),
            Err(ActorError::Missing)
        );
    }

    #[test]
    fn an_actor_id_with_invisible_or_reordering_characters_is_unreadable() {
        for id in [
            "user\u{202E}1",
            "\u{200B}",
            "user\u{FEFF}",
            "u\u{E0041}",
            "u\u{2028}v",
        ] {
            assert_eq!(
                Actor::parse(Some(id), Some("owner")),
                Err(ActorError::Missing),
                "{id:?}"
            );
        }
        assert_eq!(
            Actor::parse(Some("ünïcode@例え.jp"), Some("owner")).map(|a| a.id().to_owned()),
            Ok("ünïcode@例え.jp".to_owned())
        );
    }
}
