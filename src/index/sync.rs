//! Keeps a replica's index in step with the database: PostgreSQL LISTEN/NOTIFY for speed, a
//! catch-up by revision on every notification, every (re)connect and every poll for
//! certainty, and batched flushes of last-used times and usage.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use sea_orm::{DatabaseBackend, sqlx::postgres::PgListener};
use tokio::{sync::watch, task::JoinHandle};

use super::KeyIndex;
use crate::store::{CHANGES_CHANNEL, ChangeCursor, KeyHour, Store, StoreError};

/// Rows read per catch-up query; start-up loads the whole table in such pages.
const BATCH: u64 = 20_000;
/// Revision ranges loaded side by side at start-up.
const LOAD_SLICES: i64 = 2;
/// Key-hours of usage held while the database cannot take them (a few hundred bytes each);
/// past this, new ones are dropped and counted, so an outage cannot exhaust memory.
const MAX_UNWRITTEN_HOURS: usize = 200_000;
/// Attempts of the last flush at shutdown, a moment apart.
const SHUTDOWN_FLUSH_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, Copy)]
pub struct SyncSettings {
    /// How often to catch up even without a notification (the bound when notifications are
    /// lost, and the only mechanism on SQLite).
    pub poll_interval: Duration,
    /// How old the last successful sync may be before ValidateKey fails closed.
    pub staleness_bound: Duration,
    /// How often last-used times and usage are written to the database.
    pub flush_interval: Duration,
}

#[derive(Debug)]
pub struct Syncer {
    store: Store,
    index: Arc<KeyIndex>,
    settings: SyncSettings,
    cursor: tokio::sync::Mutex<ChangeCursor>,
    epoch: Instant,
    /// Milliseconds after `epoch` at which the last successful catch-up started.
    last_sync_ms: AtomicU64,
    /// Flushes that failed (and were retried by the next).
    pub(crate) flush_failures: Counter,
    /// Answers counted in memory but dropped, the unwritten backlog being full.
    pub(crate) usage_dropped: Counter,
    /// 1 while the PostgreSQL change listener is connected and listening, else 0.
    pub(crate) listener_connected: Gauge,
    /// Credit leases taken from the database, and those that failed.
    pub(crate) credit_leases: Counter,
    pub(crate) credit_lease_failures: Counter,
    /// Credits given back to their accounts, and credits a failed return lost.
    pub(crate) credits_given_back: Counter,
    pub(crate) credits_lost: Counter,
    /// Leases of rate-limit windows taken from the database, and those that failed.
    pub(crate) rate_limit_leases: Counter,
    pub(crate) rate_limit_lease_failures: Counter,
}

/// What a flush took but could not write yet.
#[derive(Debug, Default)]
struct Unwritten {
    uses: HashMap<String, (i64, Option<IpAddr>)>,
    hours: HashMap<(String, i64), KeyHour>,
}

impl Syncer {
    pub fn new(store: Store, index: Arc<KeyIndex>, settings: SyncSettings) -> Self {
        Self {
            store,
            index,
            settings,
            cursor: tokio::sync::Mutex::default(),
            epoch: Instant::now(),
            last_sync_ms: AtomicU64::new(0),
            flush_failures: Counter::default(),
            usage_dropped: Counter::default(),
            listener_connected: Gauge::default(),
            credit_leases: Counter::default(),
            credit_lease_failures: Counter::default(),
            credits_given_back: Counter::default(),
            credits_lost: Counter::default(),
            rate_limit_leases: Counter::default(),
            rate_limit_lease_failures: Counter::default(),
        }
    }

    pub(crate) fn index(&self) -> &Arc<KeyIndex> {
        &self.index
    }

