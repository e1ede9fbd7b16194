//! Credit accounts (`key_credits`): each account's balance as no replica has leased it, for
//! the period it belongs to. A lease is one compare-and-set on the account's row, so two
//! replicas never take the same credit; a refill is the first lease of a new period, so it
//! happens once per period whoever takes it.

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, Statement, Value};

use super::{Store, StoreError, sql::Placeholders};
use crate::domain::{
    CreditLease, Credits, Key, Refill, RefillInterval, credit_period_us, lease_size,
};

/// Slices a replica returns: what it leased of one setting and period and did not spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreditReturn {
    pub account: String,
    pub generation: i64,
    pub period_start_us: i64,
    pub amount: i64,
}

/// An account as stored.
struct Account {
    generation: i64,
    remaining: i64,
    period_start_us: i64,
    refill: Option<Refill>,
}

impl Account {
    fn read(row: &sea_orm::QueryResult) -> Result<Self, DbErr> {
        let amount: Option<i64> = row.try_get("", "refill_amount")?;
        let interval: String = row.try_get("", "refill_interval")?;
        let day: i32 = row.try_get("", "refill_day")?;
        let interval = match interval.as_str() {
            "daily" => Some(RefillInterval::Daily),
            "monthly" => Some(RefillInterval::Monthly),
            _ => None,
        };
        let refill = amount.zip(interval).map(|(amount, interval)| Refill {
            amount,
            interval,
            day_of_month: u8::try_from(day).unwrap_or(0),
        });
        Ok(Self {
            generation: row.try_get("", "generation")?,
            remaining: row.try_get("", "remaining")?,
            period_start_us: row.try_get("", "period_start_us")?,
            refill,
        })
    }

    /// The balance and period at `now_us`: a period that ended is refilled (the row still
    /// says the old one until a lease writes it). A replica whose clock is behind the one
    /// that wrote the row keeps the row's period.
    fn at(&self, now_us: i64) -> (i64, i64, i64) {
        let (start, end) = credit_period_us(self.refill.as_ref(), now_us);
        match self.refill {
            Some(refill) if start > self.period_start_us => (refill.amount, start, end),
            _ => {
                let (_, end) = credit_period_us(self.refill.as_ref(), self.period_start_us);
                (self.remaining, self.period_start_us, end)
            }
        }
    }
}

const ACCOUNT_COLUMNS: &str =
    "generation, remaining, period_start_us, refill_amount, refill_interval, refill_day";

/// How many times a lease tries its compare-and-set before it reports the account busy.
const LEASE_ATTEMPTS: usize = 64;

impl Store {
    /// Sets an account's balance, in the transaction of the key change that sets it: a new
    /// generation, so what replicas leased of the old one is void. The generation is
    /// `generation` or, when the account was set before (a key whose credits were cleared
    /// and set again), one past the stored one: an account's generations only grow. Returns
    /// the generation written.
    pub(super) async fn set_credits(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        generation: i64,
        credits: &Credits,
        now_us: i64,
    ) -> Result<i64, DbErr> {
        let mut p = Placeholders::new(self.backend());
        let sql = format!(
            "SELECT generation FROM key_credits WHERE account_id = {}",
            p.next()
        );
        let stored = txn
            .query_one_raw(Statement::from_sql_and_values(
                self.backend(),
                sql,
                [account.into()],
            ))
            .await?
            .map(|row| row.try_get::<i64>("", "generation"))
            .transpose()?;
        let generation = stored.map_or(generation, |stored| generation.max(stored + 1));
        let (period_start, _) = credit_period_us(credits.refill.as_ref(), now_us);
        let (amount, interval, day) = match credits.refill {
            Some(refill) => (
                Some(refill.amount),
                match refill.interval {
                    RefillInterval::Daily => "daily",
                    RefillInterval::Monthly => "monthly",
                },
                i32::from(refill.day_of_month),
            ),
            None => (None, "", 0),
        };
        let mut p = Placeholders::new(self.backend());
        let sql = format!(
            "INSERT INTO key_credits (account_id, {ACCOUNT_COLUMNS}) \
             VALUES ({}, {}, {}, {}, {}, {}, {}) \
             ON CONFLICT (account_id) DO UPDATE SET generation = excluded.generation, \
             remaining = excluded.remaining, period_start_us = excluded.period_start_us, \
             refill_amount = excluded.refill_amount, refill_interval = excluded.refill_interval, \
             refill_day = excluded.refill_day",
            p.next(),
            p.next(),
            p.next(),
            p.next(),
            p.next(),
            p.next(),
            p.next(),
        );
        let values: [Value; 7] = [
            account.into(),
            generation.into(),
            credits.remaining.into(),
            period_start.into(),
            amount.into(),
            interval.into(),
            day.into(),
        ];
        txn.execute_raw(Statement::from_sql_and_values(self.backend(), sql, values))
            .await?;
        Ok(generation)
    }

