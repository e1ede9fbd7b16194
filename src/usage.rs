//! A key's ValidateKey answers, counted per hour and result, with the distinct client IPs of
//! each hour: what GetKeyUsage reports and the Logs page shows.

use std::net::IpAddr;

use crate::domain::Validation;

/// One hour, in microseconds.
pub(crate) const HOUR_US: i64 = 3_600_000_000;

/// The start of the hour holding `time_us`.
pub(crate) fn hour_start(time_us: i64) -> i64 {
    time_us - time_us.rem_euclid(HOUR_US)
}

/// One key's answers in one hour, by answer. Unknown and malformed keys belong to no
/// workspace and are counted only as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UsageCounts {
    pub valid: u64,
    pub expired: u64,
    pub disabled: u64,
    pub deleted: u64,
    pub insufficient_scope: u64,
    pub ip_not_allowed: u64,
    pub rate_limited: u64,
    pub usage_exceeded: u64,
}

impl UsageCounts {
    pub(crate) fn add(&mut self, result: Validation) {
        let count = match result {
            Validation::Valid => &mut self.valid,
            Validation::Expired => &mut self.expired,
            Validation::Disabled => &mut self.disabled,
            Validation::Deleted => &mut self.deleted,
            Validation::InsufficientScope => &mut self.insufficient_scope,
            Validation::IpNotAllowed => &mut self.ip_not_allowed,
            Validation::RateLimited => &mut self.rate_limited,
            Validation::UsageExceeded => &mut self.usage_exceeded,
            // No key, so no key's usage.
            Validation::Malformed | Validation::NotFound => return,
        };
        *count += 1;
    }

    /// Every answer counted.
    pub(crate) fn total(&self) -> u64 {
        let Self {
            valid,
            expired,
            disabled,
            deleted,
            insufficient_scope,
            ip_not_allowed,
            rate_limited,
            usage_exceeded,
        } = *self;
        valid
            + expired
            + disabled
            + deleted
            + insufficient_scope
            + ip_not_allowed
            + rate_limited
            + usage_exceeded
    }

    /// Adds `other`'s counts.
    pub(crate) fn merge(&mut self, other: &Self) {
        let Self {
            valid,
            expired,
            disabled,
            deleted,
            insufficient_scope,
            ip_not_allowed,
            rate_limited,
            usage_exceeded,
        } = *other;
        self.valid += valid;
        self.expired += expired;
        self.disabled += disabled;
        self.deleted += deleted;
        self.insufficient_scope += insufficient_scope;
        self.ip_not_allowed += ip_not_allowed;
        self.rate_limited += rate_limited;
        self.usage_exceeded += usage_exceeded;
    }
}

/// One key's answers in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HourUsage {
    pub start_time_us: i64,
    pub counts: UsageCounts,
    pub client_ips: DistinctIps,
    /// The IP counted last: the same client again and again costs no hashing.
    last_ip: Option<IpAddr>,
}

impl HourUsage {
    pub(crate) fn new(start_time_us: i64) -> Self {
        Self {
            start_time_us,
            counts: UsageCounts::default(),
            client_ips: DistinctIps::default(),
            last_ip: None,
        }
    }

    /// An hour as stored.
    pub(crate) fn stored(start_time_us: i64, counts: UsageCounts, client_ips: DistinctIps) -> Self {
        Self {
            start_time_us,
            counts,
            client_ips,
            last_ip: None,
        }
    }

    pub(crate) fn count(&mut self, result: Validation, client_ip: Option<IpAddr>) {
        self.counts.add(result);
        if let Some(ip) = client_ip
            && self.last_ip != Some(ip)
        {
            self.client_ips.insert(ip);
            self.last_ip = Some(ip);
        }
    }

    /// Adds `other`, of the same key and hour.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.counts.merge(&other.counts);
        self.client_ips.merge(&other.client_ips);
    }
}