    /// The start-up load; returns how many keys the index holds. Room for every stored key at
    /// once; then, from a SQLite file, one snapshot read off the async workers, and from
    /// PostgreSQL, slices of the revision range read in parallel (decoding rows is most of the
    /// cost, and each slice decodes on its own connection); then a catch-up from the top
    /// revision seen.
    ///
    /// Every revision up to `top` is committed once `top` is visible (revisions follow commit
    /// order), so the slices cover every row as of `top`; a row changed meanwhile moves above
    /// `top` and arrives with the catch-up, which wins by revision.
    pub async fn load(&self) -> Result<usize, StoreError> {
        let mut cursor = self.cursor.lock().await;
        let started = self.epoch.elapsed();
        let stored = self.store.count().await?;
        self.index
            .reserve(usize::try_from(stored).unwrap_or(usize::MAX));
        let top = match self.store.sqlite_file().await? {
            Some(path) => {
                let index = self.index.clone();
                tokio::task::spawn_blocking(move || {
                    Store::scan_sqlite_file(&path, |row| index.apply(&row))
                })
                .await
                .map_err(|err| StoreError::Internal(sea_orm::DbErr::Custom(err.to_string())))??
            }
            None => {
                let top = self.store.max_revision().await?;
                self.load_slices(stored, top).await?;
                top
            }
        };
        // Rows at `top` itself are read again by the next catch-up; applying twice is harmless.
        *cursor = ChangeCursor {
            revision: top,
            id: String::new(),
        };
        self.last_sync_ms
            .fetch_max(started.as_millis() as u64, Ordering::Release);
        drop(cursor);
        self.catch_up().await?;
        Ok(self.index.len())
    }

    /// Reads revisions `0..=top` in pages, from a few revision ranges side by side.
    async fn load_slices(&self, stored: u64, top: i64) -> Result<(), StoreError> {
        let slices = if stored < 2 * BATCH { 1 } else { LOAD_SLICES };
        let width = top / slices + 1;
        let mut tasks = tokio::task::JoinSet::new();
        for slice in 0..slices {
            let (store, index) = (self.store.clone(), self.index.clone());
            let start = slice * width;
            let end = if slice + 1 == slices {
                top
            } else {
                start + width - 1
            };
            tasks.spawn(async move { load_slice(&store, &index, start..=end).await });
        }
        while let Some(result) = tasks.join_next().await {
            result
                .map_err(|err| StoreError::Internal(sea_orm::DbErr::Custom(err.to_string())))??;
        }
        Ok(())
    }

    /// Applies every change after the last one applied; returns how many rows it read.
    pub async fn catch_up(&self) -> Result<usize, StoreError> {
        let mut cursor = self.cursor.lock().await;
        // What we read is at least as fresh as the moment we started reading.
        let started = self.epoch.elapsed();
        let mut applied = 0;
        loop {
            let rows = self.store.changes_since(&cursor, None, BATCH).await?;
            for row in &rows {
                self.index.apply(row);
            }
            applied += rows.len();
            if let Some(last) = rows.last() {
                *cursor = ChangeCursor {
                    revision: last.revision,
                    id: last.id.clone(),
                };
            }
            if (rows.len() as u64) < BATCH {
                break;
            }
        }
        self.last_sync_ms
            .fetch_max(started.as_millis() as u64, Ordering::Release);
        Ok(applied)
    }