    async fn account(&self, account: &str) -> Result<Option<Account>, StoreError> {
        let mut p = Placeholders::new(self.backend());
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM key_credits WHERE account_id = {}",
            p.next()
        );
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                self.backend(),
                sql,
                [account.into()],
            ))
            .await?;
        Ok(row.map(|row| Account::read(&row)).transpose()?)
    }

    /// Leases a slice of the account at `now_us`: at least `need` (0: whatever a lease
    /// takes; see [`lease_size`]), or nothing when it has less. `None` when the account
    /// does not exist.
    pub(crate) async fn lease_credits(
        &self,
        account: &str,
        need: i64,
        now_us: i64,
    ) -> Result<Option<CreditLease>, StoreError> {
        for _ in 0..LEASE_ATTEMPTS {
            let Some(stored) = self.account(account).await? else {
                return Ok(None);
            };
            let (remaining, start, end) = stored.at(now_us);
            let granted = lease_size(remaining, need);
            let lease = CreditLease {
                generation: stored.generation,
                period_start_us: start,
                period_end_us: end,
                granted,
                unleased: remaining - granted,
            };
            if granted == 0 && start == stored.period_start_us {
                // Nothing to take and nothing to renew: the read is the answer.
                return Ok(Some(lease));
            }
            let mut p = Placeholders::new(self.backend());
            let sql = format!(
                "UPDATE key_credits SET remaining = {}, period_start_us = {} \
                 WHERE account_id = {} AND generation = {} AND period_start_us = {} \
                 AND remaining = {}",
                p.next(),
                p.next(),
                p.next(),
                p.next(),
                p.next(),
                p.next(),
            );
            let values: [Value; 6] = [
                lease.unleased.into(),
                start.into(),
                account.into(),
                stored.generation.into(),
                stored.period_start_us.into(),
                stored.remaining.into(),
            ];
            let written = self
                .db
                .execute_raw(Statement::from_sql_and_values(self.backend(), sql, values))
                .await?;
            if written.rows_affected() == 1 {
                return Ok(Some(lease));
            }
            // Another replica leased in between: read again.
        }
        Err(StoreError::Unavailable(DbErr::Custom(format!(
            "credit account stayed busy for {LEASE_ATTEMPTS} attempts"
        ))))
    }

    /// Gives back what replicas leased and did not spend. A return of a setting that was
    /// replaced, or of a period that was refilled, is void.
    pub(crate) async fn return_credits(&self, returns: &[CreditReturn]) -> Result<(), StoreError> {
        for given in returns {
            let mut p = Placeholders::new(self.backend());
            let sql = format!(
                "UPDATE key_credits SET remaining = remaining + {} \
                 WHERE account_id = {} AND generation = {} AND period_start_us = {}",
                p.next(),
                p.next(),
                p.next(),
                p.next(),
            );
            let values: [Value; 4] = [
                given.amount.into(),
                given.account.as_str().into(),
                given.generation.into(),
                given.period_start_us.into(),
            ];
            self.db
                .execute_raw(Statement::from_sql_and_values(self.backend(), sql, values))
                .await?;
        }
        Ok(())
    }

    /// Fills each key's `credits_remaining` with its account's balance at `now_us`, and its
    /// refill with the account's.
    pub(crate) async fn fill_credits(
        &self,
        keys: &mut [&mut Key],
        now_us: i64,
    ) -> Result<(), StoreError> {
        let accounts: Vec<String> = keys
            .iter()
            .filter_map(|key| key.credits.plan().map(|plan| String::from(&*plan.account)))
            .collect();
        if accounts.is_empty() {
            return Ok(());
        }
        let mut balances = HashMap::with_capacity(accounts.len());
        for chunk in accounts.chunks(500) {
            let mut p = Placeholders::new(self.backend());
            let marks: Vec<String> = chunk.iter().map(|_| p.next()).collect();
            let sql = format!(
                "SELECT account_id, {ACCOUNT_COLUMNS} FROM key_credits WHERE account_id IN ({})",
                marks.join(", ")
            );
            let values: Vec<Value> = chunk
                .iter()
                .map(|account| account.as_str().into())
                .collect();
            let rows = self
                .db
                .query_all_raw(Statement::from_sql_and_values(self.backend(), sql, values))
                .await?;
            for row in rows {
                let account: String = row.try_get("", "account_id")?;
                let stored = Account::read(&row)?;
                let (remaining, _, _) = stored.at(now_us);
                balances.insert(account, (remaining, stored.refill));
            }
        }
        for key in keys.iter_mut() {
            let Some(plan) = key.credits.0.as_mut() else {
                continue;
            };
            if let Some(&(remaining, refill)) = balances.get(&*plan.account) {
                key.credits_remaining = Some(remaining);
                // The account's refill, as its last setting made it: a rotated key's own row
                // keeps the one it had when its successor took the balance over.
                plan.refill = refill;
            }
        }
        Ok(())
    }
}
