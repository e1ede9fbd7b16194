//! Caps open health watches, per connection and in all.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tonic::{Status, body::Body};

use super::{Check, HEALTH_WATCH_PATH, Holding, Rpc};
use crate::{error::ApiError, net::ConnectionInfo};

/// A health watch is a stream that lasts as long as the client likes, and it needs no
/// credentials: without a cap, a few connections could hold tens of thousands and the
/// memory behind them. Over either cap a watch is answered RESOURCE_EXHAUSTED
/// (`HEALTH_WATCHES_EXHAUSTED`); health Check, which probes use, is never capped.
#[derive(Debug, Clone)]
pub(crate) struct HealthWatches {
    open: Arc<AtomicUsize>,
    max: usize,
    per_connection: usize,
}

impl HealthWatches {
    pub(crate) fn new(max: usize, per_connection: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
            per_connection,
        }
    }
}

/// One open watch, counted until its stream ends.
#[derive(Debug)]
pub(crate) struct Watch {
    open: Arc<AtomicUsize>,
    connection: ConnectionInfo,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.connection.watches().fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes one of `limit` places counted by `count`, if one is free.
fn take(count: &AtomicUsize, limit: usize) -> bool {
    count
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

impl Check for HealthWatches {
    type Hold = Option<Watch>;

    fn check(&self, _: Rpc<'_>, request: &mut http::Request<Body>) -> Result<Self::Hold, Status> {
        if request.uri().path() != HEALTH_WATCH_PATH {
            return Ok(None);
        }
        let Some(connection) = request.extensions().get::<ConnectionInfo>() else {
            return Ok(None);
        };
        if !take(connection.watches(), self.per_connection) {
            return Err(ApiError::HealthWatchesExhausted.into());
        }
        if !take(&self.open, self.max) {
            connection.watches().fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::HealthWatchesExhausted.into());
        }
        Ok(Some(Watch {
            open: self.open.clone(),
            connection: connection.clone(),
        }))
    }

    fn answered(hold: Self::Hold, response: http::Response<Body>) -> http::Response<Body> {
        match hold {
            Some(watch) => response.map(|body| Body::new(Holding::new(body, watch))),
            None => response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_only_below_the_limit() {
        let count = AtomicUsize::new(0);
        assert!(take(&count, 2));
        assert!(take(&count, 2));
        assert!(!take(&count, 2));
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