/// HyperLogLog registers (2^8 of them): how many distinct IPs a key saw in an hour, exact in
/// practice for a handful and within about 6.5 % for many, in at most 256 bytes however many
/// there were. Mergeable, so each replica and each flush adds its own. Few registers are set
/// for a key used from a few IPs, so those are kept as (register, rank) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DistinctIps(Registers);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Registers {
    /// Sorted by register; at most `SPARSE_MAX`.
    Sparse(Vec<(u8, u8)>),
    Dense(Box<[u8; REGISTERS]>),
}

const REGISTERS: usize = 256;
const SPARSE_MAX: usize = 48;
/// The highest rank a 56-bit remainder can give.
const MAX_RANK: u8 = 57;

impl Default for DistinctIps {
    fn default() -> Self {
        Self(Registers::Sparse(Vec::new()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an encoded distinct-IP sketch")]
pub(crate) struct SketchDecodeError;

impl DistinctIps {
    pub(crate) fn insert(&mut self, ip: IpAddr) {
        // An IPv4 address and its IPv4-mapped IPv6 form are one client.
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        // A hash every replica and every version computes alike, since sketches are merged.
        let hash = blake3::hash(&octets);
        let mut first = [0; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        let hash = u64::from_le_bytes(first);
        let register = (hash >> 56) as u8;
        let rank = ((hash << 8).leading_zeros().min(56) + 1) as u8;
        self.set(register, rank);
    }

    fn set(&mut self, register: u8, rank: u8) {
        match &mut self.0 {
            Registers::Dense(registers) => {
                let slot = &mut registers[usize::from(register)];
                *slot = (*slot).max(rank);
            }
            Registers::Sparse(pairs) => {
                match pairs.binary_search_by_key(&register, |(at, _)| *at) {
                    Ok(i) => pairs[i].1 = pairs[i].1.max(rank),
                    Err(i) => pairs.insert(i, (register, rank)),
                }
                if pairs.len() > SPARSE_MAX {
                    let mut dense = Box::new([0; REGISTERS]);
                    for (at, rank) in pairs.iter() {
                        dense[usize::from(*at)] = *rank;
                    }
                    self.0 = Registers::Dense(dense);
                }
            }
        }
    }

    /// The registers that are set, as (register, rank).
    fn pairs(&self) -> Vec<(u8, u8)> {
        match &self.0 {
            Registers::Sparse(pairs) => pairs.clone(),
            Registers::Dense(registers) => (0..=u8::MAX)
                .zip(registers.iter().copied())
                .filter(|(_, rank)| *rank > 0)
                .collect(),
        }
    }

    pub(crate) fn merge(&mut self, other: &Self) {
        for (register, rank) in other.pairs() {
            self.set(register, rank);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(&self.0, Registers::Sparse(pairs) if pairs.is_empty())
    }

    /// The estimated number of distinct IPs inserted.
    pub(crate) fn estimate(&self) -> u64 {
        let pairs = self.pairs();
        let m = REGISTERS as f64;
        let zeros = (REGISTERS - pairs.len()) as f64;
        let sum = zeros
            + pairs
                .iter()
                .map(|(_, rank)| 2f64.powi(-i32::from(*rank)))
                .sum::<f64>();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        // Linear counting is the better estimate while registers are still empty.
        let estimate = if raw <= 2.5 * m && zeros > 0.0 {
            m * (m / zeros).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    /// As stored: (register, rank) pairs while few, else the 256 registers.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match &self.0 {
            Registers::Sparse(pairs) => pairs.iter().flat_map(|(at, rank)| [*at, *rank]).collect(),
            Registers::Dense(registers) => registers.to_vec(),
        }
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, SketchDecodeError> {
        if let Ok(registers) = <[u8; REGISTERS]>::try_from(bytes) {
            if registers.iter().any(|rank| *rank > MAX_RANK) {
                return Err(SketchDecodeError);
            }
            return Ok(Self(Registers::Dense(Box::new(registers))));
        }
        if !bytes.len().is_multiple_of(2) || bytes.len() > 2 * SPARSE_MAX {
            return Err(SketchDecodeError);
        }
        let pairs: Vec<(u8, u8)> = bytes
            .chunks_exact(2)
            .map(|pair| (pair[0], pair[1]))
            .collect();
        let sorted = pairs.windows(2).all(|two| two[0].0 < two[1].0);
        if !sorted || pairs.iter().any(|(_, rank)| !(1..=MAX_RANK).contains(rank)) {
            return Err(SketchDecodeError);
        }
        Ok(Self(Registers::Sparse(pairs)))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n.wrapping_add(0x0a00_0000)))
    }

    #[test]
    fn a_few_clients_are_counted_exactly() {
        let mut ips = DistinctIps::default();
        assert_eq!(ips.estimate(), 0);
        for n in 1..=5 {
            ips.insert(ip(n));
            ips.insert(ip(n));
            assert_eq!(ips.estimate(), u64::from(n));
        }
    }

    #[test]
    fn an_ipv4_client_and_its_mapped_ipv6_form_are_one() {
        let mut ips = DistinctIps::default();
        ips.insert(ip(1));
        ips.insert(IpAddr::V6(Ipv4Addr::from(0x0a00_0001).to_ipv6_mapped()));
        ips.insert(IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(ips.estimate(), 2);
    }

    #[test]
    fn many_clients_are_estimated_within_a_few_percent() {
        for n in [100u32, 1_000, 50_000] {
            let mut ips = DistinctIps::default();
            for i in 0..n {
                ips.insert(ip(i));
            }
            let error = (ips.estimate() as f64 - f64::from(n)).abs() / f64::from(n);
            assert!(error < 0.15, "{n} clients estimated {}", ips.estimate());
        }
    }

    #[test]
    fn hours_merge_by_adding_counts_and_uniting_clients() {
        let mut a = HourUsage::new(0);
        a.count(Validation::Valid, Some(ip(1)));
        a.count(Validation::Valid, Some(ip(1)));
        let mut b = HourUsage::new(0);
        b.count(Validation::Deleted, Some(ip(1)));
        b.count(Validation::Valid, Some(ip(2)));
        b.count(Validation::InsufficientScope, None);
        a.merge(&b);
        assert_eq!(
            a.counts,
            UsageCounts {
                valid: 3,
                deleted: 1,
                insufficient_scope: 1,
                ..UsageCounts::default()
            }
        );
        assert_eq!(a.client_ips.estimate(), 2);
    }

    #[test]
    fn unknown_and_malformed_keys_count_for_no_key() {
        let mut hour = HourUsage::new(0);
        hour.count(Validation::Malformed, None);
        hour.count(Validation::NotFound, None);
        hour.count(Validation::Expired, None);
        assert_eq!(hour.counts.total(), 1);
        assert_eq!(hour.counts.expired, 1);
    }

    #[test]
    fn hours_start_on_the_hour() {
        assert_eq!(hour_start(HOUR_US + 5), HOUR_US);
        assert_eq!(hour_start(HOUR_US), HOUR_US);
        assert_eq!(hour_start(-1), -HOUR_US);
    }

    proptest! {
        #[test]
        fn sketches_survive_storage_and_merging_is_a_union(
            left in proptest::collection::vec(any::<u32>(), 0..300),
            right in proptest::collection::vec(any::<u32>(), 0..300),
        ) {
            let sketch = |ips: &[u32]| {
                let mut sketch = DistinctIps::default();
                for n in ips {
                    sketch.insert(ip(*n));
                }
                sketch
            };
            let (a, b) = (sketch(&left), sketch(&right));
            prop_assert_eq!(DistinctIps::from_bytes(&a.to_bytes()).unwrap().pairs(), a.pairs());
            let mut merged = a.clone();
            merged.merge(&b);
            let both: Vec<u32> = left.iter().chain(&right).copied().collect();
            prop_assert_eq!(merged.pairs(), sketch(&both).pairs());
        }

        #[test]
        fn stored_garbage_is_refused_not_trusted(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(sketch) = DistinctIps::from_bytes(&bytes) {
                prop_assert!(sketch.estimate() <= 1 << 40);
            }
        }
    }
}