    /// How long ago the last successful sync started.
    pub(crate) fn staleness(&self) -> Duration {
        let last = Duration::from_millis(self.last_sync_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Whether the index may still answer: its last sync is within the bound.
    pub(crate) fn is_fresh(&self) -> bool {
        self.staleness() <= self.settings.staleness_bound
    }

    /// Starts the background loops; they end when `stop` turns true. The receiver turns
    /// false while the index is stale and true again once it is fresh: what health reports.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> (watch::Receiver<bool>, Vec<JoinHandle<()>>) {
        let (fresh_tx, fresh) = watch::channel(true);
        let mut tasks = vec![
            tokio::spawn(self.clone().poll(stop.clone())),
            tokio::spawn(self.clone().watch_freshness(fresh_tx, stop.clone())),
            tokio::spawn(self.clone().flush_loop(stop.clone())),
        ];
        if self.store.backend() == DatabaseBackend::Postgres {
            tasks.push(tokio::spawn(self.clone().listen(stop)));
        }
        (fresh, tasks)
    }

    async fn poll(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
            let mut synced = self.catch_up().await;
            // Freshness runs from the start of the last good read, and a read that waited
            // out an outage for a connection started long ago: read again at once, so a
            // replica that recovers is fresh from now, not stale again a moment after
            // reporting SERVING (found by the outage test of the reliability suite).
            if synced.is_ok() && self.staleness() > self.settings.staleness_bound / 2 {
                synced = self.catch_up().await;
            }
            match synced {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!("database reachable again; index in sync");
                }
                Ok(_) => {}
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(error = %err, "cannot sync the key index; answering from memory until the staleness bound");
                }
                Err(_) => {}
            }
        }
    }

    /// Keeps `fresh` in step with the index's freshness. A loop of its own: a sync can wait
    /// seconds for a connection while the database is down (the pool's acquire timeout), and
    /// health must turn NOT_SERVING when the bound passes, not when that wait ends.
    async fn watch_freshness(
        self: Arc<Self>,
        fresh: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let every = (self.settings.poll_interval)
            .min(self.settings.staleness_bound / 4)
            .max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now_fresh = self.is_fresh();
            if fresh.send_if_modified(|fresh| std::mem::replace(fresh, now_fresh) != now_fresh) {
                if now_fresh {
                    tracing::info!("key index fresh again: SERVING");
                } else {
                    tracing::error!(bound = ?self.settings.staleness_bound, "key index stale: ValidateKey fails closed, NOT_SERVING");
                }
            }
        }
    }

    async fn listen(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let url = with_application_name(self.store.url(), "apikeys-listener");
        let mut reported = false;
        loop {
            match self.listen_once(&url, &mut stop).await {
                Ok(()) => return,
                Err(err) if !reported => {
                    reported = true;
                    tracing::warn!(error = %err, "change listener disconnected; reconnecting (polling covers the gap)");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// One listening connection: returns Ok when asked to stop, Err when the connection fails.
    async fn listen_once(
        &self,
        url: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), sea_orm::sqlx::Error> {
        let mut listener = PgListener::connect(url).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        self.listener_connected.set(1);
        let listened = async {
            // Anything announced while we were not listening is caught up now.
            self.catch_up_quietly().await;
            loop {
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    // `None`: the connection dropped and came back; notifications may be lost.
                    notification = listener.try_recv() => { notification?; }
                }
                self.catch_up_quietly().await;
            }
        }
        .await;
        self.listener_connected.set(0);
        listened
    }

    async fn catch_up_quietly(&self) {
        if let Err(err) = self.catch_up().await {
            tracing::debug!(error = %err, "catch-up failed; the poll retries");
        }
    }

    async fn flush_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut unwritten = Unwritten::default();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                () = tokio::time::sleep(self.settings.flush_interval) => {}
            }
            self.flush(&mut unwritten).await;
            self.give_back_credits(false).await;
        }
        // What this replica leased and did not spend goes back before it exits.
        self.give_back_credits(true).await;
        // Last chance before exit: the graceful shutdown keeps what was recorded, riding out
        // a brief database hiccup.
        for attempt in 1..=SHUTDOWN_FLUSH_ATTEMPTS {
            if self.flush(&mut unwritten).await {
                return;
            }
            if attempt < SHUTDOWN_FLUSH_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let answers: u64 = unwritten
            .hours
            .values()
            .map(|hour| hour.usage.counts.total())
            .sum();
        tracing::error!(
            keys = unwritten.uses.len(),
            answers,
            "database unavailable at shutdown: last-used times and usage not written"
        );
    }

    /// Gives back to their accounts the credit slices idle for a while (`all`: every one).
    /// A return that fails is not tried again: it may have been applied with its answer
    /// lost, and a second would add credits nobody had; the slice is lost instead.
    async fn give_back_credits(&self, all: bool) {
        if all {
            // No lease starts from now on; those under way finish first (each holds its
            // account's gate), so what they bring is given back too.
            for gate in self.index.close_credits() {
                drop(gate.lock().await);
            }
        }
        if all {
            self.give_back_windows().await;
        } else {
            self.index.forget_idle_window_holders();
        }
        for account in self.index.credit_returns_due(all) {
            let gate = self.index.lease_gate(&account);
            let _turn = gate.lock().await;
            let Some(given) = self.index.take_credit_return(&account) else {
                continue;
            };
            let amount = u64::try_from(given.amount).unwrap_or(0);
            match self
                .store
                .return_credits(std::slice::from_ref(&given))
                .await
            {
                Ok(()) => {
                    self.credits_given_back.inc_by(amount);
                }
                Err(err) => {
                    self.credits_lost.inc_by(amount);
                    tracing::warn!(error = %err, credits = given.amount, "cannot give back leased credits; they are lost");
                }
            }
        }
    }

    /// Gives back to their windows' budgets the slices of rate-limit windows held (at a
    /// graceful stop, once no lease starts), so the other replicas may admit them; a return
    /// to a window that ended changes nothing. A return that fails is not tried again (the
    /// units stay leased until the window ends). One transaction for all.
    async fn give_back_windows(&self) {
        let mut returns: Vec<(String, i64)> = self
            .index
            .take_window_returns()
            .into_iter()
            .map(|(call, amount)| (call.account, amount))
            .collect();
        // In window order, as leases lock them.
        returns.sort();
        if returns.is_empty() {
            return;
        }
        if let Err(err) = self.store.return_windows(&returns).await {
            tracing::warn!(error = %err, windows = returns.len(), "cannot give back rate-limit windows' slices; they stay leased until their windows end");
        }
    }

    /// Writes recorded uses and usage; on failure keeps them (merged, one entry per key or
    /// key-hour) for the next flush. True when nothing is left unwritten.
    async fn flush(&self, unwritten: &mut Unwritten) -> bool {
        for taken in self.index.take_activity() {
            if let Some((at, ip)) = taken.last_used {
                let entry = unwritten
                    .uses
                    .entry(taken.key_id.clone())
                    .or_insert((at, ip));
                if at >= entry.0 {
                    *entry = (at, ip);
                }
            }
            let Some(usage) = taken.usage else {
                continue;
            };
            let held = unwritten.hours.len();
            match unwritten
                .hours
                .entry((taken.key_id.clone(), usage.start_time_us))
            {
                std::collections::hash_map::Entry::Occupied(mut hour) => {
                    hour.get_mut().usage.merge(&usage)
                }
                std::collections::hash_map::Entry::Vacant(_) if held >= MAX_UNWRITTEN_HOURS => {
                    let answers = usage.counts.total();
                    if self.usage_dropped.inc_by(answers) == 0 {
                        tracing::error!(
                            held,
                            "usage backlog full while the database is unavailable; dropping new key-hours"
                        );
                    }
                }
                std::collections::hash_map::Entry::Vacant(hour) => {
                    hour.insert(KeyHour {
                        key_id: taken.key_id,
                        workspace_id: taken.workspace_id,
                        usage,
                    });
                }
            }
        }
        let mut written = true;
        if !unwritten.uses.is_empty() {
            let batch: Vec<(String, i64, Option<String>)> = unwritten
                .uses
                .iter()
                .map(|(id, (at, ip))| (id.clone(), *at, ip.map(|ip| ip.to_string())))
                .collect();
            match self.store.record_uses(&batch).await {
                Ok(()) => unwritten.uses.clear(),
                Err(err) => {
                    written = false;
                    tracing::warn!(error = %err, keys = batch.len(), "cannot write last-used times; will retry")
                }
            }
        }
        if !unwritten.hours.is_empty() {
            let batch: Vec<KeyHour> = unwritten.hours.values().cloned().collect();
            match self.store.record_usage(&batch).await {
                Ok(()) => unwritten.hours.clear(),
                Err(err) => {
                    written = false;
                    tracing::warn!(error = %err, key_hours = batch.len(), "cannot write usage; will retry")
                }
            }
        }
        if !written {
            self.flush_failures.inc();
        }
        written
    }
}

fn with_application_name(url: &str, name: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// Loads the rows whose revisions lie in `revisions`, page by page.
async fn load_slice(
    store: &Store,
    index: &KeyIndex,
    revisions: std::ops::RangeInclusive<i64>,
) -> Result<(), StoreError> {
    let mut from = ChangeCursor {
        revision: revisions.start() - 1,
        id: String::new(),
    };
    loop {
        let rows = store
            .changes_since(&from, Some(revisions.clone()), BATCH)
            .await?;
        for row in &rows {
            index.apply(row);
        }
        match rows.last() {
            Some(last) if rows.len() as u64 == BATCH => {
                from = ChangeCursor {
                    revision: last.revision,
                    id: last.id.clone(),
                };
            }
            _ => return Ok(()),
        }
    }
}
