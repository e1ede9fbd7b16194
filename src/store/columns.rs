//! How the domain types without a sea-orm derive are stored: a key's hash is 32 bytes in a
//! binary column, and a key id is a primary key that is never generated from a number.

use sea_orm::{
    ColIdx, DbErr, QueryResult, TryFromU64, TryGetError, TryGetable, Value,
    sea_query::{ArrayType, ColumnType, Nullable, ValueType, ValueTypeErr},
};

use crate::domain::{KeyHash, KeyId};

impl From<KeyHash> for Value {
    fn from(hash: KeyHash) -> Self {
        Value::Bytes(Some(hash.as_bytes().to_vec()))
    }
}

impl TryGetable for KeyHash {
    fn try_get_by<I: ColIdx>(res: &QueryResult, index: I) -> Result<Self, TryGetError> {
        let bytes = Vec::<u8>::try_get_by(res, index)?;
        KeyHash::from_slice(&bytes).ok_or_else(|| {
            TryGetError::DbErr(DbErr::Type(format!(
                "a stored key hash is {} bytes, not 32",
                bytes.len()
            )))
        })
    }
}

impl ValueType for KeyHash {
    fn try_from(value: Value) -> Result<Self, ValueTypeErr> {
        let bytes = <Vec<u8> as ValueType>::try_from(value)?;
        KeyHash::from_slice(&bytes).ok_or(ValueTypeErr)
    }

    fn type_name() -> String {
        "KeyHash".to_owned()
    }

    fn array_type() -> ArrayType {
        <Vec<u8> as ValueType>::array_type()
    }

    fn column_type() -> ColumnType {
        <Vec<u8> as ValueType>::column_type()
    }
}

impl Nullable for KeyHash {
    fn null() -> Value {
        Value::Bytes(None)
    }
}

impl sea_orm::IntoActiveValue<KeyHash> for KeyHash {
    fn into_active_value(self) -> sea_orm::ActiveValue<KeyHash> {
        sea_orm::ActiveValue::Set(self)
    }
}

impl TryFromU64 for KeyId {
    fn try_from_u64(_: u64) -> Result<Self, DbErr> {
        Err(DbErr::ConvertFromU64("KeyId"))
    }
}
