//! The ValidateKey hot path without the network: parse + checksum, blake3, index lookup.
//!
//!     cargo bench --bench validate_index
//!
//! The index holds 1,000,000 keys, as a large deployment would. `hit` counts usage (the
//! default), `hit, usage off` only notes last uses, `hit, client ip` also counts the IP.

use std::{hint::black_box, net::IpAddr};

use apikeys::{
    domain::{PresentedKey, Secret},
    index::KeyIndex,
    store::IndexRow,
};
use criterion::{Criterion, criterion_group, criterion_main};

const KEYS: usize = 1_000_000;

fn row(i: usize, secret: &Secret) -> IndexRow {
    IndexRow {
        id: format!("key_{i:0>20}"),
        workspace_id: format!("workspace-{}", i % 5000),
        key_hash: secret.hash().as_bytes().to_vec(),
        expire_time_us: None,
        last_used_time_us: None,
        delete_time_us: None,
        revision: i as i64 + 1,
        name: format!("bench key {i}"),
        disable_time_us: None,
        scopes: String::new(),
        ..Default::default()
    }
}

fn validate(index: &KeyIndex, input: &str, client_ip: Option<IpAddr>) -> bool {
    match PresentedKey::parse(input) {
        Ok(key) => index
            .lookup(
                &key.hash(),
                &[] as &[&str],
                1_800_000_000_000_000,
                1_000_000,
                client_ip,
                &[],
                1,
            )
            .is_some(),
        Err(_) => false,
    }
}

fn bench(c: &mut Criterion) {
    let index = KeyIndex::new();
    let without_usage = KeyIndex::recording_usage(false);
    let mut hits = Vec::new();
    for i in 0..KEYS {
        let secret = Secret::generate();
        index.apply(&row(i, &secret));
        without_usage.apply(&row(i, &secret));
        if i % 1000 == 0 {
            hits.push(secret.expose().to_owned());
        }
    }
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let unknown: Vec<String> = (0..1000)
        .map(|_| Secret::generate().expose().to_owned())
        .collect();
    let mut group = c.benchmark_group("validate (1M keys)");
    let mut i = 0;
    group.bench_function("hit", |b| {
        b.iter(|| {
            i += 1;
            black_box(validate(&index, &hits[i % hits.len()], None))
        })
    });
    group.bench_function("hit, usage off", |b| {
        b.iter(|| {
            i += 1;
            black_box(validate(&without_usage, &hits[i % hits.len()], None))
        })
    });
    group.bench_function("hit, client ip", |b| {
        b.iter(|| {
            i += 1;
            black_box(validate(&index, &hits[i % hits.len()], Some(ip)))
        })
    });
    group.bench_function("unknown", |b| {
        b.iter(|| {
            i += 1;
            black_box(validate(&index, &unknown[i % unknown.len()], None))
        })
    });
    group.bench_function("malformed", |b| {
        b.iter(|| black_box(validate(&index, black_box("clo_not-a-key"), None)))
    });
    group.bench_function("parse + checksum only", |b| {
        b.iter(|| black_box(PresentedKey::parse(black_box(&hits[0])).is_ok()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
