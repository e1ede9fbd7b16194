//! SQL helpers shared by the batched statements of both backends.

use sea_orm::DatabaseBackend;

/// `items` in chunks of power-of-two lengths up to `max` (a power of two): whole chunks of
/// `max`, then the rest's binary digits. Batched statements then come in a few shapes
/// (`log2(max) + 1` per statement), which the driver's per-connection cache of prepared
/// statements keeps for good, instead of one shape per batch length, each prepared, cached
/// and evicted in turn: memory that grew for as long as the soak test ran.
pub(super) fn binary_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    debug_assert!(max.is_power_of_two());
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(max.min(1 << rest.len().ilog2()));
        rest = tail;
        Some(chunk)
    })
}

/// Numbered statement parameters (`$1` for PostgreSQL, `?1` for SQLite), so one can be used
/// twice.
pub(super) struct Placeholders {
    backend: DatabaseBackend,
    n: usize,
}

impl Placeholders {
    pub(super) fn new(backend: DatabaseBackend) -> Self {
        Self { backend, n: 0 }
    }

    pub(super) fn next(&mut self) -> String {
        self.n += 1;
        match self.backend {
            DatabaseBackend::Postgres => format!("${}", self.n),
            _ => format!("?{}", self.n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::binary_chunks;

    #[test]
    fn batches_are_cut_into_few_shapes_in_order() {
        let mut shapes = std::collections::BTreeSet::new();
        for n in 0..1_000usize {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = binary_chunks(&items, 128).collect();
            assert_eq!(chunks.concat(), items, "every item once, in order");
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= 128)
            );
            // Whole chunks of 128, then at most one chunk of each smaller power of two.
            assert!(chunks.len() <= n / 128 + 7, "{n}: {} chunks", chunks.len());
            shapes.extend(chunks.iter().map(|c| c.len()));
        }
        assert_eq!(shapes.len(), 8, "{shapes:?}");
    }
}
